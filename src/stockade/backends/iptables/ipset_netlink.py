"""ipset element changes over netlink, without forking the ``ipset`` binary.

Why: a one-peer delta through ``ipset -exist restore`` is a fork+exec (plus ``nsenter`` in a
namespace): 3-5 ms on a quiet machine, 15-40 ms under load, where the kernel itself needs a
few microseconds. The ipset subsystem of nfnetlink (``NFNL_SUBSYS_IPSET``, protocol 6 and 7,
``include/uapi/linux/netfilter/ipset/ip_set.h``) takes one ``IPSET_CMD_ADD`` /
``IPSET_CMD_DEL`` message per element: ``IPSET_ATTR_PROTOCOL``, ``IPSET_ATTR_SETNAME`` and
``IPSET_ATTR_DATA`` nesting ``IPSET_ATTR_IP`` (itself nesting the address as
``IPSET_ATTR_IPADDR_IPV4``/``_IPV6`` in network byte order) and ``IPSET_ATTR_CIDR``.

ipset is not transactional (unlike nf_tables batches): the kernel handles each message on
its own and answers each with an ack or an error. So that a delta keeps the contract of the
``ipset`` path (a missing set fails before anything changed) and does better on any other
refusal, a change runs in two steps on one socket:

1. one ``IPSET_CMD_HEADER`` per set named (one ``sendmsg``): a missing set, or one of another
   type or family, fails here and nothing was sent;
2. the deletions, then the additions, one message each, sent in chunks of
   :data:`MESSAGES_PER_SEND` (one ``sendmsg`` for a one-peer delta), every ack checked. They
   go without ``IPSET_FLAG_EXIST``: "already present" on an add and "not present" on a delete
   (``IPSET_ERR_EXIST``) are answered per element, counted as no change (the ``-exist``
   semantics of the command path), and tell exactly which messages changed the set. Any other
   refusal stops the delta, the messages that did change something are undone (re-added,
   deleted) and the error names the set and element.

A socket belongs to the namespace it was created in: for ``netns`` a short-lived thread
enters ``/run/netns/<netns>`` to create it (:func:`stockade.backends.nfnetlink.open_socket`),
and it stays usable from any thread. :meth:`IpsetNetlink.probe` asks the kernel for its
ipset protocol (``IPSET_CMD_PROTOCOL``); the backend falls back to the ``ipset`` command
when that is refused.
"""

from __future__ import annotations

import errno
import os
import socket
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from stockade.backends.iptables.model import address_text, ipset_members
from stockade.backends.nfnetlink import (
    NETLINK_CAP_ACK,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    Reply,
    attr,
    message,
    nest,
    open_socket,
    parse_attrs,
    parse_replies,
)
from stockade.errors import ApplyError
from stockade.model.addresses import Family, IPNetwork

NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 6  # the oldest the kernel takes (IPSET_PROTOCOL_MIN); 6.x kernels speak 6 and 7
IPSET_MAXNAMELEN = 32

IPSET_CMD_PROTOCOL = 1
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
IPSET_CMD_HEADER = 12

IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_TYPENAME = 3
IPSET_ATTR_FAMILY = 5
IPSET_ATTR_DATA = 7
IPSET_ATTR_IP = 1  # inside DATA
IPSET_ATTR_CIDR = 3  # inside DATA
IPSET_ATTR_IPADDR_IPV4 = 1  # inside IP
IPSET_ATTR_IPADDR_IPV6 = 2

IPSET_ERR_PRIVATE = 4096
IPSET_ERR_EXIST = IPSET_ERR_PRIVATE + 7  # element already added / not added
IPSET_ERRORS = {
    IPSET_ERR_PRIVATE + 1: "protocol error",
    IPSET_ERR_PRIVATE + 6: "set type mismatch",
    IPSET_ERR_EXIST: "element exists / is missing",
    IPSET_ERR_PRIVATE + 8: "invalid CIDR",
    IPSET_ERR_PRIVATE + 10: "family mismatch",
    IPSET_ERR_PRIVATE + 13: "invalid IPv4 address",
    IPSET_ERR_PRIVATE + 14: "invalid IPv6 address",
    IPSET_ERR_PRIVATE + 256: "set is full (maxelem)",  # IPSET_ERR_HASH_FULL, the first type-specific code
}
AF_INET = 2
NFPROTO = {Family.V4: 2, Family.V6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6: IPSET_ATTR_FAMILY of a set
SET_TYPE = b"hash:net"

MESSAGES_PER_SEND = 256  # acks of one chunk (36 bytes each) stay far below the receive buffer
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SetChange:
    """Members to delete from and add to one ``hash:net`` set of one family (kernel name)."""

    set_name: str
    family: Family
    add: tuple[IPNetwork, ...]
    delete: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class _Element:
    cmd: int
    set_name: str
    net: IPNetwork

    def describe(self) -> str:
        return f"{'add' if self.cmd == IPSET_CMD_ADD else 'del'} {self.set_name} {address_text(self.net)}"


def error_text(err: int) -> str:
    """A kernel answer (``-errno``, or an ipset error code) in words."""
    code = -err
    if code in IPSET_ERRORS:
        return IPSET_ERRORS[code]
    if code >= IPSET_ERR_PRIVATE:
        return f"ipset error {code}"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


# ---- encoding -------------------------------------------------------------------------


def _name(set_name: str) -> bytes:
    raw = set_name.encode()
    if not raw or len(raw) >= IPSET_MAXNAMELEN or not set_name.isprintable() or " " in set_name:
        raise ApplyError(f"invalid ipset name {set_name!r}")
    return attr(IPSET_ATTR_SETNAME, raw + b"\0")


def _request(cmd: int, seq: int, body: bytes) -> bytes:
    head = attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
    return message((NFNL_SUBSYS_IPSET << 8) | cmd, NLM_F_REQUEST | NLM_F_ACK, seq, AF_INET, 0, head + body)


def element_message(cmd: int, set_name: str, net: IPNetwork, seq: int) -> bytes:
    """One ``IPSET_CMD_ADD``/``IPSET_CMD_DEL`` of ``net`` (an address with its prefix length)."""
    kind = IPSET_ATTR_IPADDR_IPV4 if net.version == 4 else IPSET_ATTR_IPADDR_IPV6
    ip = nest(IPSET_ATTR_IP, attr(kind | NLA_F_NET_BYTEORDER, net.network_address.packed))
    data = nest(IPSET_ATTR_DATA, ip, attr(IPSET_ATTR_CIDR, bytes([net.prefixlen])))
    return _request(cmd, seq, _name(set_name) + data)


def header_message(set_name: str, seq: int) -> bytes:
    return _request(IPSET_CMD_HEADER, seq, _name(set_name))


def protocol_message(seq: int) -> bytes:
    return _request(IPSET_CMD_PROTOCOL, seq, b"")


def elements(changes: Sequence[SetChange]) -> list[_Element]:
    """Every element message of ``changes``: all deletions, then all additions (a merge that
    replaces a member by an overlapping one is then legal); ``/0`` as two ``/1`` halves."""
    out = [_Element(IPSET_CMD_DEL, c.set_name, m) for c in changes for m in ipset_members(c.delete)]
    out += [_Element(IPSET_CMD_ADD, c.set_name, m) for c in changes for m in ipset_members(c.add)]
    family = {c.set_name: c.family for c in changes}
    for e in out:
        if e.net.version != family[e.set_name].value:
            raise ApplyError(f"{e.describe()}: an IPv{e.net.version} member for an IPv{family[e.set_name].value} set")
    return out


# ---- the socket ----------------------------------------------------------------------


class IpsetNetlink:
    """A reusable netlink channel to the ipset subsystem of one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        try:
            self._sock = open_socket(netns)
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 1 << 20)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20)
        except OSError as exc:
            raise ApplyError(f"cannot open an ipset netlink socket in {netns or 'this namespace'}: {exc}") from exc
        self._seq = 1
        self._finalizer = weakref.finalize(self, self._sock.close)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> IpsetNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- exchange ----------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _exchange(self, requests: list[tuple[int, bytes]]) -> dict[int, list[Reply]]:
        """Send ``(seq, message)`` requests in one ``sendmsg``; every reply, by request, once each
        request is acknowledged (or refused)."""
        try:
            self._sock.sendall(b"".join(m for _, m in requests))
        except OSError as exc:
            raise ApplyError(f"ipset netlink request not sent: {exc}") from exc
        pending = {seq for seq, _ in requests}
        replies: dict[int, list[Reply]] = {seq: [] for seq in pending}
        self._sock.settimeout(TIMEOUT_S)
        try:
            while pending:
                for reply in parse_replies(self._sock.recv(1 << 20)):
                    if reply.seq in replies:
                        replies[reply.seq].append(reply)
                        if reply.msg_type == NLMSG_ERROR:
                            pending.discard(reply.seq)
        except TimeoutError as exc:
            raise ApplyError("the kernel did not answer an ipset netlink request") from exc
        except OSError as exc:
            raise ApplyError(f"ipset netlink answer lost: {exc}") from exc
        finally:
            self._sock.settimeout(None)
        return replies

    @staticmethod
    def _error(replies: list[Reply]) -> int:
        return next((r.error for r in replies if r.msg_type == NLMSG_ERROR), 0)

    def probe(self) -> int:
        """The kernel's ipset protocol version; ApplyError when it refuses the request."""
        seq = self._next_seq()
        replies = self._exchange([(seq, protocol_message(seq))])[seq]
        err = self._error(replies)
        if err:
            raise ApplyError(f"the kernel refuses ipset over netlink: {error_text(err)}")
        for r in replies:
            if r.msg_type != NLMSG_ERROR:
                value = parse_attrs(r.payload[4:]).get(IPSET_ATTR_PROTOCOL)
                if value:
                    return value[0]
        raise ApplyError("the kernel answered the ipset protocol request without a version")

    def check_sets(self, changes: Sequence[SetChange]) -> None:
        """ApplyError naming the first set that is missing or not a ``hash:net`` of its family."""
        requests = [(seq, header_message(c.set_name, seq)) for c in changes for seq in (self._next_seq(),)]
        replies = self._exchange(requests)
        for (seq, _), c in zip(requests, changes, strict=True):
            err = self._error(replies[seq])
            if err:
                what = "does not exist" if err == -errno.ENOENT else f"cannot be read: {error_text(err)}"
                raise ApplyError(f"ipset {c.set_name} {what} (nothing changed)")
            header = next((parse_attrs(r.payload[4:]) for r in replies[seq] if r.msg_type != NLMSG_ERROR), {})
            type_name = header.get(IPSET_ATTR_TYPENAME, b"").rstrip(b"\0")
            family = header.get(IPSET_ATTR_FAMILY, b"\0")[0]
            if type_name != SET_TYPE or family != NFPROTO[c.family]:
                family_name = {2: "inet", 10: "inet6"}.get(family, str(family))
                raise ApplyError(
                    f"ipset {c.set_name} is {type_name.decode(errors='replace')} family {family_name}, "
                    f"expected hash:net for IPv{c.family.value} (nothing changed)"
                )

    def change(self, changes: Sequence[SetChange]) -> None:
        """Delete then add every element of ``changes``; ApplyError leaves the sets as they were."""
        changes = [c for c in changes if c.add or c.delete]
        if not changes:
            return
        todo = elements(changes)
        self.check_sets(list({c.set_name: c for c in changes}.values()))
        done: list[_Element] = []  # the messages that changed a set, in order
        for chunk in _chunks(todo, MESSAGES_PER_SEND):
            requests = [(self._next_seq(), e) for e in chunk]
            replies = self._exchange([(seq, element_message(e.cmd, e.set_name, e.net, seq)) for seq, e in requests])
            failed: list[str] = []
            for seq, e in requests:
                err = self._error(replies[seq])
                if err == 0:
                    done.append(e)
                elif err != -IPSET_ERR_EXIST:
                    failed.append(f"{e.describe()}: {error_text(err)}")
            if failed:
                undo = self._undo(done)
                raise ApplyError("the kernel refused an ipset change (" + undo + "): " + "; ".join(failed[:5]))

    def _undo(self, done: list[_Element]) -> str:
        """Reverse the element changes that took effect; a phrase saying how that went."""
        if not done:
            return "nothing had changed"
        reverse = [
            _Element(IPSET_CMD_ADD if e.cmd == IPSET_CMD_DEL else IPSET_CMD_DEL, e.set_name, e.net)
            for e in reversed(done)
        ]
        problems: list[str] = []
        for chunk in _chunks(reverse, MESSAGES_PER_SEND):
            requests = [(self._next_seq(), e) for e in chunk]
            replies = self._exchange([(seq, element_message(e.cmd, e.set_name, e.net, seq)) for seq, e in requests])
            problems += [
                f"{e.describe()}: {error_text(err)}"
                for seq, e in requests
                if (err := self._error(replies[seq])) not in (0, -IPSET_ERR_EXIST)
            ]
        if problems:
            return "UNDO FAILED, the sets are partly changed: " + "; ".join(problems[:5])
        return f"{len(done)} element change(s) undone, the sets are as before"


def _chunks(items: list[_Element], size: int) -> Iterator[list[_Element]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
