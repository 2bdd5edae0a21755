"""Peer identities and precedence-resolved port intervals for the eBPF maps (pure, no I/O).

An *identity* is one exact combination of peer address sets (Cilium's idea, applied per
host): every address maps, through an LPM trie, to the identity of the sets it is in, and
the policy map is keyed by identity. Per-packet cost is then two lookups whatever the
number of peers and rules.

CIDRs either nest or are disjoint, so an address's sets are the sets of its longest
matching prefix *and of every shorter prefix containing it*; :func:`effective_sets`
folds the ancestors' sets into each prefix, so the trie's longest match alone is right.

For one (direction, identity, protocol) the candidates (failsafe first, then the host rules
in their precedence order: override-deny, allow, deny) are resolved into *disjoint* port
intervals, each with the verdict and rule of the first candidate that matches it; ports no
candidate matches are left out (the mode's default applies on a miss). Disjoint intervals
become disjoint port prefixes, so the trie's longest match is the only match.

The controller failsafe is a pseudo address set (:data:`CONTROLLER_SET`) of the controller
CIDRs, so it rides the same machinery. :class:`PeerTable` keeps prefixes and identities
and plans set deltas as single trie updates.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

from stockade.compiler.ir import Direction, HostPolicy
from stockade.errors import RenderError
from stockade.model.addresses import Family, IPNetwork
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry

CONTROLLER_SET = "failsafe:controller"
DEFAULT_RULE = "default"
MANAGEMENT_RULE = "failsafe:management"
PORT_MAX = 65535


class Verdict(Enum):
    """A policy map value's verdict (values are the datapath's)."""

    ALLOW = 1
    BLOCK = 2

    def __lt__(self, other: Verdict) -> bool:
        return self.value < other.value


class L4(Enum):
    """The policy map's protocol byte (IP protocol numbers; OTHER for every other one)."""

    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
    OTHER = 255

    def __lt__(self, other: L4) -> bool:
        return self.value < other.value

    @property
    def label(self) -> str:
        return self.name.lower()


_L4_OF_PROTO = {Proto.TCP: L4.TCP, Proto.UDP: L4.UDP, Proto.ICMP: L4.ICMP, Proto.ICMPV6: L4.ICMPV6}


@dataclass(frozen=True, order=True)
class Interval:
    """Ports (ICMP: types) first..last of one (direction, identity, protocol): verdict and rule."""

    direction: Direction
    identity: int
    proto: L4
    first: int
    last: int
    verdict: Verdict
    rule: int  # index into the rule table


@dataclass(frozen=True)
class Candidate:
    verdict: Verdict
    rule: int
    services: tuple[ServiceEntry, ...]


def port_prefixes(first: int, last: int, bits: int = 16) -> Iterator[tuple[int, int]]:
    """``first..last`` as (value, prefix length) blocks over ``bits`` bits, smallest cover."""
    lo = first
    while lo <= last:
        size = lo & -lo if lo else 1 << bits
        while lo + size - 1 > last:
            size >>= 1
        yield lo, bits - (size.bit_length() - 1)
        lo += size


def _spans(services: Sequence[ServiceEntry], proto: L4) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in services:
        if e.proto is Proto.ANY:
            return [(0, PORT_MAX)]
        if _L4_OF_PROTO.get(e.proto) is not proto:
            continue
        if e.first is None:
            return [(0, PORT_MAX)]
        last = e.last if e.last is not None else e.first
        limit = 255 if proto in (L4.ICMP, L4.ICMPV6) else PORT_MAX
        if not 0 <= e.first <= last <= limit:
            raise RenderError(f"service entry {e} out of range 0-{limit}")
        out.append((e.first, last))
    return out


def resolve(candidates: Sequence[Candidate], proto: L4) -> list[tuple[int, int, Verdict, int]]:
    """First-match resolution into disjoint, merged (first, last, verdict, rule) intervals."""
    free: list[tuple[int, int]] = [(0, PORT_MAX)]
    got: list[tuple[int, int, Verdict, int]] = []
    for c in candidates:
        for lo, hi in _spans(c.services, proto):
            rest: list[tuple[int, int]] = []
            for flo, fhi in free:
                if fhi < lo or flo > hi:
                    rest.append((flo, fhi))
                    continue
                got.append((max(lo, flo), min(hi, fhi), c.verdict, c.rule))
                if flo < lo:
                    rest.append((flo, lo - 1))
                if fhi > hi:
                    rest.append((hi + 1, fhi))
            free = rest
        if not free:
            break
    got.sort()
    merged: list[tuple[int, int, Verdict, int]] = []
    for lo, hi, v, r in got:
        if merged and merged[-1][1] + 1 == lo and merged[-1][2:] == (v, r):
            merged[-1] = (merged[-1][0], hi, v, r)
        else:
            merged.append((lo, hi, v, r))
    return merged


@dataclass
class RuleContext:
    """What turns an identity into policy intervals: the host's rules, indexed once."""

    hp: HostPolicy
    rule_names: tuple[str, ...] = ()
    _by_dir: dict[Direction, list[tuple[str, Candidate]]] = field(default_factory=dict)
    _failsafe: dict[Direction, list[tuple[str, Candidate]]] = field(default_factory=dict)

    @staticmethod
    def of(hp: HostPolicy) -> RuleContext:
        names = [DEFAULT_RULE]
        index: dict[str, int] = {DEFAULT_RULE: 0}

        def idx(name: str) -> int:
            if name not in index:
                index[name] = len(names)
                names.append(name)
            return index[name]

        fs = hp.failsafe
        failsafe: dict[Direction, list[tuple[str, Candidate]]] = {Direction.INBOUND: [], Direction.OUTBOUND: []}
        if fs.management:
            cand = Candidate(Verdict.ALLOW, idx(MANAGEMENT_RULE), tuple(fs.management))
            failsafe[Direction.INBOUND].append(("", cand))
        if fs.controller:
            if not 0 < fs.controller_port <= PORT_MAX:
                raise RenderError(f"controller port {fs.controller_port} out of range")
            entry = ServiceEntry(Proto.TCP, fs.controller_port, fs.controller_port)
            controller = Candidate(Verdict.ALLOW, idx(CONTROLLER_SET), (entry,))
            failsafe[Direction.OUTBOUND].append((CONTROLLER_SET, controller))
        by_dir: dict[Direction, list[tuple[str, Candidate]]] = {Direction.INBOUND: [], Direction.OUTBOUND: []}
        for rule in hp.rules:  # already in precedence order: override-deny, allow, deny
            verdict = Verdict.ALLOW if rule.action is Action.ALLOW else Verdict.BLOCK
            by_dir[rule.direction].append((rule.peer, Candidate(verdict, idx(rule.rule_id), rule.services)))
        return RuleContext(hp, tuple(names), by_dir, failsafe)

    def intervals(self, identity: int, names: frozenset[str]) -> list[Interval]:
        out: list[Interval] = []
        for direction in (Direction.INBOUND, Direction.OUTBOUND):
            cands = [c for peer, c in self._failsafe[direction] if not peer or peer in names]
            cands += [c for peer, c in self._by_dir[direction] if peer in names]
            if not cands:
                continue
            for proto in L4:
                for lo, hi, verdict, rule in resolve(cands, proto):
                    out.append(Interval(direction, identity, proto, lo, hi, verdict, rule))
        return out


# ---- prefixes and identities ---------------------------------------------------------------


def direct_memberships(hp: HostPolicy) -> dict[Family, dict[IPNetwork, frozenset[str]]]:
    """Prefix -> the sets listing it (not yet those of enclosing prefixes), per family."""
    out: dict[Family, dict[IPNetwork, set[str]]] = {Family.V4: {}, Family.V6: {}}
    for s in hp.sets:
        table = out[s.family]
        for m in s.members:
            table.setdefault(m, set()).add(s.name)
    for net in hp.failsafe.controller:
        out[Family.V4 if net.version == 4 else Family.V6].setdefault(net, set()).add(CONTROLLER_SET)
    return {fam: {p: frozenset(n) for p, n in t.items()} for fam, t in out.items()}


def _span(p: IPNetwork) -> tuple[int, int]:
    start = int(p.network_address)
    return start, start + (1 << (p.max_prefixlen - p.prefixlen)) - 1


def effective_sets(direct: dict[IPNetwork, frozenset[str]]) -> dict[IPNetwork, frozenset[str]]:
    """Each prefix's own sets plus those of every prefix containing it (one sorted sweep)."""
    stack: list[tuple[int, frozenset[str]]] = []  # (end, effective sets) of open ancestors
    out: dict[IPNetwork, frozenset[str]] = {}
    for p in sorted(direct, key=lambda n: (int(n.network_address), n.prefixlen)):
        start, end = _span(p)
        while stack and stack[-1][0] < start:
            stack.pop()
        inherited = stack[-1][1] if stack else frozenset()
        eff = inherited | direct[p] if inherited else direct[p]
        out[p] = eff
        stack.append((end, eff))
    return out


def identity_order(combos: Iterable[frozenset[str]]) -> list[frozenset[str]]:
    """Identities 1..n in a deterministic order (0 is the empty combination: no set)."""
    return sorted({c for c in combos if c}, key=lambda c: (len(c), sorted(c)))


@dataclass(frozen=True)
class DeltaPlan:
    """What one batch of set deltas does to the maps, in the order it must be applied."""

    new_identities: tuple[tuple[int, frozenset[str]], ...]
    new_intervals: tuple[Interval, ...]  # policy rows of the new identities (written first)
    updates: tuple[tuple[IPNetwork, int], ...]  # prefix -> identity (then these)
    deletes: tuple[IPNetwork, ...]  # prefixes with no set left (then these)

    @property
    def empty(self) -> bool:
        return not (self.updates or self.deletes)


class PeerTable:
    """Prefixes with their sets and identities, as they are in the kernel (mutable state).

    Built from a rendered artifact's memberships; :meth:`plan` computes a delta's changes
    without recording them, :meth:`commit` records them once the kernel took them. A host
    address joining a set costs a few dictionary operations (no scan of the table).
    """

    def __init__(self, ctx: RuleContext, direct: dict[Family, dict[IPNetwork, frozenset[str]]]) -> None:
        self.ctx = ctx
        self.direct = {f: dict(t) for f, t in direct.items()}
        self.effective = {f: effective_sets(t) for f, t in self.direct.items()}
        combos = identity_order(c for t in self.effective.values() for c in t.values())
        self.identities: dict[frozenset[str], int] = {frozenset(): 0}
        for i, c in enumerate(combos, start=1):
            self.identities[c] = i
        self._next_id = len(combos) + 1
        # (start, end, prefixlen) of every prefix wider than a host route, for descendant scans
        self._wide = {
            f: sorted((*_span(p), p.prefixlen) for p in t if p.prefixlen < p.max_prefixlen)
            for f, t in self.direct.items()
        }
        self._plens = {f: Counter(p.prefixlen for p in t) for f, t in self.direct.items()}
        self._pending: tuple[Family, dict[IPNetwork, frozenset[str]], dict[IPNetwork, frozenset[str]],
                             dict[frozenset[str], int], list[IPNetwork]] | None = None

    def identity_of(self, prefix: IPNetwork, family: Family) -> int:
        return self.identities[self.effective[family][prefix]]

    def names(self) -> dict[int, frozenset[str]]:
        return {i: c for c, i in self.identities.items()}

    def _descendants(self, family: Family, p: IPNetwork) -> list[IPNetwork]:
        """Prefixes strictly inside ``p`` (host routes found through the direct table)."""
        if p.prefixlen == p.max_prefixlen:
            return []
        start, end = _span(p)
        cls = type(p)
        out: list[IPNetwork] = []
        wide = self._wide[family]
        i = bisect.bisect_left(wide, (start, -1, -1))
        while i < len(wide) and wide[i][0] <= end:
            if wide[i][2] > p.prefixlen:
                out.append(cls((wide[i][0], wide[i][2])))
            i += 1
        # host routes: scan only when the block is small compared with the table
        direct = self.direct[family]
        if end - start + 1 <= len(direct):
            out.extend(cls((a, p.max_prefixlen)) for a in range(start, end + 1) if cls((a, p.max_prefixlen)) in direct)
        else:
            out.extend(q for q in direct if q.prefixlen == q.max_prefixlen and start <= int(q.network_address) <= end)
        return out

    def _ancestor_sets(
        self,
        family: Family,
        p: IPNetwork,
        staged: _Overlay,
        effective: dict[IPNetwork, frozenset[str]],
        extra_plens: set[int],
    ) -> frozenset[str]:
        plens = sorted((n for n in set(self._plens[family]) | extra_plens if n < p.prefixlen), reverse=True)
        for plen in plens:
            sup = p.supernet(new_prefix=plen)
            if sup in staged:
                return effective.get(sup) or self.effective[family].get(sup, frozenset())
        return frozenset()

    def plan(self, family: Family, name: str, added: Sequence[IPNetwork], removed: Sequence[IPNetwork]) -> DeltaPlan:
        """The changes one set delta needs; nothing is recorded until :meth:`commit`."""
        direct = self.direct[family]
        changed: dict[IPNetwork, frozenset[str]] = {}
        for m in removed:
            changed[m] = changed.get(m, direct.get(m, frozenset())) - {name}
        for m in added:
            changed[m] = changed.get(m, direct.get(m, frozenset())) | {name}
        touched = set(changed)
        for m in changed:
            touched.update(self._descendants(family, m))
        staged = _Overlay(direct, changed)
        effective: dict[IPNetwork, frozenset[str]] = {}
        updates: list[tuple[IPNetwork, int]] = []
        deletes: list[IPNetwork] = []
        fresh: dict[frozenset[str], int] = {}
        next_id = self._next_id
        extra_plens = {m.prefixlen for m in changed}
        for p in sorted(touched, key=lambda n: n.prefixlen):
            own = staged.get(p)
            if not own:
                if p in self.effective[family]:
                    deletes.append(p)
                continue
            eff = own | self._ancestor_sets(family, p, staged, effective, extra_plens)
            effective[p] = eff
            if self.effective[family].get(p) == eff:
                continue
            ident = self.identities.get(eff, fresh.get(eff))
            if ident is None:
                ident = fresh[eff] = next_id
                next_id += 1
            updates.append((p, ident))
        new_ids = tuple(sorted((i, c) for c, i in fresh.items()))
        rows = tuple(r for i, c in new_ids for r in self.ctx.intervals(i, c))
        self._pending = (family, changed, effective, fresh, deletes)
        return DeltaPlan(new_ids, rows, tuple(updates), tuple(deletes))

    def commit(self) -> None:
        """Record the last planned delta as applied."""
        if self._pending is None:
            return
        family, changed, effective, fresh, deletes = self._pending
        self._pending = None
        direct, wide, plens = self.direct[family], self._wide[family], self._plens[family]
        for p, sets in changed.items():
            had = p in direct
            if sets:
                direct[p] = sets
            else:
                direct.pop(p, None)
            if had == bool(sets):
                continue
            plens[p.prefixlen] += 1 if sets else -1
            if not plens[p.prefixlen]:
                del plens[p.prefixlen]
            if p.prefixlen < p.max_prefixlen:
                item = (*_span(p), p.prefixlen)
                if sets:
                    bisect.insort(wide, item)
                else:
                    wide.pop(bisect.bisect_left(wide, item))
        eff = self.effective[family]
        for p in deletes:
            eff.pop(p, None)
        eff.update(effective)
        self.identities.update(fresh)
        if fresh:
            self._next_id = max(fresh.values()) + 1


class _Overlay:
    """``base`` with some keys replaced (an empty value: removed), without copying ``base``."""

    def __init__(self, base: dict[IPNetwork, frozenset[str]], changed: dict[IPNetwork, frozenset[str]]) -> None:
        self.base = base
        self.changed = changed

    def get(self, key: IPNetwork) -> frozenset[str] | None:
        if key in self.changed:
            return self.changed[key] or None
        return self.base.get(key)

    def __contains__(self, key: object) -> bool:
        if key in self.changed:
            return bool(self.changed[key])  # type: ignore[index]
        return key in self.base
