"""Set-element deltas as one nf_tables netlink batch, written directly to a raw socket.

Why: with nftables 1.0.6, ``nft add element`` (CLI or libnftables) first reads every
element of the set back from the kernel, so one-peer deltas cost ~80 ms at 25k elements
and ~0.7 s at 100k. The kernel itself needs none of that: an ``NFT_MSG_NEWSETELEM`` /
``NFT_MSG_DELSETELEM`` message naming the table and set is enough. This module builds an
NFNL batch (``BATCH_BEGIN``, the element messages, ``BATCH_END``) and sends it with one
``sendmsg`` on an ``AF_NETLINK``/``NETLINK_NETFILTER`` socket; the kernel applies it as one
transaction (all or nothing) and answers one ack or error per message.

Encoding of interval sets (what nft itself sends): a CIDR is two elements, its first
address (flags 0) and the address after its last one with ``NFT_SET_ELEM_INTERVAL_END``;
a CIDR reaching the top of the address space has no end element. Deletes go before adds,
so a CIDR replaced by an overlapping one (a merge) is legal within one batch. Deleting a
CIDR the kernel does not hold fails with ENOENT and nothing changes: the caller should then
reload the full ruleset.

The wire format and the socket are :mod:`stockade.backends.nfnetlink`. A socket is bound to
the network namespace it was created in; for ``netns`` it is created by
a worker thread that entered ``/run/netns/<netns>`` (:func:`stockade.backends.common.in_netns`).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from stockade.backends.nfnetlink import (
    NETLINK_CAP_ACK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    attr,
    message,
    nest,
    open_socket,
    parse_acks,
)
from stockade.errors import ApplyError
from stockade.model.addresses import IPNetwork

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFPROTO_UNSPEC = 0
NFPROTO_INET = 1

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 0x1

ELEMENTS_PER_MESSAGE = 1024
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class ElementChange:
    """Members to delete from and add to one set (nft name); ``interval``: a ``flags interval`` set."""

    set_name: str
    interval: bool
    add: tuple[IPNetwork, ...]
    delete: tuple[IPNetwork, ...]


# ---- encoding -------------------------------------------------------------------------


def _key_element(key: bytes) -> bytes:
    return nest(NFTA_LIST_ELEM, nest(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)))


def host_element(net: IPNetwork) -> list[bytes]:
    """The NFTA_LIST_ELEM attribute of one address in a plain (hash) set."""
    if net.prefixlen != net.max_prefixlen:
        raise ApplyError(f"{net} is not a single address; it belongs in an interval set")
    return [_key_element(net.network_address.packed)]


def interval_elements(net: IPNetwork) -> list[bytes]:
    """The NFTA_LIST_ELEM attributes of one CIDR in an interval set."""
    out = [_key_element(net.network_address.packed)]
    end = int(net.broadcast_address) + 1
    if end < 1 << net.max_prefixlen:
        key = end.to_bytes(net.max_prefixlen // 8, "big")
        flags = attr(NFTA_SET_ELEM_FLAGS, struct.pack("!I", NFT_SET_ELEM_INTERVAL_END))
        out.append(nest(NFTA_LIST_ELEM, nest(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)), flags))
    return out


def _element_messages(
    table: str, change: ElementChange, nets: tuple[IPNetwork, ...], msg: int, flags: int
) -> Iterator[tuple[int, int, bytes]]:
    head = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + attr(
        NFTA_SET_ELEM_LIST_SET, change.set_name.encode() + b"\0"
    )
    encode = interval_elements if change.interval else host_element
    for i in range(0, len(nets), ELEMENTS_PER_MESSAGE):
        elems = [e for net in nets[i : i + ELEMENTS_PER_MESSAGE] for e in encode(net)]
        body = head + nest(NFTA_SET_ELEM_LIST_ELEMENTS, *elems)
        yield (NFNL_SUBSYS_NFTABLES << 8) | msg, flags, body


element_messages = _element_messages  # the element messages of one change (for other batches)


def build_batch(table: str, changes: tuple[ElementChange, ...], first_seq: int) -> tuple[bytes, list[int]]:
    """The whole batch and the sequence numbers of its element messages (each asks for an ack)."""
    for name in (table, *(c.set_name for c in changes)):
        if not _NAME_RE.match(name):
            raise ApplyError(f"invalid nftables name {name!r}")
    parts: list[tuple[int, int, bytes]] = []
    for c in changes:
        parts += _element_messages(table, c, c.delete, NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
    for c in changes:
        create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        parts += _element_messages(table, c, c.add, NFT_MSG_NEWSETELEM, create)
    seq = first_seq
    chunks = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")]
    seqs: list[int] = []
    for msg_type, flags, body in parts:
        seq += 1
        seqs.append(seq)
        chunks.append(message(msg_type, flags, seq, NFPROTO_INET, 0, body))
    seq += 1
    chunks.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(chunks), seqs


# ---- the socket ----------------------------------------------------------------------

class NftNetlink:
    """A reusable netlink channel to nf_tables in one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        try:
            self._sock = open_socket(netns)
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError as exc:
            raise ApplyError(f"cannot open nf_tables netlink socket in {netns or 'this namespace'}: {exc}") from exc
        self._seq = 1
        self._sndbuf = 0
        self._finalizer = weakref.finalize(self, self._sock.close)

    @property
    def sock(self) -> socket.socket:
        """The socket (bound to the namespace it was opened in), e.g. for a dump between batches."""
        return self._sock

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> NftNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def change_elements(self, table: str, changes: tuple[ElementChange, ...]) -> None:
        """Apply every delete and add of ``changes`` to ``inet <table>`` as one transaction."""
        changes = tuple(c for c in changes if c.add or c.delete)
        if not changes:
            return
        batch, seqs = build_batch(table, changes, self._seq)
        self._seq = seqs[-1] + 2
        if len(batch) > self._sndbuf:
            self._sndbuf = max(len(batch) * 2, 1 << 20)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self._sndbuf)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._sndbuf)
        try:
            self._sock.sendall(batch)
        except OSError as exc:
            raise ApplyError(f"nf_tables batch not sent: {exc}") from exc
        self._collect_acks(set(seqs), seqs[0] - 1)

    def send_batch(self, parts: list[tuple[int, int, bytes]], what: str = "batch") -> None:
        """Send ``parts`` (nf_tables message type, flags, body; each asks for an ack) as one
        transaction between BATCH_BEGIN and BATCH_END: all of it is in force, or none (ApplyError)."""
        seq = self._seq
        chunks = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")]
        seqs: list[int] = []
        for msg, flags, body in parts:
            seq += 1
            seqs.append(seq)
            chunks.append(message((NFNL_SUBSYS_NFTABLES << 8) | msg, flags | NLM_F_ACK, seq, NFPROTO_INET, 0, body))
        seq += 1
        chunks.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b""))
        self._seq = seq + 1
        batch = b"".join(chunks)
        if len(batch) > self._sndbuf:
            self._sndbuf = max(len(batch) * 2, 1 << 20)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self._sndbuf)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._sndbuf)
        try:
            self._sock.sendall(batch)
        except OSError as exc:
            raise ApplyError(f"nf_tables {what} not sent: {exc}") from exc
        self._collect_acks(set(seqs), seqs[0] - 1 if seqs else seq - 1, what)

    def _collect_acks(self, pending: set[int], begin_seq: int, what: str = "set-element batch") -> None:
        errors: list[str] = []
        self._sock.settimeout(5.0)
        try:
            while pending:
                data = self._sock.recv(1 << 20)
                for seq, err in parse_acks(data):
                    if err:
                        errors.append(f"{errno.errorcode.get(-err, str(-err))} ({os.strerror(-err)})")
                    pending.discard(seq)
                    if seq == begin_seq and err:  # whole batch refused (e.g. commit failed)
                        pending.clear()
        except TimeoutError as exc:
            raise ApplyError(f"nf_tables did not acknowledge the {what}") from exc
        finally:
            self._sock.settimeout(None)
        if errors:
            raise ApplyError(f"nf_tables refused the {what}: " + "; ".join(sorted(set(errors))))

