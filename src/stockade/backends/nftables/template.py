"""A table's netlink image: what ``nft -f`` loaded, as messages to load it again without ``nft``.

A pod's table depends on its policy's *shape* (chains, rules, verdict maps, set declarations)
and on the members of its peer sets; pods with the same labels share the shape. A
:class:`TableTemplate` is the shape as the kernel holds it after ``nft -f`` loaded it: the
dump of the table (:mod:`.dump`) turned back into NEWTABLE / NEWCHAIN / NEWSET / NEWSETELEM /
NEWRULE message bodies, less what the kernel adds (handles, use counts, counters' values). So
nothing here encodes a rule: every expression is nft's own bytecode for that shape, replayed.
:func:`table_batch` makes the one transaction that replaces a table by the template plus an
artifact's peer-set members (encoded as the set deltas are, :mod:`.netlink`).

:func:`canonical` is the read-back both the structural verify and the tamper check compare: one
line per table attribute, set, set element, chain and rule, deterministic for a kernel state
(handles and use counts left out, counters zeroed, the flow-log sets' elements, which the
datapath fills, left out). Pure: nothing here touches a socket or runs a process.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace

from stockade.backends.nfnetlink import NLA_F_NESTED, NLM_F_CREATE, NLM_F_REQUEST, attr, nest
from stockade.backends.nftables.artifact import NftablesArtifact, SetKind
from stockade.backends.nftables.dump import Attrs, TableDump, attr_list, attrs
from stockade.backends.nftables.lookup import FLOWLOG_SETS
from stockade.backends.nftables.netlink import (
    NFT_MSG_NEWSETELEM,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    ElementChange,
    element_messages,
)
from stockade.errors import ApplyError
from stockade.model.addresses import AddressRanges, Range, merge_ranges

NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET = 0, 2, 3, 6, 9
NLM_F_APPEND = 0x800
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_USERDATA = 1, 2, 6
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK = 1, 2, 3, 4
NFTA_CHAIN_USE, NFTA_CHAIN_COUNTERS, NFTA_CHAIN_FLAGS, NFTA_CHAIN_ID = 6, 8, 9, 10
NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_LEN, NFTA_SET_ID, NFTA_SET_PAD, NFTA_SET_HANDLE = 2, 3, 5, 10, 14, 16
NFTA_SET_TYPE, NFTA_SET_COUNT = 19, 20  # dumped only (the kernel's set implementation, element count)
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS, NFTA_RULE_COMPAT = 1, 2, 3, 4, 5
NFTA_RULE_USERDATA = 7
NFTA_LIST_ELEM, NFTA_EXPR_NAME = 1, 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY_END = 1, 3, 10
NFTA_DATA_VALUE = 1
NFT_CHAIN_BASE = 0x1
NFT_SET_INTERVAL, NFT_SET_CONCAT = 0x4, 0x80
NFT_SET_ELEM_INTERVAL_END = 0x1
_NESTED = {"chain": frozenset({NFTA_CHAIN_HOOK, NFTA_CHAIN_COUNTERS}), "set": frozenset({9, 17, 18})}
_CREATE = NLM_F_REQUEST | NLM_F_CREATE
_SET_DROP = frozenset({NFTA_SET_ID, NFTA_SET_PAD, NFTA_SET_HANDLE, NFTA_SET_TYPE, NFTA_SET_COUNT})


def shape_of(artifact: NftablesArtifact) -> NftablesArtifact:
    """``artifact`` without what differs between pods of one shape: its peer sets' members and
    the workload's name (only in the file's comment line)."""
    return replace(artifact, workload="", sets=tuple(replace(s, members=()) for s in artifact.sets))


def shape_key(artifact: NftablesArtifact) -> str:
    """The shape's name: a hash of the text ``nft -f`` loads for :func:`shape_of`."""
    return hashlib.sha256(shape_of(artifact).to_text().encode()).hexdigest()


def _pack(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload) if kind & NLA_F_NESTED else attr(kind, payload)


def _emit(a: Attrs, drop: frozenset[int], nested: frozenset[int] = frozenset()) -> bytes:
    """Attributes of ``a`` (sorted by type) but ``drop``, re-encoded (``nested`` ones flagged so)."""
    return b"".join(_pack(k | (NLA_F_NESTED if k in nested else 0), v) for k, v in sorted(a.items()) if k not in drop)


def _u32(b: bytes) -> int:
    return int(struct.unpack("!I", b[:4])[0]) if len(b) >= 4 else 0


def _name(b: bytes) -> str:
    return b.rstrip(b"\0").decode()


def zero_counters(expressions: bytes) -> bytes:
    """A rule's expression list with every ``counter``'s values left out (a new counter starts at
    0); the other expressions' bytes as they are."""
    if b"counter\0" not in expressions:
        return expressions
    out: list[bytes] = []
    off = 0
    while off + 4 <= len(expressions):
        length, _kind = struct.unpack_from("=HH", expressions, off)
        if length < 4:
            break
        step = (length + 3) & ~3
        expr = attrs(expressions, off + 4, off + length)
        if expr.get(NFTA_EXPR_NAME, b"").rstrip(b"\0") == b"counter":
            out.append(nest(NFTA_LIST_ELEM, attr(NFTA_EXPR_NAME, b"counter\0")))
        else:
            out.append(expressions[off : off + step])
        off += step
    return b"".join(out)


def _elements(payloads: tuple[bytes, ...]) -> list[bytes]:
    """The NFTA_LIST_ELEM payloads of a set's element dumps, sorted (ascending key; at one key an
    interval's end before the next one's start: the order nft sends them in)."""
    def order(elem: bytes) -> tuple[bytes, int, bytes]:
        a = attrs(elem)
        key = attrs(a.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE, b"")
        end = _u32(a.get(NFTA_SET_ELEM_FLAGS, b"")) & NFT_SET_ELEM_INTERVAL_END
        return key, 0 if end else 1, elem

    return sorted((e for p in payloads for _k, e in attr_list(p)), key=order)


@dataclass(frozen=True)
class TableTemplate:
    """One shape of one table as message bodies (see the module docstring)."""

    table: str
    key: str
    table_body: bytes
    chains: tuple[bytes, ...]  # NEWCHAIN bodies, every chain before any rule or map element
    sets: tuple[bytes, ...]  # NEWSET bodies without NFTA_SET_ID (given per batch)
    elements: tuple[tuple[str, tuple[bytes, ...]], ...]  # anonymous sets' and maps' NFTA_LIST_ELEMs
    rules: tuple[bytes, ...]  # NEWRULE bodies, chain by chain, in order
    peer_sets: tuple[str, ...]  # the artifact's address sets: members come from the artifact
    structure: tuple[str, ...]  # canonical() of the template without the peer sets' elements


def template_from_dump(dump: TableDump, artifact: NftablesArtifact) -> TableTemplate:
    """The template of ``artifact``'s shape from the dump of the table ``nft -f`` made of it.
    ApplyError for anything the replay does not carry (stateful objects, flowtables, xtables)."""
    if dump.objects or dump.flowtables:
        raise ApplyError("the table holds stateful objects or flowtables: not replayed over netlink")
    table = artifact.table
    if _name(dump.table.get(NFTA_TABLE_NAME, b"")) != table:
        raise ApplyError("dump is of another table")
    tname = attr(NFTA_TABLE_NAME, table.encode() + b"\0")
    table_body = tname + b"".join(
        attr(k, dump.table[k]) for k in (NFTA_TABLE_FLAGS, NFTA_TABLE_USERDATA) if k in dump.table
    )
    chains: list[bytes] = []
    for c in dump.chains:
        c = dict(c)
        if _u32(c.get(NFTA_CHAIN_FLAGS, b"")) & ~NFT_CHAIN_BASE == 0:
            c.pop(NFTA_CHAIN_FLAGS, None)  # the hook makes a base chain; nft sends no flags
        chains.append(_emit(c, frozenset({NFTA_CHAIN_HANDLE, NFTA_CHAIN_USE, NFTA_CHAIN_COUNTERS, NFTA_CHAIN_ID}),
                            _NESTED["chain"]))
    sets = tuple(_emit(s, _SET_DROP, _NESTED["set"])
                 for s in dump.sets)
    peer_sets = tuple(s.name for s in artifact.sets)
    elements = tuple(
        (name, tuple(_elements(payloads)))
        for name, payloads in sorted(dump.elements.items())
        if name not in peer_sets and name not in FLOWLOG_SETS and payloads
    )
    rules: list[bytes] = []
    for chain, msgs in dump.rules:
        for msg in msgs:
            r = attrs(msg)
            if NFTA_RULE_COMPAT in r:
                raise ApplyError(f"chain {chain}: an xtables-compat rule is not replayed over netlink")
            body = tname + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
            body += nest(NFTA_RULE_EXPRESSIONS, zero_counters(r.get(NFTA_RULE_EXPRESSIONS, b"")))
            if NFTA_RULE_USERDATA in r:
                body += attr(NFTA_RULE_USERDATA, r[NFTA_RULE_USERDATA])
            rules.append(body)
    structure = without_elements(canonical(dump), frozenset(peer_sets))
    return TableTemplate(table, shape_key(artifact), table_body, tuple(chains), sets, elements, tuple(rules),
                         peer_sets, structure)


def table_batch(template: TableTemplate, artifact: NftablesArtifact) -> list[tuple[int, int, bytes]]:
    """The one transaction replacing ``template.table`` by ``artifact`` (``table; delete table;
    definition`` in ``nft -f`` terms): (message type, flags, body) for ``NftNetlink.send_batch``."""
    if shape_key(artifact) != template.key or artifact.table != template.table:
        raise ApplyError("the template is of another shape")
    tname = attr(NFTA_TABLE_NAME, template.table.encode() + b"\0")
    parts: list[tuple[int, int, bytes]] = [
        (NFT_MSG_NEWTABLE, _CREATE, tname),  # so the delete never fails on a namespace without it
        (NFT_MSG_DELTABLE, NLM_F_REQUEST, tname),
        (NFT_MSG_NEWTABLE, _CREATE, template.table_body),
    ]
    parts += [(NFT_MSG_NEWCHAIN, _CREATE, c) for c in template.chains]  # maps' verdicts name chains
    parts += [(NFT_MSG_NEWSET, _CREATE, s + attr(NFTA_SET_ID, struct.pack("!I", i + 1)))
              for i, s in enumerate(template.sets)]
    head = attr(NFTA_SET_ELEM_LIST_TABLE, template.table.encode() + b"\0")
    for name, elems in template.elements:
        for i in range(0, len(elems), 512):
            body = head + attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
            parts.append((NFT_MSG_NEWSETELEM, _CREATE, body + nest(NFTA_SET_ELEM_LIST_ELEMENTS, *(
                nest(NFTA_LIST_ELEM, e) for e in elems[i : i + 512]))))
    for s in artifact.sets:
        change = ElementChange(s.name, s.kind is SetKind.NET, tuple(s.members), ())
        if change.interval and s.members and min(int(m.network_address) for m in s.members) > 0:
            # nft's first load of an interval set starts with an interval end at address 0 (the
            # gap below the first member): sent the same, the kernel holds the same elements
            zero = nest(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, bytes(s.members[0].max_prefixlen // 8)))
            end = nest(NFTA_LIST_ELEM, zero, attr(NFTA_SET_ELEM_FLAGS, struct.pack("!I", NFT_SET_ELEM_INTERVAL_END)))
            body = head + attr(NFTA_SET_ELEM_LIST_SET, s.name.encode() + b"\0")
            parts.append((NFT_MSG_NEWSETELEM, _CREATE, body + nest(NFTA_SET_ELEM_LIST_ELEMENTS, end)))
        parts += [(t & 0xFF, f, b) for t, f, b in element_messages(template.table, change, change.add,
                                                                   NFT_MSG_NEWSETELEM, _CREATE)]
    parts += [(NFT_MSG_NEWRULE, _CREATE | NLM_F_APPEND, r) for r in template.rules]
    return parts


# ---- the read-back both checks compare ---------------------------------------------------------


def without_elements(lines: tuple[str, ...], sets: frozenset[str]) -> tuple[str, ...]:
    """:func:`canonical` lines without the element lines of ``sets``."""
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("  element "):
            if skipping:
                continue
        else:
            skipping = line.startswith("set ") and line.split(" ", 2)[1] in sets
        out.append(line)
    return tuple(out)


def canonical(dump: TableDump) -> tuple[str, ...]:
    """One line per table attribute, set, element, chain and rule of ``dump``: equal for equal
    tables (see the module docstring); the flow-log sets' elements left out."""
    skip = frozenset(FLOWLOG_SETS)
    out = [f"table {_emit(dump.table, frozenset({3, 4, 5, 7})).hex()}"]  # use, handle, pad, owner
    for s in sorted(dump.sets, key=lambda s: s.get(NFTA_SET_NAME, b"")):
        name = _name(s.get(NFTA_SET_NAME, b""))
        out.append(f"set {name} {_emit(s, _SET_DROP).hex()}")
        if name not in skip:
            out += [f"  element {e.hex()}" for e in _elements(dump.elements.get(name, ()))]
    rules = dict(dump.rules)
    for c in sorted(dump.chains, key=lambda c: c.get(NFTA_CHAIN_NAME, b"")):
        name = _name(c.get(NFTA_CHAIN_NAME, b""))
        drop = frozenset({NFTA_CHAIN_HANDLE, NFTA_CHAIN_USE, NFTA_CHAIN_COUNTERS, NFTA_CHAIN_ID})
        out.append(f"chain {name} {_emit(c, drop).hex()}")
        for msg in rules.get(name, ()):
            r = attrs(msg)
            exprs = zero_counters(r.get(NFTA_RULE_EXPRESSIONS, b""))
            out.append(f"  rule {exprs.hex()} {r.get(NFTA_RULE_USERDATA, b'').hex()}")
    return tuple(out)


def set_ranges(dump: TableDump, name: str) -> AddressRanges | None:
    """The addresses set ``name`` of ``dump`` holds (plain or interval set of one address family);
    None when there is no such set."""
    found = [s for s in dump.sets if _name(s.get(NFTA_SET_NAME, b"")) == name]
    if not found:
        return None
    flags, key_len = _u32(found[0].get(NFTA_SET_FLAGS, b"")), _u32(found[0].get(NFTA_SET_KEY_LEN, b""))
    if flags & NFT_SET_CONCAT or key_len not in (4, 16):
        raise ApplyError(f"set {name} is not an address set")
    ranges: list[Range] = []
    start: int | None = None
    for elem in _elements(dump.elements.get(name, ())):
        a = attrs(elem)
        key = int.from_bytes(attrs(a.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE, b""), "big")
        if NFTA_SET_ELEM_KEY_END in a:
            end = int.from_bytes(attrs(a[NFTA_SET_ELEM_KEY_END]).get(NFTA_DATA_VALUE, b""), "big")
            ranges.append((key, end))
        elif not flags & NFT_SET_INTERVAL:
            ranges.append((key, key))
        elif _u32(a.get(NFTA_SET_ELEM_FLAGS, b"")) & NFT_SET_ELEM_INTERVAL_END:
            if start is not None and key > start:
                ranges.append((start, key - 1))
            start = None
        else:
            start = key
    if start is not None:
        ranges.append((start, (1 << (8 * key_len)) - 1))
    merged = tuple(merge_ranges(ranges))
    return AddressRanges(v4=merged) if key_len == 4 else AddressRanges(v6=merged)
