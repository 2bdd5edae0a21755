"""The packet header space as BDD variables, and the address equivalence classes.

Why this split (measured on this machine, see ``docs/verification.md``): a BDD over the
address bits costs ~90 us per address through ``dd``'s Python interface (100k peers: 9-30 s),
far from the 1 s goal. Addresses are only ever tested for membership in sets, so the address
axis is cut exactly into *classes* (:func:`address_classes`: a sweep over every set boundary;
all addresses of a class are in exactly the same sets, so every rule treats them alike) and
each class is checked as a BDD over the remaining fields, where a set test is a constant.
Together this is exhaustive over every address and every value of every modelled field.

BDD variables (``dd.cudd``, falling back to ``dd.autoref``): l4 protocol (8 bits), destination
and source port (16 each), ICMP type (8), TCP flags (8), conntrack state (3 bits, 5 values),
loopback (1), the tunnel bits of encrypted rules (:data:`TUNNEL_VARS`, see :mod:`.tunnel`) and
one bit per dynamic set (the unknown "already logged" membership).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, compress, groupby, islice, repeat
from operator import add, attrgetter, ge, itemgetter, le, lt, mul, ne, sub
from typing import Any

from stockade.model.addresses import Family, Range, merge_ranges
from stockade.verify.loaded import CT_STATES, TCP_FLAG_BITS, Field

try:  # CUDD through Cython when the wheel has it, else the pure-Python implementation
    from dd.cudd import BDD  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the installed wheel
    from dd.autoref import BDD  # type: ignore[import-not-found,unused-ignore,no-redef]

BDDNode = Any  # dd's Function: untyped
WIDTHS = {Field.L4PROTO: 8, Field.DPORT: 16, Field.SPORT: 16, Field.ICMP_TYPE: 8}
_PREFIX = {Field.L4PROTO: "p", Field.DPORT: "d", Field.SPORT: "s", Field.ICMP_TYPE: "t"}
CT_BITS = 3
SYN, ACK = TCP_FLAG_BITS["syn"], TCP_FLAG_BITS["ack"]
# Encrypted rules (:mod:`.tunnel`): "wg" the packet arrived through the WireGuard interface
# (inbound) / leaves through it (outbound: the verdict asked about); "enc" its connection is
# marked encrypted; "smark" it carries wireguard-go's socket mark; "rt" the steering route (or
# the redirect's target) is there; "mk" (internal to the interpreter) the packet's mark is the
# steering mark when a rule tests it, replaced by what the steering rules computed.
TUNNEL_VARS = ("wg", "enc", "smark", "rt", "mk")


def _bits(prefix: str, width: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(width)]


class HeaderSpace:
    """One BDD manager and the header variables; builders are cached."""

    def __init__(self, dynamic_sets: Iterable[str] = ()) -> None:
        self.bdd = BDD()
        self.names: dict[Field, list[str]] = {f: _bits(_PREFIX[f], w) for f, w in WIDTHS.items()}
        self.flag_names = _bits("f", 8)
        self.ct_names = _bits("c", CT_BITS)
        self.dynamic = {name: f"y{i}" for i, name in enumerate(sorted(set(dynamic_sets)))}
        # "wg" first: the outbound "sent in the clear" (``f & ~wg``) is then one node on top
        order = ["wg", *self.names[Field.L4PROTO], *self.names[Field.DPORT], *self.names[Field.SPORT]]
        order += [*self.names[Field.ICMP_TYPE], *self.flag_names, *self.ct_names, "lo"]
        order += [v for v in TUNNEL_VARS if v != "wg"]
        order += self.dynamic.values()
        self.bdd.configure(reordering=False)  # our order is chosen; reordering costs more than it saves here
        self.bdd.declare(*order)
        self.all_vars = order
        self.true = self.bdd.true
        self.false = self.bdd.false
        self._ranges: dict[tuple[Field, tuple[Range, ...]], BDDNode] = {}

    # ---- builders --------------------------------------------------------------------
    def value(self, names: Sequence[str], value: int) -> BDDNode:
        n = len(names)
        return self.bdd.cube({names[i]: bool((value >> (n - 1 - i)) & 1) for i in range(n)})

    def _ge(self, names: Sequence[str], value: int) -> BDDNode:
        n = len(names)
        r = self.true
        for i in range(n - 1, -1, -1):
            x = self.bdd.var(names[i])
            r = (x & r) if (value >> (n - 1 - i)) & 1 else (x | r)
        return r

    def _le(self, names: Sequence[str], value: int) -> BDDNode:
        n = len(names)
        r = self.true
        for i in range(n - 1, -1, -1):
            x = self.bdd.var(names[i])
            r = (~x | r) if (value >> (n - 1 - i)) & 1 else (~x & r)
        return r

    def field_in(self, field: Field, ranges: tuple[Range, ...]) -> BDDNode:
        key = (field, ranges)
        found = self._ranges.get(key)
        if found is not None:
            return found
        names = self.names[field]
        limit = (1 << len(names)) - 1
        u = self.false
        for lo, hi in ranges:
            if lo == hi:
                u = u | self.value(names, lo)
            else:
                part = self.true if lo <= 0 else self._ge(names, lo)
                if hi < limit:
                    part = part & self._le(names, hi)
                u = u | part
        self._ranges[key] = u
        return u

    def ct_in(self, states: Iterable[str]) -> BDDNode:
        u = self.false
        for s in states:
            u = u | self.value(self.ct_names, CT_STATES.index(s))
        return u

    def tcp_flags(self, mask: int, value: int) -> BDDNode:
        """``flags & mask == value`` over the flag bits (bit 0 = FIN ... bit 7 = CWR)."""
        if value & ~mask:
            return self.false
        u = self.true
        for bit in range(8):
            if mask & (1 << bit):
                x = self.bdd.var(self.flag_names[7 - bit])
                u = u & (x if value & (1 << bit) else ~x)
        return u

    @property
    def loopback(self) -> BDDNode:
        return self.bdd.var("lo")

    def var(self, name: str) -> BDDNode:
        """One of :data:`TUNNEL_VARS` as a BDD."""
        return self.bdd.var(name)

    def in_dynamic(self, name: str) -> BDDNode:
        return self.bdd.var(self.dynamic[name])

    def proto(self, number: int) -> BDDNode:
        return self.field_in(Field.L4PROTO, ((number, number),))

    def domain(self, family: Family) -> BDDNode:
        """Packets that can exist: a valid conntrack state, no ICMP of the other family."""
        other = 58 if family is Family.V4 else 1
        wg, enc = self.var("wg"), self.var("enc")
        # one interface: not both lo and the tunnel; an encrypted connection is a tracked one
        # (new for a retransmitted SYN, established, related) and never on lo (the failsafe
        # accepts lo before any rule could mark it); "mk" is bound by the interpreter
        tunnel = ~(self.loopback & wg) & ~(enc & (self.loopback | ~self.ct_in(("new", "established", "related"))))
        return self.ct_in(CT_STATES) & ~self.proto(other) & tunnel & ~self.var("mk")

    def flow_domain(self, family: Family) -> BDDNode:
        """The states a datapath flow table gives (see ``LoadedRuleset.flow_states``): new;
        established, never for a bare TCP SYN nor an ICMP message but echo request/reply;
        related, only for an ICMP error."""
        icmp = self.proto(1 if family is Family.V4 else 58)
        echo = ((0, 0), (8, 8)) if family is Family.V4 else ((128, 129),)
        errors = ((3, 5), (11, 12)) if family is Family.V4 else ((1, 4),)
        bare_syn = self.proto(6) & self.tcp_flags(SYN | ACK, SYN)
        established = ~bare_syn & ~(icmp & ~self.field_in(Field.ICMP_TYPE, echo))
        related = icmp & self.field_in(Field.ICMP_TYPE, errors)
        return (
            (self.ct_in(("new",)) & ~self.var("enc"))  # a flow's "enc": only packets of a flow
            | (self.ct_in(("established",)) & established)
            | (self.ct_in(("related",)) & related)
        )

    # ---- reading an assignment back -----------------------------------------------------
    def decode(self, assignment: dict[str, bool]) -> dict[str, int]:
        def num(names: Sequence[str]) -> int:
            v = 0
            for n in names:
                v = (v << 1) | int(bool(assignment.get(n, False)))
            return v

        out = {f.value: num(ns) for f, ns in self.names.items()}
        out["tcp-flags"] = num(self.flag_names)
        out["ct"] = num(self.ct_names)
        out["lo"] = int(bool(assignment.get("lo", False)))
        for name in TUNNEL_VARS:
            out[name] = int(bool(assignment.get(name, False)))
        return out

    def pick(self, u: BDDNode) -> dict[str, bool]:
        found = self.bdd.pick(u, care_vars=set(self.all_vars))
        if found is None:
            raise ValueError("empty set has no element")
        return dict(found)


def disjoin(space: HeaderSpace, nodes: Iterable[BDDNode]) -> BDDNode:
    """The OR of ``nodes``, merged pairwise in a balanced tree after sorting them by their top
    variable's level (bottom first): OR-ing n membership variables one by one onto the growing
    result costs O(n^2); this, O(n log n)."""
    level = sorted(nodes, key=_LEVEL, reverse=True)  # dd's ``level``: an int, read C-level
    if not level:
        return space.false
    while len(level) > 1:
        nxt = [a | b for a, b in zip(level[::2], level[1::2], strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def grouped_or(space: HeaderSpace, parts: Iterable[tuple[BDDNode, BDDNode]]) -> BDDNode:
    """The OR of ``static & member`` over ``parts``, factored by equal ``static`` (``ports and
    (in A or in B ...)``)."""
    groups: dict[BDDNode, list[BDDNode]] = {}
    for static, member in parts:
        groups.setdefault(static, []).append(member)
    true = space.true
    return disjoin(space, [m if static == true else static & m
                           for static, members in groups.items() if (m := disjoin(space, members)) != space.false])


_LEVEL = attrgetter("level")


# ---- address classes ---------------------------------------------------------------------


@dataclass(frozen=True)
class AddressClass:
    """Addresses lying in exactly the predicates ``members``; ``example`` is one of them."""

    members: frozenset[int]
    example: int


def address_classes(
    preds: Sequence[tuple[Range, ...]], family: Family, hints: Iterable[int] = ()
) -> list[AddressClass]:
    """The classes of the address axis under ``preds`` (each a tuple of disjoint ranges).

    Exact: every address of the family lies in exactly one class, and two addresses of one
    class lie in the same predicates. A hint that falls in a class becomes its example (so a
    counterexample can use an address that exists in a lab).

    One sweep over the sorted boundaries (``boundary * M + predicate`` as plain ints, built,
    sorted and grouped by C-level iterators: the Python loop runs once per distinct boundary).
    """
    top = (1 << (32 if family is Family.V4 else 128)) - 1
    m = max(2, len(preds))
    events: list[int] = []
    for i, ranges in enumerate(preds):
        if not ranges:
            continue
        events.extend(map(add, map(mul, map(itemgetter(0), ranges), repeat(m)), repeat(i)))
        # the first address after each range; a last range reaching the top never ends
        count = len(ranges) - 1 if ranges[-1][1] == top else len(ranges)
        ends: Iterator[int] = islice(map(add, map(itemgetter(1), ranges), repeat(1)), count)
        events.extend(map(add, map(mul, ends, repeat(m)), repeat(i)))
    events.sort()
    examples: dict[frozenset[int], int] = {}
    if not events or events[0] // m != 0:
        examples[frozenset()] = 0
    active: set[int] = set()
    for point, group in groupby(events, key=m.__rfloordiv__):
        active ^= set(map(m.__rmod__, group))
        examples.setdefault(frozenset(active), point)
    for h in hints:
        sig = _members_at(preds, h)
        if sig in examples:
            examples[sig] = h
    return [AddressClass(sig, ex) for sig, ex in examples.items()]


def _members_at(preds: Sequence[tuple[Range, ...]], point: int) -> frozenset[int]:
    out = []
    for i, ranges in enumerate(preds):
        j = bisect.bisect_right(ranges, (point, 1 << 130)) - 1
        if j >= 0 and ranges[j][0] <= point <= ranges[j][1]:
            out.append(i)
    return frozenset(out)


def atom_classes(
    preds: Sequence[tuple[Range, ...]],
    atoms: Iterable[int],
    family: Family,
    hints: Iterable[int] = (),
) -> list[AddressClass] | None:
    """The classes of :func:`address_classes` without sweeping every boundary, when the
    predicates ``atoms`` are pairwise disjoint (the identities of the eBPF datapath's LPM trie:
    an address has one) and every other non-empty predicate is a union of atoms or lies inside
    one atom (at most one such predicate per atom: the controller's address in "no identity").

    Then the addresses of one atom are in the same predicates (those holding the atom; with a
    predicate inside it, the atom is two classes), and the addresses in no atom are one more
    class. The cost is the atoms' ranges (sorted once) and a lookup per atom and predicate,
    not a sweep over every member of every set. None when the structure does not hold (the
    caller sweeps)."""
    top = (1 << (32 if family is Family.V4 else 128)) - 1
    atom_ids = sorted({k for k in atoms if preds[k]})
    # every atom's ranges in address order: starts[i]..ends[i] of atom owners[i], sorted by
    # the first address (ints, not nested tuples: equal first addresses are an overlap,
    # refused below, so the order between them does not matter)
    firsts_all: list[int] = []
    lasts_all: list[int] = []
    owners_all: list[int] = []
    for k in atom_ids:
        firsts_all.extend(map(itemgetter(0), preds[k]))
        lasts_all.extend(map(itemgetter(1), preds[k]))
        owners_all.extend(repeat(k, len(preds[k])))
    order = sorted(range(len(firsts_all)), key=firsts_all.__getitem__)
    starts = list(map(firsts_all.__getitem__, order))
    ends = list(map(lasts_all.__getitem__, order))
    owners = list(map(owners_all.__getitem__, order))
    if not all(map(lt, ends, islice(starts, 1, None))):
        return None  # two atoms overlap
    atom_set = set(atom_ids)
    firsts = [preds[k][0][0] for k in atom_ids]  # each atom's lowest address
    sizes = {k: _size(preds[k]) for k in atom_ids}
    holders: dict[int, set[int]] = {k: {k} for k in atom_ids}  # atom -> predicates holding it
    inside: dict[int, int] = {}  # atom -> the one predicate strictly inside it
    for p, ranges in enumerate(preds):
        if p in atom_set or not ranges:
            continue
        # the atoms whose lowest address lies in ``ranges`` (one C-level bisect per atom)
        picked = list(compress(atom_ids, _contains(ranges, firsts)))
        # a union of atoms: the picked atoms hold as many addresses as ``ranges`` and, merged,
        # are ``ranges`` (the atoms are disjoint, so equal sizes and equal merged ranges are
        # the same set); the merge runs only when the sizes agree
        if picked and sum(map(sizes.__getitem__, picked)) == _size(ranges) and _fuse(
            sorted(chain.from_iterable(map(preds.__getitem__, picked)))
        ) == tuple(ranges):
            for k in picked:
                holders[k].add(p)
            continue
        i = bisect.bisect_right(starts, ranges[0][0]) - 1
        owner = owners[i] if i >= 0 else -1
        if owner < 0 or owner in inside:
            return None
        covered = sum(hi - lo + 1 for a, b in ranges for lo, hi in _clip(preds[owner], a, b))
        if covered != _size(ranges):
            return None  # partly outside its atom, or over more than one
        inside[owner] = p
    examples: dict[frozenset[int], int] = {}
    for k in atom_ids:
        if k in inside:
            p = inside[k]
            examples[frozenset(holders[k] | {p})] = preds[p][0][0]
            rest = _first_outside(preds[k], preds[p])
            if rest is not None:
                examples[frozenset(holders[k])] = rest
        else:
            examples[frozenset(holders[k])] = preds[k][0][0]
    nowhere = _first_gap(starts, ends, top)
    if nowhere is not None:
        examples.setdefault(frozenset(), nowhere)
    # in address order (each example is its class's lowest address here), as the sweep gives
    # them: the prover reports the first class that differs
    examples = dict(sorted(examples.items(), key=lambda item: item[1]))
    for h in hints:  # a hint becomes its class's example (a lab address for the counterexample)
        i = bisect.bisect_right(starts, h) - 1
        sig: frozenset[int] = frozenset()
        if i >= 0 and ends[i] >= h:
            atom = owners[i]
            extra = {inside[atom]} if atom in inside and _inside(h, preds[inside[atom]]) else set()
            sig = frozenset(holders[atom] | extra)
        if sig in examples:
            examples[sig] = h
    return [AddressClass(sig, ex) for sig, ex in examples.items()]


def _size(ranges: Sequence[Range]) -> int:
    """How many addresses ``ranges`` (disjoint) hold."""
    total: int = sum(map(sub, map(itemgetter(1), ranges), map(itemgetter(0), ranges)))
    return total + len(ranges)


def _contains(ranges: Sequence[Range], points: Sequence[int]) -> list[bool]:
    """For each of ``points``, whether it lies in ``ranges`` (sorted, disjoint); C-level
    bisects (a sentinel range below every address keeps the index in bounds)."""
    los = [-2, *map(itemgetter(0), ranges)]
    his = [-2, *map(itemgetter(1), ranges)]
    where = map(sub, map(bisect.bisect_right, repeat(los), points), repeat(1))
    return list(map(ge, map(his.__getitem__, where), points))


def _fuse(ranges: Sequence[Range]) -> tuple[Range, ...]:
    """Sorted, disjoint ``ranges`` with adjacent ones joined (C-level: the Python loop of
    ``merge_ranges`` is a generator step per range). Overlapping input: ``merge_ranges``."""
    if not ranges:
        return ()
    los = list(map(itemgetter(0), ranges))
    his = list(map(itemgetter(1), ranges))
    ends = list(map(add, his, repeat(1)))
    if not all(map(le, ends, islice(los, 1, None))):
        return merge_ranges(ranges)
    breaks = list(compress(range(len(los) - 1), map(ne, ends, islice(los, 1, None))))
    first = [los[0], *map(los.__getitem__, map(add, breaks, repeat(1)))]
    last = [*map(his.__getitem__, breaks), his[-1]]
    return tuple(zip(first, last, strict=True))


def _inside(point: int, ranges: Sequence[Range]) -> bool:
    i = bisect.bisect_right(ranges, (point, 1 << 130)) - 1
    return i >= 0 and ranges[i][0] <= point <= ranges[i][1]


def _clip(ranges: Sequence[Range], lo: int, hi: int) -> list[Range]:
    """The parts of ``ranges`` within ``lo..hi``."""
    i = max(0, bisect.bisect_right(ranges, (lo, 1 << 130)) - 1)
    out: list[Range] = []
    while i < len(ranges) and ranges[i][0] <= hi:
        a, b = max(ranges[i][0], lo), min(ranges[i][1], hi)
        if a <= b:
            out.append((a, b))
        i += 1
    return out


def _first_outside(outer: Sequence[Range], inner: Sequence[Range]) -> int | None:
    """An address of ``outer`` not in ``inner`` (both sorted, disjoint ranges)."""
    for lo, hi in outer:
        point = lo
        for a, b in _clip(inner, lo, hi):
            if a > point:
                return point
            point = b + 1
        if point <= hi:
            return point
    return None


def _first_gap(starts: Sequence[int], ends: Sequence[int], top: int) -> int | None:
    """An address in none of the ranges ``starts[i]..ends[i]`` (sorted, disjoint), None when
    they cover all (C-level: the first range not starting right after the previous one)."""
    if not starts or starts[0] > 0:
        return 0
    after: list[int] = list(map(add, ends, repeat(1)))
    gap: int | None = next(compress(after, map(lt, after, islice(starts, 1, None))), None)
    if gap is not None:
        return gap
    return after[-1] if after[-1] <= top else None
