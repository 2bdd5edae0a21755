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

An encrypted allow's verdict is ``ALLOW_ENCRYPTED`` (the datapath accepts its traffic only
through the WireGuard interface and sends it only into it); the WireGuard UDP port is a
failsafe inbound allow from every encrypted rule's peer set (:data:`WIREGUARD_RULE`), as the
nftables and iptables backends accept it.

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
WIREGUARD_RULE = "failsafe:wireguard"
PORT_MAX = 65535


class Verdict(Enum):
    """A policy map value's verdict (values are the datapath's)."""

    ALLOW = 1
    BLOCK = 2
    ALLOW_ENCRYPTED = 3  # only through the WireGuard tunnel

    def __lt__(self, other: Verdict) -> bool:
        return self.value < other.value

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


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
        if hp.wireguard is not None:  # the peers' WireGuard packets, from every encrypted rule's peer set
            port = hp.wireguard.listen_port
            if not 0 < port <= PORT_MAX:
                raise RenderError(f"WireGuard listen port {port} out of range")
            wg = Candidate(Verdict.ALLOW, idx(WIREGUARD_RULE), (ServiceEntry(Proto.UDP, port, port),))
            for peer in sorted({r.peer for r in hp.rules if r.encrypt}):
                failsafe[Direction.INBOUND].append((peer, wg))
        by_dir: dict[Direction, list[tuple[str, Candidate]]] = {Direction.INBOUND: [], Direction.OUTBOUND: []}
        for rule in hp.rules:  # already in precedence order: override-deny, allow (encrypted first), deny
            if rule.action is Action.ALLOW:
                verdict = Verdict.ALLOW_ENCRYPTED if rule.encrypt else Verdict.ALLOW
            else:
                verdict = Verdict.BLOCK
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

Prefix = tuple[int, int]  # (network address as an integer, prefix length): cheap to hash and sort
BITS = {Family.V4: 32, Family.V6: 128}


def prefix_of(net: IPNetwork) -> Prefix:
    return int(net.network_address), net.prefixlen


def direct_memberships(hp: HostPolicy) -> dict[Family, dict[Prefix, frozenset[str]]]:
    """Prefix -> the sets listing it (not yet those of enclosing prefixes), per family."""
    out: dict[Family, dict[Prefix, set[str]]] = {Family.V4: {}, Family.V6: {}}
    for s in hp.sets:
        table = out[s.family]
        for m in s.members:
            key = (int(m.network_address), m.prefixlen)
            names = table.get(key)
            if names is None:
                table[key] = {s.name}
            else:
                names.add(s.name)
    for net in hp.failsafe.controller:
        out[Family.V4 if net.version == 4 else Family.V6].setdefault(prefix_of(net), set()).add(CONTROLLER_SET)
    interned: dict[frozenset[str], frozenset[str]] = {}
    result: dict[Family, dict[Prefix, frozenset[str]]] = {}
    for fam, table in out.items():
        frozen: dict[Prefix, frozenset[str]] = {}
        for key, names in table.items():
            f = frozenset(names)
            frozen[key] = interned.setdefault(f, f)
        result[fam] = frozen
    return result


def effective_sets(direct: dict[Prefix, frozenset[str]], bits: int) -> dict[Prefix, frozenset[str]]:
    """Each prefix's own sets plus those of every prefix containing it (one sorted sweep)."""
    stack: list[tuple[int, frozenset[str]]] = []  # (end, effective sets) of open ancestors
    out: dict[Prefix, frozenset[str]] = {}
    for p in sorted(direct):
        start, plen = p
        while stack and stack[-1][0] < start:
            stack.pop()
        own = direct[p]
        eff = stack[-1][1] | own if stack else own
        out[p] = eff
        if plen < bits:
            stack.append((start + (1 << (bits - plen)) - 1, eff))
    return out


def identity_order(combos: Iterable[frozenset[str]]) -> list[frozenset[str]]:
    """Identities 1..n in a deterministic order (0 is the empty combination: no set)."""
    return sorted(set(combos) - {frozenset()}, key=lambda c: (len(c), sorted(c)))


def _end(p: Prefix, bits: int) -> int:
    return p[0] + (1 << (bits - p[1])) - 1


@dataclass(frozen=True)
class DeltaPlan:
    """What one set delta does to the trie, in the order it must be applied."""

    new_identities: tuple[tuple[int, frozenset[str]], ...]
    new_intervals: tuple[Interval, ...]  # policy rows of the new identities (written first)
    updates: tuple[tuple[Prefix, int], ...]  # prefix -> identity (then these)
    deletes: tuple[Prefix, ...]  # prefixes with no set left (then these)

    @property
    def empty(self) -> bool:
        return not (self.updates or self.deletes)


class PeerTable:
    """Prefixes with their sets and identities, as they are in the kernel (mutable state).

    Built from a rendered artifact's memberships; :meth:`plan` computes a delta's changes
    without recording them, :meth:`commit` records them once the kernel took them. A host
    address joining a set costs a few dictionary operations (no scan of the table).
    """

    def __init__(
        self,
        ctx: RuleContext,
        direct: dict[Family, dict[Prefix, frozenset[str]]],
        effective: dict[Family, dict[Prefix, frozenset[str]]],
        identities: Sequence[frozenset[str]],
    ) -> None:
        self.ctx = ctx
        self.direct = {f: dict(t) for f, t in direct.items()}
        self.effective = {f: dict(t) for f, t in effective.items()}
        self.identities: dict[frozenset[str], int] = {c: i for i, c in enumerate(identities)}
        self._next_id = len(identities)
        # (start, end, prefixlen) of every prefix wider than a host route, for descendant scans
        self._wide = {f: sorted((s, _end((s, n), BITS[f]), n) for s, n in t if n < BITS[f]) for f, t in direct.items()}
        self._plens = {f: Counter(n for _, n in t) for f, t in direct.items()}
        self._pending: tuple[Family, dict[Prefix, frozenset[str]], dict[Prefix, frozenset[str]],
                             dict[frozenset[str], int], list[Prefix]] | None = None

    def names(self) -> dict[int, frozenset[str]]:
        return {i: c for c, i in self.identities.items()}

    def _descendants(self, family: Family, p: Prefix) -> list[Prefix]:
        """Prefixes strictly inside ``p``."""
        bits = BITS[family]
        start, plen = p
        if plen == bits:
            return []
        end = _end(p, bits)
        out: list[Prefix] = []
        wide = self._wide[family]
        i = bisect.bisect_left(wide, (start, -1, -1))
        while i < len(wide) and wide[i][0] <= end:
            if wide[i][2] > plen:
                out.append((wide[i][0], wide[i][2]))
            i += 1
        direct = self.direct[family]
        if end - start + 1 <= len(direct):  # host routes: probe the block or scan the table, the cheaper
            out.extend((a, bits) for a in range(start, end + 1) if (a, bits) in direct)
        else:
            out.extend(q for q in direct if q[1] == bits and start <= q[0] <= end)
        return out

    def _ancestor_sets(
        self,
        family: Family,
        p: Prefix,
        staged: _Overlay,
        effective: dict[Prefix, frozenset[str]],
        plens: list[int],
    ) -> frozenset[str]:
        bits = BITS[family]
        for plen in plens:
            if plen >= p[1]:
                continue
            sup = (p[0] & ~((1 << (bits - plen)) - 1), plen)
            if sup in staged:
                return effective.get(sup) or self.effective[family].get(sup, frozenset())
        return frozenset()

    def plan(self, family: Family, name: str, added: Sequence[IPNetwork], removed: Sequence[IPNetwork]) -> DeltaPlan:
        """The changes one set delta needs; nothing is recorded until :meth:`commit`."""
        direct = self.direct[family]
        changed: dict[Prefix, frozenset[str]] = {}
        for m in removed:
            key = prefix_of(m)
            changed[key] = changed.get(key, direct.get(key, frozenset())) - {name}
        for m in added:
            key = prefix_of(m)
            changed[key] = changed.get(key, direct.get(key, frozenset())) | {name}
        touched = set(changed)
        for key in changed:
            touched.update(self._descendants(family, key))
        staged = _Overlay(direct, changed)
        plens = sorted(set(self._plens[family]) | {n for _, n in changed}, reverse=True)
        effective: dict[Prefix, frozenset[str]] = {}
        updates: list[tuple[Prefix, int]] = []
        deletes: list[Prefix] = []
        fresh: dict[frozenset[str], int] = {}
        next_id = self._next_id
        for p in sorted(touched, key=lambda q: q[1]):
            own = staged.get(p)
            if not own:
                if p in self.effective[family]:
                    deletes.append(p)
                continue
            eff = own | self._ancestor_sets(family, p, staged, effective, plens)
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
        bits = BITS[family]
        direct, wide, plens = self.direct[family], self._wide[family], self._plens[family]
        for p, sets in changed.items():
            had = p in direct
            if sets:
                direct[p] = sets
            else:
                direct.pop(p, None)
            if had == bool(sets):
                continue
            plens[p[1]] += 1 if sets else -1
            if not plens[p[1]]:
                del plens[p[1]]
            if p[1] < bits:
                item = (p[0], _end(p, bits), p[1])
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

    def __init__(self, base: dict[Prefix, frozenset[str]], changed: dict[Prefix, frozenset[str]]) -> None:
        self.base = base
        self.changed = changed

    def get(self, key: Prefix) -> frozenset[str] | None:
        if key in self.changed:
            return self.changed[key] or None
        return self.base.get(key)

    def __contains__(self, key: object) -> bool:
        if key in self.changed:
            return bool(self.changed[key])
        return key in self.base
