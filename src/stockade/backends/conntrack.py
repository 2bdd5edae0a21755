"""The kernel's connection tracking table, read over ctnetlink (no ``conntrack`` binary).

A backend that does not use conntrack itself (eBPF keeps its own flow map) still needs to know
the connections conntrack tracks at the moment it takes over from one that does (nftables,
iptables): see :func:`stockade.backends.ebpf.takeover.seed_flows`. One ``IPCTNL_MSG_CT_GET``
dump in the namespace gives every tracked connection's original tuple; nothing is changed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from stockade.backends.nfnetlink import (
    NLM_F_REQUEST,
    SO_RCVBUFFORCE,
    dump_payloads,
    message,
    open_socket,
    parse_attrs,
)
from stockade.errors import BackendError

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_DUMP = 0x300
CTA_TUPLE_ORIG = 1
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID = 4, 7

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Tracked:
    """One tracked connection, as its first packet went: source -> destination. For TCP and UDP
    ``sport``/``dport`` are ports; for ICMP echo ``sport`` is the identifier and ``dport`` 0."""

    proto: int
    src: Address
    dst: Address
    sport: int
    dport: int


def _tuple(raw: bytes) -> Tracked | None:
    parts = parse_attrs(raw)
    ip = parse_attrs(parts.get(CTA_TUPLE_IP, b""))
    proto = parse_attrs(parts.get(CTA_TUPLE_PROTO, b""))
    if CTA_PROTO_NUM not in proto:
        return None
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        src: Address = ipaddress.IPv4Address(ip[CTA_IP_V4_SRC][:4])
        dst: Address = ipaddress.IPv4Address(ip[CTA_IP_V4_DST][:4])
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        src, dst = ipaddress.IPv6Address(ip[CTA_IP_V6_SRC][:16]), ipaddress.IPv6Address(ip[CTA_IP_V6_DST][:16])
    else:
        return None

    def port(kind: int) -> int:
        value = proto.get(kind)
        return struct.unpack("!H", value[:2])[0] if value and len(value) >= 2 else 0

    num = proto[CTA_PROTO_NUM][0]
    if CTA_PROTO_ICMP_ID in proto or CTA_PROTO_ICMPV6_ID in proto:
        return Tracked(num, src, dst, port(CTA_PROTO_ICMP_ID) or port(CTA_PROTO_ICMPV6_ID), 0)
    return Tracked(num, src, dst, port(CTA_PROTO_SRC_PORT), port(CTA_PROTO_DST_PORT))


def tracked_connections(netns: str | None) -> list[Tracked]:
    """Every connection conntrack tracks in ``netns`` (empty when conntrack is not loaded there)."""
    try:
        sock = open_socket(netns)
    except OSError as exc:
        raise BackendError(f"cannot open ctnetlink socket in {netns or 'this namespace'}: {exc}") from exc
    out: list[Tracked] = []
    with sock:
        try:
            sock.bind((0, 0))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
            sock.send(message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1,
                              socket.AF_UNSPEC, 0, b""))
            for payload in dump_payloads(sock, 1, "conntrack",
                                         empty=(errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT)):
                orig = parse_attrs(payload[4:]).get(CTA_TUPLE_ORIG)  # after the nfgenmsg
                if orig is not None and (t := _tuple(orig)) is not None:
                    out.append(t)
        except OSError as exc:
            raise BackendError(f"conntrack dump in {netns or 'this namespace'}: {exc}") from exc
    return out
