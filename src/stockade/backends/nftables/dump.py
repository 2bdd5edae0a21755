"""Read one nf_tables table back from the kernel over netlink: its chains, rules, sets and elements.

Why: ``nft -j list table`` (nftables 1.0.6) at 1,000 host rules (155k kernel rules in the
lookup layout) costs ~8.6 s CPU, most of it in the kernel, and the 40 MB of JSON then cost
our parser another ~4 s. Measured on kernel 6.18: one ``NLM_F_DUMP`` of every rule of a table
is *quadratic* in the kernel (each 32 KiB continuation re-walks the table from the start to
skip what it already sent: 155k rules, 1,667 continuations, 5.2 s system time), while one
dump per chain keeps every skip inside a small chain (0.2 s for the same 155k rules). So this
module asks for the table, its chains (one dump), its sets and maps (one dump), each set's
elements (one dump per set), each chain's rules (one dump per chain) and the table's stateful
objects and flowtables (one dump each: the proof refuses a table that has any). No text is
produced or parsed: the messages' attributes are handed, undecoded, to the read-back
(:mod:`stockade.verify.nft_netlink`), which decodes only what Stockade's renderer emits and
refuses the rest.

A socket is bound to the network namespace it was created in (see :mod:`.netlink`).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from stockade.backends.nfnetlink import (
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    attr,
    message,
    open_socket,
)
from stockade.backends.nftables.netlink import _NAME_RE, NFNL_SUBSYS_NFTABLES, NFPROTO_INET
from stockade.errors import BackendError

NLM_F_DUMP = 0x300
NFT_MSG_GETTABLE = 1
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_GETSETELEM = 13
NFT_MSG_GETOBJ = 19
NFT_MSG_GETFLOWTABLE = 23
NFTA_TABLE_NAME = 1  # also NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_OBJ_TABLE ...
NFTA_RULE_CHAIN = 2
NFTA_SET_ELEM_LIST_SET = 2
NFTA_CHAIN_NAME = 3
NFTA_SET_NAME = 2

Attrs = dict[int, bytes]


def attrs(buf: bytes, off: int = 0, end: int | None = None) -> Attrs:
    """The netlink attributes of ``buf[off:end]`` by type (nested/byte-order flags cleared)."""
    out: Attrs = {}
    end = len(buf) if end is None else end
    unpack = struct.unpack_from
    while off + 4 <= end:
        length, kind = unpack("=HH", buf, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def attr_list(buf: bytes) -> list[tuple[int, bytes]]:
    """The attributes of ``buf`` in order, repeats kept (lists of elements, expressions)."""
    out: list[tuple[int, bytes]] = []
    off, end = 0, len(buf)
    unpack = struct.unpack_from
    while off + 4 <= end:
        length, kind = unpack("=HH", buf, off)
        if length < 4:
            break
        out.append((kind & 0x3FFF, buf[off + 4 : off + length]))
        off += (length + 3) & ~3
    return out


@dataclass(frozen=True)
class TableDump:
    """The undecoded attributes of every object of one ``inet`` table."""

    table: Attrs
    chains: tuple[Attrs, ...]
    rules: tuple[tuple[str, tuple[bytes, ...]], ...]  # per chain: its name, its rule messages in order
    sets: tuple[Attrs, ...]
    elements: dict[str, tuple[bytes, ...]]  # set name -> its NFTA_SET_ELEM_LIST_ELEMENTS payloads
    objects: int  # stateful objects (counters, quotas, limits ...) in the table
    flowtables: int


class _Dumper:
    def __init__(self, netns: str | None, sock: socket.socket | None = None) -> None:
        self.own = sock is None
        try:
            if sock is None:
                sock = open_socket(netns)
                sock.bind((0, 0))
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
            self.sock = sock
        except OSError as exc:
            raise BackendError(f"cannot open nf_tables netlink socket in {netns or 'this namespace'}: {exc}") from exc
        self.seq = 1 << 30  # apart from the sequence numbers of batches on a shared socket

    def request(self, msg: int, body: bytes, dump: bool = True) -> list[bytes] | None:
        """The payloads (after the nfgenmsg) of the answers; None when the kernel says ENOENT."""
        self.seq += 1
        seq = self.seq
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        self.sock.send(message((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, NFPROTO_INET, 0, body))
        out: list[bytes] = []
        unpack = struct.unpack_from
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, got_seq, _pid = unpack("=IHHII", data, off)
                if length < 16:
                    raise BackendError("nf_tables dump: malformed netlink message")
                if got_seq == seq:
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        (err,) = unpack("=i", data, off + 16)
                        if err == 0 and not dump:
                            return out
                        if -err == errno.ENOENT:
                            return None
                        raise BackendError(f"nf_tables dump refused: {os.strerror(-err)}")
                    out.append(data[off + 20 : off + length])
                    if not dump:
                        return out
                off += (length + 3) & ~3

    def close(self) -> None:
        if self.own:
            self.sock.close()


def dump_table(table: str, netns: str | None = None, sock: socket.socket | None = None) -> TableDump | None:
    """Everything of ``inet <table>`` as the kernel holds it, or None when there is no such table.
    ``sock``: a NETLINK_NETFILTER socket of that namespace to use (and keep open) instead of a new one
    (closing a socket right after a transaction that deleted a table waits for nf_tables' deferred
    destroy work: 7-25 ms measured)."""
    if not _NAME_RE.match(table):
        raise BackendError(f"invalid nftables name {table!r}")
    name = attr(NFTA_TABLE_NAME, table.encode() + b"\0")
    d = _Dumper(netns, sock)
    try:
        found = d.request(NFT_MSG_GETTABLE, name, dump=False)
        if not found:
            return None
        chains = d.request(NFT_MSG_GETCHAIN, name) or []
        chain_attrs = tuple(attrs(c) for c in chains)
        rules: list[tuple[str, tuple[bytes, ...]]] = []
        for c in chain_attrs:  # one dump per chain: see the module docstring
            chain = c.get(NFTA_CHAIN_NAME, b"")
            msgs = d.request(NFT_MSG_GETRULE, name + attr(NFTA_RULE_CHAIN, chain)) or []
            rules.append((chain.rstrip(b"\0").decode(), tuple(msgs)))
        set_attrs = tuple(attrs(s) for s in d.request(NFT_MSG_GETSET, name) or ())
        elements: dict[str, tuple[bytes, ...]] = {}
        for s in set_attrs:
            set_name = s.get(NFTA_SET_NAME, b"")
            msgs = d.request(NFT_MSG_GETSETELEM, name + attr(NFTA_SET_ELEM_LIST_SET, set_name)) or []
            elements[set_name.rstrip(b"\0").decode()] = tuple(attrs(m).get(3, b"") for m in msgs)
        objects = len(d.request(NFT_MSG_GETOBJ, name) or ())
        flowtables = len(d.request(NFT_MSG_GETFLOWTABLE, name) or ())
    except OSError as exc:
        raise BackendError(f"nf_tables dump of {table} failed: {exc}") from exc
    finally:
        d.close()
    return TableDump(attrs(found[0]), chain_attrs, tuple(rules), set_attrs, elements, objects, flowtables)
