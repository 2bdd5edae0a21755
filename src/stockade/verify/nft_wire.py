"""The wire format of nf_tables netlink attributes, as the dump decoder (:mod:`.nft_netlink`) reads it.

Constants (set flags, nft datatype numbers, hooks, verdict codes, meta and ct keys), the small
pure decoders of attribute payloads (integers, strings, verdicts, registers, rule comments) and
the decoding of a set's dumped elements into merged integer ranges. Every unexpected shape is
refused with :class:`~stockade.errors.UnmodelledConstructError`, as in the decoder itself.
"""

from __future__ import annotations

import struct
from typing import Any

from stockade.backends.nftables.dump import attr_list, attrs
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family, Range, merge_ranges
from stockade.verify.loaded import Addr, Kind, Verdict

# set flags, key types (nft's datatype numbers), hooks, verdict codes
SET_ANONYMOUS, SET_INTERVAL, SET_MAP = 0x1, 0x4, 0x8
TYPE_BITS = 6
TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE = 7, 8, 12, 13
DATA_VERDICT = 0xFFFFFF00
_HOOKNUMS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting", 5: "ingress"}
_VERDICT_CODES = {1: Kind.ACCEPT, 0: Kind.DROP, -5: Kind.RETURN, -3: Kind.JUMP, -4: Kind.GOTO}
_META_NAMES = {
    0: "len", 1: "protocol", 2: "priority", 3: "mark", 4: "iif", 5: "oif", 6: "iifname", 7: "oifname",
    8: "iiftype", 9: "oiftype", 10: "skuid", 11: "skgid", 12: "nftrace", 13: "rtclassid", 14: "secmark",
    15: "nfproto", 16: "l4proto", 17: "bri_iifname", 18: "bri_oifname", 19: "pkttype", 20: "cpu",
    21: "iifgroup", 22: "oifgroup", 23: "cgroup", 24: "prandom", 25: "secpath", 26: "iifkind", 27: "oifkind",
}  # fmt: skip
_CT_NAMES = {0: "state", 1: "direction", 2: "status", 3: "mark", 4: "secmark", 5: "expiration", 6: "helper",
             7: "l3protocol", 8: "saddr", 9: "daddr", 10: "protocol", 11: "proto-src", 12: "proto-dst",
             13: "labels", 14: "pkts", 15: "bytes", 16: "avgpkt", 17: "zone", 18: "eventmask"}  # fmt: skip
_CT_STATE_BITS = {1: "invalid", 2: "established", 4: "related", 8: "new", 64: "untracked"}
_CMP_OPS = {0: "==", 1: "!=", 2: "<", 3: "<=", 4: ">", 5: ">="}
META_NFPROTO, META_L4PROTO, META_IIF, META_OIF, META_IIFNAME, META_OIFNAME = 15, 16, 4, 5, 6, 7
META_MARK, CT_MARK = 3, 3
_ADDR_FIELDS = {
    (Family.V4, 12, 4): Addr.SADDR, (Family.V4, 16, 4): Addr.DADDR,
    (Family.V6, 8, 16): Addr.SADDR, (Family.V6, 24, 16): Addr.DADDR,
}  # fmt: skip


_HEAD = struct.Struct("=HH").unpack_from


def _u32(b: bytes) -> int:
    return int.from_bytes(b[:4], "big")


def _s32(b: bytes) -> int:
    return int(struct.unpack("!i", b[:4])[0])


def _str(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def _value(b: bytes) -> bytes:
    """The NFTA_DATA_VALUE of a nested nft_data attribute."""
    return attrs(b).get(1, b"")


def _verdict(data: bytes, where: str) -> Verdict:
    v = attrs(attrs(data).get(2, b""))  # NFTA_DATA_VERDICT: CODE, CHAIN
    if 1 not in v:
        raise UnmodelledConstructError(where, "data that is not a verdict")
    kind = _VERDICT_CODES.get(_s32(v[1]))
    if kind is None:
        raise UnmodelledConstructError(where, f"verdict code {_s32(v[1])}")
    return Verdict(kind, _str(v[2]) if kind in (Kind.JUMP, Kind.GOTO) else "")


def _slot(reg: int, where: str) -> int:
    """A register as a 32-bit slot (NFT_REG_1..4 are 16 bytes: four slots each)."""
    if 1 <= reg <= 4:
        return (reg - 1) * 4
    if 8 <= reg <= 23:
        return reg - 8
    raise UnmodelledConstructError(where, f"register {reg}")


# A loaded register: ("meta", key) | ("payload", base, offset, length) | ("ct", key)
# | ("masked", inner, mask, xor)
Load = tuple[Any, ...]


def _plain_keys(payload: bytes, key_len: int) -> list[int] | None:
    """The keys of a list of elements that are each nothing but a key (a hash set's host
    addresses: most of a large table's elements), read at a fixed stride; None when some
    element has anything else (flags, timeouts ...): the general decoder then reads it."""
    size = 12 + key_len  # LIST_ELEM { KEY { DATA_VALUE <key> } }
    if not payload or len(payload) % size:
        return None
    head = payload[:12]
    lens = struct.unpack_from("=HHHHHH", head)
    if lens[0] != size or lens[1] & 0x3FFF != 1 or lens[2] != 8 + key_len or lens[3] & 0x3FFF != 1:
        return None
    if lens[4] != 4 + key_len or lens[5] & 0x3FFF != 1:
        return None
    if any(payload[i : i + 12] != head for i in range(size, len(payload), size)):
        return None
    return [int.from_bytes(payload[i + 12 : i + size], "big") for i in range(0, len(payload), size)]


def _ranges(elems: tuple[bytes, ...], key_len: int, flags: int, where: str) -> tuple[Range, ...]:
    """The members of a set's dumped elements as merged integer ranges."""
    points: list[tuple[int, int]] = []  # (value, 0 = interval end | 1 = start)
    spans: list[Range] = []
    for payload in elems:
        if not flags & SET_INTERVAL and key_len in (4, 16):
            keys = _plain_keys(payload, key_len)
            if keys is not None:
                spans += zip(keys, keys, strict=True)
                continue
        for _, elem in attr_list(payload):
            e = attrs(elem)
            key = _value(e.get(1, b""))
            if len(key) != key_len:
                raise UnmodelledConstructError(where, f"element of {len(key)} bytes")
            value = int.from_bytes(key, "big") if key_len != 1 else key[0]
            if 10 in e:  # pipapo: start and end in one element
                spans.append((value, int.from_bytes(_value(e[10]), "big")))
            elif flags & SET_INTERVAL:
                end = _u32(e[3]) & 1 if 3 in e else 0
                points.append((value, 0 if end else 1))
            else:
                spans.append((value, value))
    if points:
        points.sort()
        top = (1 << (8 * key_len)) - 1
        start: int | None = None
        for value, is_start in points:
            if is_start:
                if start is None:
                    start = value
            elif start is not None:
                spans.append((start, value - 1))
                start = None
        if start is not None:
            spans.append((start, top))
    return merge_ranges(spans)


def _intersect(a: tuple[Range, ...], b: tuple[Range, ...]) -> tuple[Range, ...]:
    return merge_ranges((max(x[0], y[0]), min(x[1], y[1])) for x in a for y in b if max(x[0], y[0]) <= min(x[1], y[1]))


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _prefix(mask: int, value: int, length: int, where: str) -> tuple[Range, ...]:
    bits = 8 * length
    ones = bin(mask).count("1")
    if mask != ((1 << ones) - 1) << (bits - ones) or value & ~mask:
        raise UnmodelledConstructError(where, f"address mask {mask:#x}")
    return ((value, value | ((1 << (bits - ones)) - 1)),)


def _describe(load: Load) -> str:
    if load[0] == "meta":
        return f"meta {_META_NAMES.get(load[1], load[1])}"
    if load[0] == "payload":
        return f"payload base {load[1]} offset {load[2]} length {load[3]}"
    if load[0] == "masked":
        return "masked " + _describe(load[1])
    return str(load[0])


def _comment(udata: bytes) -> str:
    off = 0
    while off + 2 <= len(udata):
        kind, length = udata[off], udata[off + 1]
        if kind == 0:  # NFTNL_UDATA_RULE_COMMENT
            return _str(udata[off + 2 : off + 2 + length])
        off += 2 + length
    return ""
