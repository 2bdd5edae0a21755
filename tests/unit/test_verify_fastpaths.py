"""Session 8's shortcuts in the prover, each against the slow path it replaces.

* ``prove._ranges`` (C-level, a host-mask table, host routes as their own last address)
  against ``merge_ranges`` of every member's range, on canonical, unsorted, overlapping,
  adjacent and mixed-prefix member lists of both families;
* ``scan_rules`` (distinct rules, then distinct match objects) against the rule-by-rule scan;
* the interpreter's match memo (by match object: the read-backs share equal matches between
  rules) against an interpreter computing every match afresh, over membership variables and
  per address class, on random chains whose rules share match objects;
* the symbolic split's memo of a rule's non-peer matches (by their ids) against the AND of
  the matches built afresh, on rules drawn from a pool of shared match objects in any order.

Session 9:

* ``prove._set_ranges`` (cached (firsts, lasts) per set; the read-back's equal tuple shared
  instead of a new pair per member) against ``merge_ranges``, with exact, near-miss (same
  length and ends, one bound off inside) and absent kernel copies.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from itertools import combinations

from stockade.compiler.ir import AddressSet
from stockade.model.addresses import Family, IPNetwork, Range, merge_ranges, network_range
from stockade.verify.interpret import Interpreter
from stockade.verify.loaded import (
    Addr,
    AddrIn,
    Chain,
    CtState,
    FamilyIs,
    FamilyRules,
    Field,
    HookName,
    IntIn,
    Kind,
    Match,
    PacketMark,
    Rule,
)
from stockade.verify.prove import _known_ranges, _ranges, _set_ranges
from stockade.verify.rulematch import RuleMatcher
from stockade.verify.rulescan import RuleScan, scan_rules
from stockade.verify.space import BDDNode, HeaderSpace
from tests.unit.test_verify_blocks import N_SETS, _ruleset


def _networks(rng: random.Random, family: Family) -> list[IPNetwork]:
    bits = 32 if family is Family.V4 else 128
    base = 0x0A000000 if family is Family.V4 else 0xFD00 << 112
    hosts_only = rng.random() < 0.4
    out: list[IPNetwork] = []
    point = base
    for _ in range(rng.randint(1, 40)):
        plen = bits if hosts_only or rng.random() < 0.6 else rng.randint(bits - 6, bits - 1)
        size = 1 << (bits - plen)
        point = (point + rng.choice((0, 0, 1, size, 3 * size, 1000))) // size * size  # adjacent, apart
        out.append(ipaddress.ip_network((point, plen)))
        point += size
    roll = rng.random()
    if roll < 0.2:
        rng.shuffle(out)
    elif roll < 0.35:  # overlapping: a member again, or a supernet of one
        n = rng.choice(out)
        out.insert(rng.randrange(len(out) + 1), n.supernet() if n.prefixlen > 1 else n)
    return out


def test_ranges_equal_merge_ranges() -> None:
    rng = random.Random(5)
    for _ in range(600):
        family = rng.choice((Family.V4, Family.V6))
        nets = _networks(rng, family)
        assert _ranges(nets) == merge_ranges(network_range(n) for n in nets), nets
    assert _ranges([]) == ()


def _near_miss(rng: random.Random, ranges: tuple[Range, ...]) -> tuple[Range, ...] | None:
    """``ranges`` with one bound moved but its length, first and last address kept (None when
    there is no such bound: a single host range)."""
    cands = [(i, side) for i in range(len(ranges)) for side in (0, 1)
             if (i, side) not in ((0, 0), (len(ranges) - 1, 1)) and ranges[i][0] < ranges[i][1]]
    if not cands:
        return None
    i, side = rng.choice(cands)
    lo, hi = ranges[i]
    moved = (lo + 1, hi) if side == 0 else (lo, hi - 1)
    return (*ranges[:i], moved, *ranges[i + 1:])


def test_set_ranges_equal_merge_ranges_and_share_the_kernel_copy() -> None:
    rng = random.Random(31)
    shared = near = 0
    for case in range(600):
        family = rng.choice((Family.V4, Family.V6))
        nets = _networks(rng, family)
        want = merge_ranges(network_range(n) for n in nets)
        s = AddressSet(f"s{case}", family, tuple(nets))
        roll = rng.random()
        if roll < 0.35:  # the kernel holds an equal copy (a distinct tuple object)
            copy = tuple((lo, hi) for lo, hi in want)
            known = _known_ranges([copy])
            for _ in range(2):  # computed, then from the cache
                got = _set_ranges(s, known)
                assert got == want and got is copy, case
            shared += 1
            continue
        other = _near_miss(rng, want) if roll < 0.8 else None
        known = _known_ranges([other] if other is not None else [((0, 0),)])
        near += other is not None
        for _ in range(2):
            got = _set_ranges(s, known)
            assert got == want and got is not other, (case, nets)
    assert shared > 100 and near > 100


def _scan_rule_by_rule(rules: FamilyRules) -> RuleScan:
    """The scan as session 7 wrote it: every rule, every match."""
    names: dict[Addr, set[str]] = {Addr.SADDR: set(), Addr.DADDR: set()}
    marks = False
    for chain in rules.chains.values():
        for r in chain.rules:
            if r.verdict.kind is Kind.MARK:
                marks = True
            for m in r.matches:
                if isinstance(m, AddrIn):
                    if m.family is rules.family:
                        names[m.addr].add(m.set_name)
                elif isinstance(m, PacketMark):
                    marks = True
    return RuleScan(tuple(sorted(names[Addr.SADDR])), tuple(sorted(names[Addr.DADDR])), marks)


def _shared(rng: random.Random, rules: FamilyRules, extra: bool = False) -> FamilyRules:
    """``rules`` with equal matches made one object (as the read-backs make them) and, with
    ``extra``, daddr / other-family set tests, marks and MARK verdicts sprinkled in."""
    pool: dict[Match, Match] = {}
    chains: dict[str, Chain] = {}
    for name, chain in rules.chains.items():
        out: list[Rule] = []
        for r in chain.rules:
            matches = list(r.matches)
            verdict = r.verdict
            if extra and rng.random() < 0.2:
                fam = rng.choice((Family.V4, Family.V6))
                matches.append(AddrIn(rng.choice((Addr.SADDR, Addr.DADDR)), fam, f"d{rng.randrange(5)}"))
            if extra and rng.random() < 0.03:
                matches.append(PacketMark(rng.randrange(3)))
            if extra and rng.random() < 0.02:
                verdict = replace(verdict, kind=Kind.MARK)
            out.append(Rule(tuple(pool.setdefault(m, m) for m in matches), verdict))
        chains[name] = Chain(name, tuple(out), chain.policy)
    return replace(rules, chains=chains)


def test_scan_rules_equals_the_rule_by_rule_scan() -> None:
    rng = random.Random(3)
    marked = 0
    for _ in range(300):
        rules = _shared(rng, _ruleset(rng), extra=True)
        got = scan_rules(rules)
        assert got == _scan_rule_by_rule(rules)
        marked += got.uses_marks
    assert 10 < marked < 290  # both outcomes met


class _UnmemoisedMatcher(RuleMatcher):
    """Every match computed afresh (the memo never filled)."""

    def _static_match(self, m: Match) -> BDDNode | bool:
        return self._match(m, frozenset())


class _Unmemoised(Interpreter):
    matcher_type = _UnmemoisedMatcher


def test_match_memo_equals_fresh_matches() -> None:
    rng = random.Random(17)
    pred_of = {f"s{k}": k for k in range(N_SETS)}
    signatures = [frozenset(c) for n in range(N_SETS + 1) for c in combinations(range(N_SETS), n)]
    shared_seen = 0
    for case in range(120):
        rules = _shared(rng, _ruleset(rng))
        all_matches = [m for c in rules.chains.values() for r in c.rules for m in r.matches]
        shared_seen += len(all_matches) - len({id(m) for m in all_matches})
        space = HeaderSpace()
        names = [f"x{k}" for k in range(N_SETS)]
        space.bdd.declare(*names)
        members: dict[int, BDDNode] = {k: space.bdd.var(names[k]) for k in range(N_SETS)}
        memo = Interpreter(space, rules, HookName.INPUT, pred_of, None, members)
        fresh = _Unmemoised(space, rules, HookName.INPUT, pred_of, None, members)
        assert memo.hook_accept(frozenset()) == fresh.hook_accept(frozenset()), case
        assert not fresh.matcher._match_memo
        walk, walk_fresh = (cls(space, rules, HookName.INPUT, pred_of, None) for cls in (Interpreter, _Unmemoised))
        for sig in signatures:
            assert walk.hook_accept(sig) == walk_fresh.hook_accept(sig), (case, sorted(sig))
    assert shared_seen > 500  # the memo was hit


def _split_fresh(interp: RuleMatcher, matches: tuple[Match, ...]) -> tuple[BDDNode, BDDNode] | None:
    """The symbolic split rule by rule, nothing memoised (the path the memo replaces)."""
    sp = interp.space
    static, member = sp.true, sp.true
    for m in matches:
        r = interp._match(m, frozenset())
        if r is False:
            return None
        if r is True:
            continue
        if isinstance(m, AddrIn) and m.addr is interp.peer:
            member = member & r
        else:
            static = static & r
    if static == sp.false or member == sp.false:
        return None
    return static, member


class _FreshSplitMatcher(RuleMatcher):
    def _split_matches(self, matches: tuple[Match, ...]) -> tuple[BDDNode, BDDNode] | None:
        return _split_fresh(self, matches)


class _FreshSplit(Interpreter):
    matcher_type = _FreshSplitMatcher


def test_split_memo_equals_fresh_splits() -> None:
    rng = random.Random(23)
    pool: list[Match] = [
        IntIn(Field.L4PROTO, ((6, 6),)), IntIn(Field.L4PROTO, ((17, 17),)), IntIn(Field.L4PROTO, ((6, 17),)),
        IntIn(Field.DPORT, ((1, 5),)), IntIn(Field.DPORT, ((3, 9),)), IntIn(Field.DPORT, ((3, 9),), negate=True),
        IntIn(Field.SPORT, ((7, 7),)), CtState(frozenset({"new"})), CtState(frozenset({"new"}), negate=True),
        FamilyIs(Family.V4), FamilyIs(Family.V6), AddrIn(Addr.SADDR, Family.V6, "s0"),
        *(AddrIn(Addr.SADDR, Family.V4, f"s{k}", negate=neg) for k in range(N_SETS) for neg in (False, True)),
    ]  # fmt: skip
    pred_of = {f"s{k}": k for k in range(N_SETS)}
    rules = _ruleset(random.Random(0))
    hits = 0
    for case in range(40):
        space = HeaderSpace()
        names = [f"x{k}" for k in range(N_SETS)]
        space.bdd.declare(*names)
        members: dict[int, BDDNode] = {k: space.bdd.var(names[k]) for k in range(N_SETS)}
        interp = RuleMatcher(space, rules, HookName.INPUT, pred_of, None, members)
        for _ in range(200):
            matches = tuple(rng.sample(pool, rng.randint(0, 5)))
            assert interp._split_matches(matches) == _split_fresh(interp, matches), (case, matches)
        hits += sum(len(k) > 1 for k in interp._static_of)
    assert hits > 100  # the memo of several static matches was filled (and then hit)


def test_split_memo_in_the_walk_equals_fresh_splits() -> None:
    rng = random.Random(29)
    pred_of = {f"s{k}": k for k in range(N_SETS)}
    for case in range(120):
        rules = _shared(rng, _ruleset(rng))
        space = HeaderSpace()
        names = [f"x{k}" for k in range(N_SETS)]
        space.bdd.declare(*names)
        members: dict[int, BDDNode] = {k: space.bdd.var(names[k]) for k in range(N_SETS)}
        memo = Interpreter(space, rules, HookName.INPUT, pred_of, None, members)
        fresh = _FreshSplit(space, rules, HookName.INPUT, pred_of, None, members)
        assert memo.hook_accept(frozenset()) == fresh.hook_accept(frozenset()), case
