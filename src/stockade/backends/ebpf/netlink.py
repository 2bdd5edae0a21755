"""A network namespace's links and tc filters, read over rtnetlink without a subprocess.

``setns(2)`` with ``CLONE_NEWNET`` moves only the calling thread, so a short-lived worker
thread (:func:`stockade.backends.common.in_netns`) joins the namespace, opens a
``NETLINK_ROUTE`` socket there (a socket belongs to the namespace it was created in), dumps
``RTM_GETLINK`` or ``RTM_GETTFILTER`` and parses the few attributes we need: link name and
hardware type; filter kind, preference, handle and, for ``bpf`` filters, the program's id,
name and tag (which pyroute2 does not decode). This keeps a policy apply free of
``ip``/``tc`` subprocesses when nothing needs attaching; changing filters still goes
through ``tc``.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from stockade.backends.common import in_netns
from stockade.errors import ApplyError

NETLINK_ROUTE = 0
RTM_GETLINK = 18
RTM_GETQDISC = 38
RTM_GETTFILTER = 46
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFLA_IFNAME = 3
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_NAME = 7
TCA_BPF_TAG = 10
TCA_BPF_ID = 11
PARENT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
PARENT_EGRESS = 0xFFFFFFF3
PARENT_CLSACT = 0xFFFFFFF1  # TC_H_CLSACT: where a clsact qdisc hangs
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
LINK_TYPES = {ARPHRD_ETHER: "ether", ARPHRD_LOOPBACK: "loopback", 65534: "none"}



@dataclass(frozen=True)
class Link:
    index: int
    name: str
    hw_type: int

    @property
    def link_type(self) -> str:
        return LINK_TYPES.get(self.hw_type, str(self.hw_type))


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    parent: int
    pref: int
    handle: int
    kind: str
    prog_id: int
    prog_name: str
    tag: str


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    """rtattrs from ``offset`` to the end: type -> payload (first occurrence)."""
    out: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out.setdefault(kind & 0x3FFF, data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return out


def _dump(msg_type: int, body: bytes) -> list[bytes]:
    """The payloads of every message answering one dump request, in this thread's namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        header = struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        sock.send(header + body)
        out: list[bytes] = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + 16)
                    if err:
                        raise ApplyError(f"rtnetlink dump: {os.strerror(-err)}")
                    return out
                out.append(data[offset + 16 : offset + length])
                offset += (length + 3) & ~3


def _links() -> list[Link]:
    found = []
    for msg in _dump(RTM_GETLINK, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)):
        _family, hw_type, index, _flags, _change = struct.unpack_from("=BxHiII", msg, 0)
        name = _attrs(msg, 16).get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode()
        found.append(Link(index, name, hw_type))
    return sorted(found, key=lambda link: link.index)


def _filters(ifindex: int, parent: int) -> list[TcFilter]:
    found: list[TcFilter] = []
    try:
        msgs = _dump(RTM_GETTFILTER, struct.pack("=BxxxiIII", socket.AF_UNSPEC, ifindex, 0, parent, 0))
    except ApplyError:
        return found  # no clsact qdisc on this interface
    for msg in msgs:
        _family, index, handle, msg_parent, info = struct.unpack_from("=BxxxiIII", msg, 0)
        attrs = _attrs(msg, 20)
        kind = attrs.get(TCA_KIND, b"").split(b"\0", 1)[0].decode()
        opts = _attrs(attrs.get(TCA_OPTIONS, b""), 0)
        prog_id = struct.unpack("=I", opts[TCA_BPF_ID])[0] if len(opts.get(TCA_BPF_ID, b"")) == 4 else 0
        name = opts.get(TCA_BPF_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
        found.append(TcFilter(index, msg_parent, info >> 16, handle, kind, prog_id, name,
                              opts.get(TCA_BPF_TAG, b"").hex()))
    return found


def links(netns: str | None) -> list[Link]:
    return in_netns(netns, _links)


def filters(netns: str | None, hooks: tuple[tuple[int, int], ...]) -> list[TcFilter]:
    """The filters of each (ifindex, parent) in one visit to the namespace."""
    return in_netns(netns, lambda: [f for ifindex, parent in hooks for f in _filters(ifindex, parent)])


def _clsact() -> set[int]:
    found: set[int] = set()
    for msg in _dump(RTM_GETQDISC, struct.pack("=BxxxiIII", socket.AF_UNSPEC, 0, 0, 0, 0)):
        _family, index, _handle, parent, _info = struct.unpack_from("=BxxxiIII", msg, 0)
        kind = _attrs(msg, 20).get(TCA_KIND, b"").split(b"\0", 1)[0]
        if kind == b"clsact" and parent == PARENT_CLSACT:
            found.add(index)
    return found


def clsact_interfaces(netns: str | None) -> set[int]:
    """Indexes of the interfaces that have a clsact qdisc."""
    return in_netns(netns, _clsact)
