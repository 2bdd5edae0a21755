"""What each loaded rule matches, as BDDs over the header space, for one family and hook.

:class:`RuleMatcher` is the interpreter's (:mod:`.interpret`) view of a rule's matches: a
match's BDD (or constant), a rule's split into the part that does not depend on the peer's
address (protocol, ports, states, ...) and its tests of the peer against sets, either as
(predicate, negated) pairs for the walk per address class or, with set membership symbolic
(:mod:`.members`), as a BDD over membership variables, and a verdict map's keys.

Everything is memoised by the read objects themselves (a match, a rule, a tuple of matches),
never by rendered text: the read-backs share equal match objects between rules (iptables:
~2,400 objects behind 200k matches) and those outlive the matcher. A memo's value depends
only on the matcher's family, hook, local address and membership BDDs.
"""

from __future__ import annotations

import bisect

from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.verify.loaded import (
    Addr,
    AddrIn,
    ConnEncrypted,
    CtState,
    FamilyIs,
    FamilyRules,
    Field,
    HookName,
    InDynamicSet,
    IntIn,
    Loopback,
    Match,
    PacketMark,
    Rule,
    TcpFlags,
    Tunnel,
)
from stockade.verify.space import BDDNode, HeaderSpace
from stockade.verify.tunnel import match_bdd

UNSEEN = object()  # not looked at yet (a memo miss)
UNSEEN_SPLIT: tuple[BDDNode, BDDNode] = (UNSEEN, UNSEEN)


def peer_field(hook: HookName) -> Addr:
    return Addr.SADDR if hook is HookName.INPUT else Addr.DADDR


class RuleMatcher:
    """The BDDs of what rules match, for one family's rules at one hook and one local address."""

    def __init__(
        self,
        space: HeaderSpace,
        rules: FamilyRules,
        hook: HookName,
        pred_of: dict[str, int],
        local: int | None,
        members: dict[int, BDDNode] | None = None,
    ) -> None:
        self.space = space
        self.rules = rules
        self.family: Family = rules.family
        self.hook = hook
        self.peer = peer_field(hook)
        self.pred_of = pred_of  # peer-side set name -> predicate id of the address classes
        self.local = local
        # symbolic membership (see prove._symbolic_members): predicate -> BDD over membership
        # variables, instead of the constant membership of one address class
        self.members = members
        self._map_keys: dict[tuple[int, int, int], BDDNode] = {}
        self._static: dict[int, tuple[BDDNode | None, tuple[tuple[int, bool], ...]]] = {}  # by id(rule)
        # a match's BDD (or constant) by id: the read-backs share equal match objects between
        # rules (iptables: ~2,400 objects behind 200k matches), which outlive the matcher
        self._match_memo: dict[int, BDDNode | bool] = {}
        self._split_of: dict[tuple[int, ...], tuple[BDDNode, BDDNode] | None] = {}  # by match ids
        # the symbolic walk's view of a match, by id: (its BDD or constant, a peer set test?)
        self._part_of: dict[int, tuple[BDDNode | bool, bool]] = {}
        # the AND of a rule's non-peer matches, by their ids in order: the rules of an iptables
        # port chain repeat one protocol and port match with another peer set each
        self._static_of: dict[tuple[int, ...], BDDNode] = {}

    def _match(self, m: Match, sig: frozenset[int]) -> BDDNode | bool:
        sp = self.space
        if isinstance(m, FamilyIs):
            return m.family is self.family
        if isinstance(m, AddrIn):
            if m.family is not self.family:
                return False
            if m.addr is self.peer and self.members is not None:
                u = self.members[self.pred_of[m.set_name]]
                return ~u if m.negate else u
            if m.addr is self.peer:
                inside = self.pred_of[m.set_name] in sig
            else:
                if self.local is None:
                    raise UnmodelledConstructError(f"set {m.set_name}", "a test of the host's own address (none known)")
                ranges = self.rules.sets[m.set_name].ranges
                i = bisect.bisect_right(ranges, (self.local, 1 << 129)) - 1
                inside = i >= 0 and ranges[i][0] <= self.local <= ranges[i][1]
            return inside != m.negate
        if isinstance(m, IntIn):
            u = sp.field_in(m.field, m.ranges)
            return ~u if m.negate else u
        if isinstance(m, TcpFlags):
            u = sp.tcp_flags(m.mask, m.value)
            return ~u if m.negate else u
        if isinstance(m, CtState):
            u = sp.ct_in(m.states)
            return ~u if m.negate else u
        if isinstance(m, Loopback):
            if m.side is not self.hook:  # no such interface at this hook: never "lo"
                return m.negate
            return ~sp.loopback if m.negate else sp.loopback
        if isinstance(m, InDynamicSet):
            return sp.in_dynamic(m.set_name)
        if isinstance(m, Tunnel | ConnEncrypted | PacketMark):
            return match_bdd(sp, m, self.hook)
        raise UnmodelledConstructError("rule", f"match {m!r}")  # pragma: no cover - Match is closed

    def _static_match(self, m: Match) -> BDDNode | bool:
        """:meth:`_match` of ``m`` outside an address class (every match but a class's peer set
        test, and that one too over membership variables), memoised by the match object."""
        found = self._match_memo.get(id(m))
        if found is None:
            found = self._match_memo[id(m)] = self._match(m, frozenset())
        return found

    def class_match(self, rule: Rule, sig: frozenset[int]) -> BDDNode | None:
        """What ``rule`` matches for an address class of membership ``sig``; None: nothing."""
        static, tests = self.class_split(rule)
        if static is None:
            return None
        for pred, negate in tests:
            if (pred in sig) == negate:
                return None
        return static

    def class_split(self, rule: Rule) -> tuple[BDDNode | None, tuple[tuple[int, bool], ...]]:
        """A rule's matches as (the BDD of every match but the peer's set tests, those tests as
        (predicate, negated)): computed once per rule, the per-class part is a few lookups."""
        entry = self._static.get(id(rule))
        if entry is None:
            entry = self._static[id(rule)] = self._split(rule)
        return entry

    def _split(self, rule: Rule) -> tuple[BDDNode | None, tuple[tuple[int, bool], ...]]:
        u = self.space.true
        tests: list[tuple[int, bool]] = []
        for m in rule.matches:
            if isinstance(m, AddrIn) and m.addr is self.peer and m.family is self.family:
                tests.append((self.pred_of[m.set_name], m.negate))
                continue
            r = self._static_match(m)
            if r is False:
                return None, ()
            if r is True:
                continue
            u = u & r
        return (None if u == self.space.false else u), tuple(tests)

    def split_symbolic(self, rule: Rule) -> tuple[BDDNode, BDDNode] | None:
        """(every match but the peer's set tests, those tests) as BDDs; None: never matches.

        Memoised by the match objects (their ids, in order): iptables' rules are distinct
        objects, but half of them repeat another's matches with another verdict or comment."""
        key = tuple(map(id, rule.matches))
        found = self._split_of.get(key, UNSEEN_SPLIT)
        if found is UNSEEN_SPLIT:
            found = self._split_of[key] = self._split_matches(rule.matches)
        return found

    def _split_matches(self, matches: tuple[Match, ...]) -> tuple[BDDNode, BDDNode] | None:
        """(the AND of the matches but the peer's set tests, the AND of those tests); None: no
        packet matches. The first part is memoised by the ids of the matches it is made of."""
        parts = self._part_of
        member: BDDNode | None = None
        static_ids: list[int] = []
        for m in matches:
            i = id(m)
            part = parts.get(i)
            if part is None:
                part = parts[i] = (self._static_match(m), isinstance(m, AddrIn) and m.addr is self.peer)
            r, is_peer = part
            if r is False:
                return None
            if r is True:
                continue
            if is_peer:
                member = r if member is None else member & r
            else:
                static_ids.append(i)
        sp = self.space
        if not static_ids:
            static = sp.true
        elif len(static_ids) == 1:
            static = parts[static_ids[0]][0]
        else:
            key = tuple(static_ids)
            static = self._static_of.get(key)
            if static is None:
                static = parts[static_ids[0]][0]
                for i in static_ids[1:]:
                    static = static & parts[i][0]
                self._static_of[key] = static
        if member is None:
            member = sp.true
        if static == sp.false or member == sp.false:
            return None
        return static, member

    def map_key(self, proto: int, lo: int, hi: int) -> BDDNode:
        k = (proto, lo, hi)
        u = self._map_keys.get(k)
        if u is None:
            u = self.space.proto(proto) & self.space.field_in(Field.DPORT, ((lo, hi),))
            self._map_keys[k] = u
        return u
