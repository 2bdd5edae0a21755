"""This namespace's TCP connections, read from the kernel's socket table (``sock_diag``).

Where conntrack is not tracking (no firewall used it yet), the kernel's own TCP sockets still say
which connections exist: one ``SOCK_DIAG_BY_FAMILY`` dump per address family, no ``ss`` binary.
A connection's direction is not in a socket, so it is taken from the listeners: a connection whose
local address and port a listening socket serves was accepted (inbound); any other was opened here
(outbound). Used by :mod:`stockade.backends.ebpf.takeover`; nothing is changed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from stockade.backends.common import in_netns
from stockade.backends.conntrack import Address, Tracked
from stockade.backends.nfnetlink import dump_payloads
from stockade.errors import BackendError

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCP_LISTEN = 10
# every state of a connection that still carries packets (not LISTEN, not TIME_WAIT / CLOSE)
CONNECTED = sum(1 << s for s in (1, 2, 3, 4, 5, 8, 9, 11))
_REQ = struct.Struct("=BBBBI2s2s16s16sI8s")  # inet_diag_req_v2
_MSG = struct.Struct("=BBBB2s2s16s16sI8s")  # the head of inet_diag_msg
_HEADER = struct.Struct("=IHHII")


def _address(family: int, raw: bytes) -> Address:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    v6 = ipaddress.IPv6Address(raw[:16])
    return v6.ipv4_mapped or v6


def _dump(sock: socket.socket, family: int, states: int) -> list[tuple[Address, int, Address, int]]:
    """(local address, local port, remote address, remote port) of TCP sockets in ``states``."""
    zero16, zero2 = b"\0" * 16, b"\0" * 2
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states, zero2, zero2, zero16, zero16, 0, b"\0" * 8)
    sock.send(_HEADER.pack(16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, 0) + req)
    out: list[tuple[Address, int, Address, int]] = []
    for payload in dump_payloads(sock, family, "sock_diag"):
        fam, _state, _t, _r, sport, dport, src, dst, _if, _cookie = _MSG.unpack_from(payload)
        out.append((_address(fam, src), int.from_bytes(sport, "big"), _address(fam, dst),
                    int.from_bytes(dport, "big")))
    return out

def tcp_connections(netns: str | None) -> list[Tracked]:
    """This namespace's TCP connections, each oriented as its first packet went."""
    try:
        sock = in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG))
    except OSError as exc:
        raise BackendError(f"cannot open sock_diag socket in {netns or 'this namespace'}: {exc}") from exc
    with sock:
        try:
            sock.bind((0, 0))
            listening: set[tuple[Address | None, int]] = set()
            connected: list[tuple[Address, int, Address, int]] = []
            for family in (socket.AF_INET, socket.AF_INET6):
                for addr, port, _r, _rp in _dump(sock, family, 1 << TCP_LISTEN):
                    listening.add((None if addr.is_unspecified else addr, port))
                connected += _dump(sock, family, CONNECTED)
        except OSError as exc:
            raise BackendError(f"sock_diag dump in {netns or 'this namespace'}: {exc}") from exc
    out: list[Tracked] = []
    for local, lport, remote, rport in connected:
        if (local, lport) in listening or (None, lport) in listening:
            out.append(Tracked(socket.IPPROTO_TCP, remote, local, rport, lport))  # accepted here
        else:
            out.append(Tracked(socket.IPPROTO_TCP, local, remote, lport, rport))  # opened here
    return out
