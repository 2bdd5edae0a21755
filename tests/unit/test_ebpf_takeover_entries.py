"""The stale flows eBPF records for conntrack's connections when it takes over (no kernel)."""

from __future__ import annotations

import ipaddress
import struct

from stockade.backends.conntrack import Tracked
from stockade.backends.ebpf.takeover import DIR_IN, DIR_OUT, STALE_EPOCH, flow_entry

LOCAL = frozenset({ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1")})
KEY = struct.Struct("=BBHHH16s16s")
VAL = struct.Struct("=QIIBBBBI")


def test_an_inbound_connection_is_keyed_as_its_first_packet_went_with_ports_in_network_order() -> None:
    conn = Tracked(6, ipaddress.ip_address("10.0.0.9"), ipaddress.ip_address("10.0.0.1"), 40000, 443)
    entry = flow_entry(conn, LOCAL, 123)
    assert entry is not None
    family, proto, _pad, sport, dport, src, dst = KEY.unpack(entry[0])
    assert (family, proto) == (4, 6)
    assert struct.pack("=H", sport) == struct.pack("!H", 40000) and struct.pack("=H", dport) == struct.pack("!H", 443)
    assert src == bytes([10, 0, 0, 9]) + b"\0" * 12 and dst == bytes([10, 0, 0, 1]) + b"\0" * 12
    last, epoch, _rule, direction, *_ = VAL.unpack(entry[1])
    assert (last, epoch, direction) == (123, STALE_EPOCH, DIR_IN)


def test_an_outbound_v6_connection_is_outbound_and_never_current() -> None:
    conn = Tracked(17, ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::9"), 5353, 53)
    entry = flow_entry(conn, LOCAL, 0)
    assert entry is not None
    assert KEY.unpack(entry[0])[0] == 6
    _last, epoch, _rule, direction, *_ = VAL.unpack(entry[1])
    assert direction == DIR_OUT and epoch == STALE_EPOCH == 0  # the loader's epochs start at 1


def test_forwarded_and_local_to_local_connections_are_not_this_hosts() -> None:
    a, b = ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("10.0.0.8")
    assert flow_entry(Tracked(6, a, b, 1, 2), LOCAL, 0) is None
    one = ipaddress.ip_address("10.0.0.1")
    assert flow_entry(Tracked(6, one, one, 1, 2), LOCAL, 0) is None
