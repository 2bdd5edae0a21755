"""ipsets read back over netlink (one ``IPSET_CMD_LIST`` dump), strictly, with their ranges kept between proofs.

Why: ``ipset save`` formats every member as text (~1 s for 500,000 members at 1,000 rules x
100,000 peers) and parsing that text back costs another 0.7-2 s; the kernel's dump of the same
sets is ~12 MB of fixed-shape attributes. Protocol (``include/uapi/linux/netfilter/ipset/ip_set.h``,
subsystem ``NFNL_SUBSYS_IPSET``): a dump request ``IPSET_CMD_LIST`` carrying ``IPSET_ATTR_PROTOCOL``
is answered per set by one or more messages with ``IPSET_ATTR_SETNAME``; the set's first message
also carries ``IPSET_ATTR_TYPENAME``, ``_FAMILY``, ``_REVISION`` and the header (``IPSET_ATTR_DATA``:
hash size, element count ...); every message carries members in ``IPSET_ATTR_ADT``, one
``IPSET_ATTR_DATA`` nest per member: ``IPSET_ATTR_IP`` (nesting ``IPSET_ATTR_IPADDR_IPV4``/``_IPV6``)
and ``IPSET_ATTR_CIDR``.

What is modelled, as :func:`~.ipt_readback.parse_ipset_save` models the text: ``hash:net`` and
``hash:ip`` sets of ``inet``/``inet6`` whose members are plain addresses/networks. A set with
anything else (a header option such as ``timeout``, ``netmask``, ``forceadd``, counters or
comments; a member with ``nomatch``, a timeout, a comment; an attribute this reader does not know)
is kept out of the result with its reason: a rule that uses it is refused
(:class:`~stockade.errors.UnmodelledConstructError`), never proven.

Decoding: a set whose members all have the plain shape (24 bytes for IPv4, 36 for IPv6, checked by
one regular expression over the whole attribute) is unpacked with ``struct.iter_unpack``; any other
goes through the general attribute walk (:func:`_members_slow`), and the two are tested equal.

Between proofs (:class:`RangeCache`): a set's ranges are keyed by a digest of its type, family and
member bytes as dumped; the same bytes give the same :class:`~.loaded.AddressSet` object again, so a
periodic re-proof of unchanged sets decodes nothing (and the prover sees the identical object).
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from stockade.backends.iptables.ipset_netlink import (
    IPSET_ATTR_CIDR,
    IPSET_ATTR_DATA,
    IPSET_ATTR_FAMILY,
    IPSET_ATTR_IP,
    IPSET_ATTR_IPADDR_IPV4,
    IPSET_ATTR_IPADDR_IPV6,
    IPSET_ATTR_PROTOCOL,
    IPSET_ATTR_SETNAME,
    IPSET_ATTR_TYPENAME,
    IPSET_PROTOCOL,
    NFNL_SUBSYS_IPSET,
)
from stockade.backends.nfnetlink import (
    NLA_TYPE_MASK,
    NLM_F_REQUEST,
    SO_RCVBUFFORCE,
    attr,
    dump_payloads,
    message,
    open_socket,
)
from stockade.errors import BackendError, ProofError
from stockade.model.addresses import Family, Range
from stockade.verify.ipt_readback import merged_ranges
from stockade.verify.loaded import AddressSet

IPSET_CMD_LIST = 7
IPSET_ATTR_REVISION = 4
IPSET_ATTR_ADT = 8
NLM_F_DUMP = 0x300
AF_INET = 2
NFPROTO_FAMILY = {2: Family.V4, 10: Family.V6}
MODELLED_TYPES = (b"hash:net", b"hash:ip")
# header (IPSET_ATTR_DATA of a set's first message) attributes that change no member's meaning:
# INITVAL, HASHSIZE, MAXELEM, BUCKETSIZE, ELEMENTS, REFERENCES, MEMSIZE
BENIGN_HEADER = frozenset({17, 18, 19, 21, 24, 25, 26})
TOP_LEVEL = frozenset({IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_TYPENAME, IPSET_ATTR_REVISION,
                       IPSET_ATTR_FAMILY, IPSET_ATTR_DATA, IPSET_ATTR_ADT})
_ATTR = struct.Struct("=HH")

# one plain member: DATA{ IP{ IPADDR }, CIDR } (the address attribute with or without the byte-order flag)
_PLAIN = {
    Family.V4: (re.compile(rb"(?:\x18\x00\x07\x80\x0c\x00\x01\x80\x08\x00\x01[\x00\x40].{4}"
                           rb"\x05\x00\x03\x00.\x00\x00\x00)*", re.S), struct.Struct("!12xI4xB3x")),
    Family.V6: (re.compile(rb"(?:\x24\x00\x07\x80\x18\x00\x01\x80\x14\x00\x02[\x00\x40].{16}"
                           rb"\x05\x00\x03\x00.\x00\x00\x00)*", re.S), struct.Struct("!12xQQ4xB3x")),
}
_BITS = {Family.V4: 32, Family.V6: 128}
_MASKS = {f: [((1 << b) - 1) ^ ((1 << (b - p)) - 1) for p in range(b + 1)] for f, b in _BITS.items()}
NAMESPACES_KEPT = 32  # a node agent's pods each have one: bound what is kept
_HOSTS = {f: [(1 << (b - p)) - 1 for p in range(b + 1)] for f, b in _BITS.items()}


@dataclass
class SetDump:
    """One set as the kernel dumped it: header attributes and the member bytes of every message."""

    name: str
    type_name: bytes = b""
    family: int = 0
    header: dict[int, bytes] = field(default_factory=dict)
    adt: list[bytes] = field(default_factory=list)
    unknown: set[int] = field(default_factory=set)  # top-level attributes not understood


class Unmodelled(Exception):
    """A set this reader does not model (internal: the set is left out, with the reason)."""


def _attrs(data: bytes | memoryview) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    off = 0
    while off + 4 <= len(data):
        length, kind = _ATTR.unpack_from(data, off)
        if length < 4 or off + length > len(data):
            raise Unmodelled(f"malformed attribute at offset {off}")
        out.append((kind & NLA_TYPE_MASK, bytes(data[off + 4 : off + length])))
        off += (length + 3) & ~3
    if off < len(data) and any(data[off:]):
        raise Unmodelled("trailing bytes")
    return out


def parse_dump(payloads: Iterable[bytes]) -> dict[str, SetDump]:
    """The sets of a ``IPSET_CMD_LIST`` dump (its message payloads, each after the nlmsghdr), by name."""
    sets: dict[str, SetDump] = {}
    for payload in payloads:
        top: dict[int, bytes] = {}
        off = 4  # nfgenmsg
        unknown: set[int] = set()
        adt = b""
        while off + 4 <= len(payload):
            length, kind = _ATTR.unpack_from(payload, off)
            if length < 4 or off + length > len(payload):
                raise ProofError("ipset dump: malformed attribute")
            kind &= NLA_TYPE_MASK
            value = payload[off + 4 : off + length]
            if kind == IPSET_ATTR_ADT:
                adt = value
            elif kind in TOP_LEVEL:
                top[kind] = value
            else:
                unknown.add(kind)
            off += (length + 3) & ~3
        raw_name = top.get(IPSET_ATTR_SETNAME)
        if raw_name is None:
            raise ProofError("ipset dump: a message without a set name")
        name = raw_name.split(b"\0", 1)[0].decode(errors="replace")
        dump = sets.setdefault(name, SetDump(name))
        dump.unknown |= unknown
        if IPSET_ATTR_TYPENAME in top:
            dump.type_name = top[IPSET_ATTR_TYPENAME].split(b"\0", 1)[0]
            dump.family = top.get(IPSET_ATTR_FAMILY, b"\0")[0]
            dump.header = dict(_attrs(top.get(IPSET_ATTR_DATA, b"")))
        if adt:
            dump.adt.append(adt)
    return sets


def _members_fast(adt: bytes, family: Family) -> list[Range] | None:
    """The ranges of ``adt`` when every member has the plain shape, else None."""
    pattern, layout = _PLAIN[family]
    if pattern.fullmatch(adt) is None:
        return None
    masks, hosts = _MASKS[family], _HOSTS[family]
    try:
        if family is Family.V4:
            return [(a & masks[c], a | hosts[c]) for a, c in layout.iter_unpack(adt)]
        return [(((h << 64) | lo) & masks[c], ((h << 64) | lo) | hosts[c]) for h, lo, c in layout.iter_unpack(adt)]
    except IndexError:  # a prefix length over the family's bits
        return None


def _members_slow(adt: bytes, family: Family) -> list[Range]:
    """The ranges of ``adt`` through the general attribute walk; Unmodelled on anything else."""
    bits = _BITS[family]
    addr_kind = IPSET_ATTR_IPADDR_IPV4 if family is Family.V4 else IPSET_ATTR_IPADDR_IPV6
    out: list[Range] = []
    for kind, data in _attrs(adt):
        if kind != IPSET_ATTR_DATA:
            raise Unmodelled(f"member container attribute {kind}")
        value: int | None = None
        prefix = bits
        for inner, payload in _attrs(data):
            if inner == IPSET_ATTR_IP:
                addrs = _attrs(payload)
                if len(addrs) != 1 or addrs[0][0] != addr_kind or len(addrs[0][1]) != bits // 8:
                    raise Unmodelled("a member address of another shape")
                value = int.from_bytes(addrs[0][1], "big")
            elif inner == IPSET_ATTR_CIDR and len(payload) == 1:
                prefix = payload[0]
            else:  # nomatch (CADT_FLAGS), timeout, counters, comment, skbinfo ...
                raise Unmodelled(f"member attribute {inner}")
        if value is None or not 0 <= prefix <= bits:
            raise Unmodelled("a member without an address or with a bad prefix")
        host = (1 << (bits - prefix)) - 1
        out.append((value & ~host, value | host))
    return out


def decode(dump: SetDump) -> AddressSet:
    """One set's members as merged ranges; Unmodelled for a set outside the model."""
    if dump.unknown:
        raise Unmodelled(f"attributes {sorted(dump.unknown)}")
    if dump.type_name not in MODELLED_TYPES:
        raise Unmodelled(f"type {dump.type_name.decode(errors='replace')!r}")
    family = NFPROTO_FAMILY.get(dump.family)
    if family is None:
        raise Unmodelled(f"family {dump.family}")
    odd = sorted(set(dump.header) - BENIGN_HEADER)
    if odd:  # timeout, netmask, cadt flags (counters, comment, forceadd), markmask ...
        raise Unmodelled(f"header attributes {odd}")
    ranges: list[Range] = []
    for adt in dump.adt:
        fast = _members_fast(adt, family)
        ranges += fast if fast is not None else _members_slow(adt, family)
    return AddressSet(family, merged_ranges(ranges))


def digest(dump: SetDump) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    h.update(dump.type_name + b"\0" + bytes([dump.family]) + repr(sorted(dump.header)).encode() + b"\0")
    h.update(repr(sorted(dump.unknown)).encode())
    for adt in dump.adt:
        h.update(struct.pack("=I", len(adt)))
        h.update(adt)
    return h.digest()


@dataclass(frozen=True)
class IpsetReadback:
    """The modelled sets by name, the left-out ones with the reason, and every set's name in the
    kernel's (index) order: an ``-m set`` rule holds its set's index, not its name."""

    sets: dict[str, AddressSet]
    unmodelled: dict[str, str]
    order: tuple[str, ...] = ()


class RangeCache:
    """Decoded sets of the last read-back per network namespace, by digest of their dump: a set
    whose bytes did not change is not decoded again (only the latest read-back is kept, for the
    :data:`NAMESPACES_KEPT` namespaces read most recently)."""

    def __init__(self) -> None:
        self._by_netns: dict[str | None, dict[bytes, AddressSet]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def decode(self, netns: str | None, dumps: dict[str, SetDump]) -> IpsetReadback:
        with self._lock:
            old = self._by_netns.get(netns, {})
        new: dict[bytes, AddressSet] = {}
        sets: dict[str, AddressSet] = {}
        unmodelled: dict[str, str] = {}
        for name, dump in dumps.items():
            key = digest(dump)
            hit = old.get(key) or new.get(key)
            if hit is not None:
                self.hits += 1
                sets[name] = new[key] = hit
                continue
            try:
                sets[name] = new[key] = decode(dump)
                self.misses += 1
            except Unmodelled as exc:
                unmodelled[name] = str(exc)
        with self._lock:
            self._by_netns.pop(netns, None)
            self._by_netns[netns] = new
            while len(self._by_netns) > NAMESPACES_KEPT:
                del self._by_netns[next(iter(self._by_netns))]
        return IpsetReadback(sets, unmodelled, tuple(dumps))


def dump_request(seq: int) -> bytes:
    return message((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST, NLM_F_REQUEST | NLM_F_DUMP, seq, AF_INET, 0,
                   attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL])))


def dump_sets(netns: str | None = None) -> dict[str, SetDump]:
    """Every set of ``netns`` (None: this namespace) as the kernel lists it."""
    try:
        sock = open_socket(netns)
    except OSError as exc:
        raise ProofError(f"cannot open a netlink socket in {netns or 'this namespace'}: {exc}") from exc
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
            sock.bind((0, 0))
            sock.settimeout(10.0)
            sock.sendall(dump_request(1))
            return parse_dump(dump_payloads(sock, 1, "ipset list"))
        except (OSError, BackendError) as exc:
            raise ProofError(f"cannot list ipsets in {netns or 'this namespace'}: {exc}") from exc


def read_ipsets(netns: str | None = None, cache: RangeCache | None = None) -> IpsetReadback:
    """The ipsets of ``netns``, decoded (through ``cache`` when given)."""
    return (cache or RangeCache()).decode(netns, dump_sets(netns))
