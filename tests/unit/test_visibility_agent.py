"""The agent's flow path without a kernel: packet and prefix parsing, the bounded buffer, the uploader."""

from __future__ import annotations

import ipaddress
import struct
import threading
from typing import Any

import pytest

from stockade.agent.flows import FlowBuffer, FlowCollector, _handing_over, collector_for
from stockade.agent.nflog import LoggedPacket, parse_packet, parse_prefix
from stockade.agent.transport import ControllerUnreachableError
from stockade.compiler.ir import Direction
from stockade.errors import ValidationError
from stockade.evaluator import Verdict
from stockade.model import Proto
from stockade.visibility import FlowKey
from stockade.visibility.wire import FlowBatch, batch_to_wire, record_from_wire

ip = ipaddress.ip_address


def v4(proto: int, l4: bytes, *, src: str = "10.0.0.1", dst: str = "10.0.0.2", frag: int = 0) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                       ip(src).packed, ip(dst).packed)
    return head + l4


def v6(next_header: int, rest: bytes, *, src: str = "fd00::1", dst: str = "fd00::2") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(rest), next_header, 64, ip(src).packed, ip(dst).packed) + rest


TCP_443 = struct.pack("!HHIIBBHHH", 40000, 443, 1, 0, 0x50, 0x02, 1024, 0, 0)
UDP_53 = struct.pack("!HHHH", 5353, 53, 8, 0)


def test_packets_parse_to_flow_keys() -> None:
    assert parse_packet(v4(6, TCP_443)) == FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), Proto.TCP, 443)
    assert parse_packet(v4(17, UDP_53)) == FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), Proto.UDP, 53)
    assert parse_packet(v4(1, b"\x08\x00\x00\x00")).port == 8  # type: ignore[union-attr]
    later_fragment = parse_packet(v4(6, TCP_443, frag=100))
    assert later_fragment is not None and later_fragment.port is None
    assert parse_packet(v4(47, b"\0" * 8)) == FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), Proto.ANY, None)
    assert parse_packet(v6(6, TCP_443)) == FlowKey(ip("fd00::1"), ip("fd00::2"), Proto.TCP, 443)
    assert parse_packet(v6(58, b"\x80\x00\x00\x00")).port == 128  # type: ignore[union-attr]
    hop_by_hop = struct.pack("!BB6x", 17, 0)  # next header UDP, length 0 (8 bytes)
    assert parse_packet(v6(0, hop_by_hop + UDP_53)) == FlowKey(ip("fd00::1"), ip("fd00::2"), Proto.UDP, 53)
    first_frag = struct.pack("!BBHI", 6, 0, 0x0001, 7)  # offset 0, more fragments
    assert parse_packet(v6(44, first_frag + TCP_443)).port == 443  # type: ignore[union-attr]
    assert parse_packet(b"\x00" * 10) is None
    assert parse_packet(b"\x70" + b"\x00" * 40) is None


def test_prefixes() -> None:
    assert parse_prefix("stk:a:ruleset/shop/0") == (Verdict.ALLOWED, "ruleset/shop/0")
    assert parse_prefix("stk:d:default") == (Verdict.BLOCKED, "default")
    assert parse_prefix("stk:pb:deny/x") == (Verdict.POTENTIALLY_BLOCKED, "deny/x")
    assert parse_prefix("DOCKER-DROP: ") is None


def pkt(port: int, t: float = 100.0, verdict: Verdict = Verdict.ALLOWED) -> LoggedPacket:
    return LoggedPacket(FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), Proto.TCP, port), Direction.OUTBOUND, verdict,
                        "default", t)


def test_buffer_merges_and_stays_bounded() -> None:
    buf = FlowBuffer(max_entries=3)
    for i in range(10):
        buf.add(pkt(80, t=100 + i))
    assert len(buf) == 1
    for port in (81, 82, 83, 84):
        buf.add(pkt(port))
    assert len(buf) == 3 and buf.dropped == 2  # 83 and 84 had no room
    buf.add(pkt(80, t=200))  # a known key still merges when full
    taken = buf.take(2)
    assert [r.key.port for r in taken] == [80, 81]
    assert (taken[0].count, taken[0].first_seen, taken[0].last_seen) == (11, 100, 200)
    buf.put_back(taken)
    assert len(buf) == 3 and buf.dropped == 2
    buf.add(pkt(90))
    assert buf.dropped == 3


def test_wire_round_trip() -> None:
    records = FlowBuffer().take(0)
    buf = FlowBuffer()
    buf.add(pkt(443, verdict=Verdict.POTENTIALLY_BLOCKED))
    records = buf.take(10)
    wire = batch_to_wire(FlowBatch(1.5, 4, tuple(records)))
    assert wire["dropped"] == 4 and wire["sent_at"] == 1.5
    assert [record_from_wire(x) for x in wire["records"]] == records


class FakeSender:
    def __init__(self) -> None:
        self.up = True
        self.refuse = False
        self.batches: list[FlowBatch] = []
        self.lock = threading.Lock()

    def send(self, batch: FlowBatch) -> None:
        if not self.up:
            raise ControllerUnreachableError("down")
        if self.refuse:
            raise ValidationError([])
        with self.lock:
            self.batches.append(batch)

    def close(self) -> None:
        pass

    def ports(self) -> list[int]:
        return sorted(r.key.port or 0 for b in self.batches for r in b.records)


def test_back_pressure_bounded_buffer_then_upload_with_the_dropped_count() -> None:
    sender = FakeSender()
    c = FlowCollector(sender, group=1, batch_size=40, max_entries=100)
    sender.up = False
    c.record([pkt(p) for p in range(250)])
    assert c.upload_pending() > 0  # unreachable: back off, keep everything that fits
    assert len(c.buffer) == 100 and c.dropped == 150
    c.record([pkt(p) for p in range(50)])  # repeats of buffered keys still count
    assert c.upload_pending() > 0 and len(c.buffer) == 100
    sender.up = True
    assert c.upload_pending() == 0
    assert sender.ports() == list(range(100))
    assert [len(b.records) for b in sender.batches] == [40, 40, 20]
    assert all(b.dropped == 150 for b in sender.batches)
    assert sum(r.count for b in sender.batches for r in b.records) == 150
    assert c.uploaded == 100 and len(c.buffer) == 0
    # nothing new: no upload; a refused batch is dropped, counted and reported next time
    assert c.upload_pending() == 0 and len(sender.batches) == 3
    sender.refuse = True
    c.record([pkt(9999)])
    c.upload_pending()
    assert c.dropped == 151
    sender.refuse = False
    c.upload_pending()
    assert sender.batches[-1].records == () and sender.batches[-1].dropped == 151


class ListReader:
    def __init__(self, packets: list[LoggedPacket]) -> None:
        self.packets = packets
        self.overruns = 3
        self.closed = False

    def read(self, timeout: float) -> list[LoggedPacket]:
        out, self.packets = self.packets, []
        if not out:
            threading.Event().wait(min(timeout, 0.01))
        return out

    def close(self) -> None:
        self.closed = True


def test_collector_threads_read_and_upload() -> None:
    sender = FakeSender()
    reader = ListReader([pkt(p) for p in range(10)])

    def factory(group: int, is_local: Any) -> ListReader:
        assert group == 7
        return reader

    c = FlowCollector(sender, group=7, interval=0.05, reader_factory=factory)
    c.start()
    try:
        deadline = threading.Event()
        for _ in range(200):
            if len(sender.ports()) == 10 and sender.batches[-1].dropped == 3:
                break
            deadline.wait(0.02)
        assert sender.ports() == list(range(10))
        assert sender.batches[-1].dropped == 3  # kernel overruns are reported too
    finally:
        c.stop()
    assert reader.closed


def test_a_reader_bound_early_is_read_first_and_reopens_come_from_the_factory() -> None:
    """A node agent binds a new pod's NFLOG reader before its first apply and hands it over: the
    collector reads that one (not a second socket on a group only one may bind), and a reopen after
    a failure is the ordinary factory's."""
    early, later = ListReader([pkt(1)]), ListReader([])
    made: list[int] = []

    def factory(group: int, is_local: Any) -> ListReader:
        made.append(group)
        return later

    handed = _handing_over(early, factory)
    assert handed(7, None) is early and made == []
    assert handed(7, None) is later and made == [7]


def test_a_reader_handed_to_no_collector_is_closed(tmp_path: Any) -> None:
    from stockade.agent.enforcer import Enforcer
    from stockade.agent.fake import MemoryBackend
    from stockade.agent.state import Credential

    reader = ListReader([])
    cred = Credential("local://controller", "a1", "t", "w", None)  # not HTTP: no flow uploads
    assert collector_for(cred, None, Enforcer(MemoryBackend()), lambda: (), reader=reader) is None
    assert reader.closed


@pytest.mark.parametrize("bad", [["10.0.0.1"], ["10.0.0.1", "fd00::1", "tcp", 1, "out", "allowed", "r", 1, 1, 2],
                                 ["10.0.0.1", "10.0.0.2", "tcp", 1, "up", "allowed", "r", 1, 1, 2],
                                 ["10.0.0.1", "10.0.0.2", "tcp", 1, "out", "allowed", "r", 0, 1, 2],
                                 ["10.0.0.1", "10.0.0.2", "tcp", 1, "out", "allowed", "r", 1, 3, 2]])
def test_malformed_wire_records(bad: list[Any]) -> None:
    with pytest.raises((ValueError, KeyError)):
        record_from_wire(bad)
