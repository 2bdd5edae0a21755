"""The netfilter netlink wire format both kernel-direct paths share (nf_tables sets and ipsets).

Two backends talk to netfilter without a userspace binary: the nftables backend sends its
set-element batches (:mod:`stockade.backends.nftables.netlink`), the iptables backend its
ipset element changes (:mod:`stockade.backends.iptables.ipset_netlink`). Both speak
``NETLINK_NETFILTER``: a 16-byte ``nlmsghdr``, a 4-byte ``nfgenmsg`` (family, version,
big-endian resource id), then type-length-value attributes padded to 4 bytes. This module
holds that encoding, the parser of the kernel's answers and the socket opened in a named
network namespace; what each subsystem puts in its messages stays with its backend.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from stockade.backends.common import in_netns
from stockade.errors import BackendError

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7  # nf_tables' multicast group: every change, as nft monitor hears it
NFT_NEWGEN = (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWGEN: the end of each transaction
NFTA_GEN_PROC_PID = 2  # its attribute: the id of the thread that committed (big-endian u32)
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: length, type, payload, padding to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    """A nested attribute holding ``parts``."""
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def message(msg_type: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    """One netfilter netlink message: header, nfgenmsg (res_id big-endian), attributes."""
    payload = struct.pack("!BBH", family, 0, res_id) + body
    return HEADER.pack(16 + len(payload), msg_type, flags, seq, 0) + payload


@dataclass(frozen=True)
class Reply:
    """One message the kernel sent: its type, the sequence number it answers, its payload
    (for NLMSG_ERROR: the error code, ``-errno`` or 0 for an ack, in ``error``)."""

    msg_type: int
    seq: int
    payload: bytes
    error: int = 0


def parse_replies(data: bytes) -> Iterator[Reply]:
    """The messages in one ``recv``. An NLMSG_ERROR carries the error and, after it, the header
    of the request it answers: its ``seq`` is the request's (with NETLINK_CAP_ACK nothing more)."""
    off = 0
    while off + 16 <= len(data):
        length, msg_type, _flags, seq, _pid = HEADER.unpack_from(data, off)
        if length < 16:
            break
        if msg_type == NLMSG_ERROR and length >= 36:
            (err,) = struct.unpack_from("=i", data, off + 16)
            (orig_seq,) = struct.unpack_from("=I", data, off + 20 + 8)
            yield Reply(msg_type, orig_seq, b"", err)
        else:
            yield Reply(msg_type, seq, data[off + 16 : off + length])
        off += (length + 3) & ~3


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes of a payload (type without the nested/byte-order flags -> value)."""
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = data[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def open_socket(netns: str | None) -> socket.socket:
    """A NETLINK_NETFILTER socket in ``netns`` (``/run/netns/<netns>``) or the current namespace."""
    return in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))


def parse_acks(data: bytes) -> Iterator[tuple[int, int]]:
    """(sequence number of the acknowledged request, -errno or 0) for each NLMSG_ERROR."""
    for reply in parse_replies(data):
        if reply.msg_type == NLMSG_ERROR:
            yield reply.seq, reply.error


def dump_payloads(sock: socket.socket, seq: int, what: str,
                  empty: tuple[int, ...] = ()) -> Iterator[bytes]:
    """The payloads (after the 16-byte ``nlmsghdr``) of the answers to dump request ``seq`` sent on
    ``sock``, until the kernel's NLMSG_DONE. Any netlink family's dump (ctnetlink, sock_diag) has
    this framing. An error in ``empty`` (errno values) ends the dump as empty; any other raises
    BackendError naming ``what``."""
    while True:
        data = sock.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, got, _pid = HEADER.unpack_from(data, off)
            if length < 16:
                raise BackendError(f"{what} dump: malformed netlink message")
            if got == seq:
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err == 0 or -err in empty:
                        return
                    raise BackendError(f"{what} dump refused: {os.strerror(-err)}")
                yield data[off + 16 : off + length]
            off += (length + 3) & ~3
