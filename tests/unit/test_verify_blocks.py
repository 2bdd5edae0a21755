"""The symbolic chain walk's shortcuts (session 7) against the per-class walk they replace.

:meth:`Interpreter._chain_symbolic` evaluates runs of deciding rules as blocks merged in a
balanced tree, resolves a goto/jump to a chain that accepts, drops or returns every packet
into that outcome, and takes a verdict map with disjoint keys as one block (overlapping keys:
first element wins, one block per element). Here random chains using all of these (negated
set tests, port and protocol matches, returns, gotos and jumps, verdict maps with disjoint
and with overlapping keys, both base-chain policies) are evaluated twice: once over
membership variables, once per class signature by the class walk (:meth:`Interpreter.chain`,
unchanged), and the first, with the variables set to each signature, must equal the second.
The policy side's balanced first match is checked against the rule-by-rule if-then-else.
"""

from __future__ import annotations

import random
from dataclasses import replace
from itertools import combinations

from stockade.model.addresses import Family
from stockade.verify.interpret import Interpreter
from stockade.verify.loaded import (
    Addr,
    AddressSet,
    AddrIn,
    Chain,
    FamilyRules,
    Field,
    HookName,
    IntIn,
    Kind,
    MapElement,
    Match,
    Rule,
    Verdict,
)
from stockade.verify.space import BDDNode, HeaderSpace, disjoin
from stockade.verify.spec import first_match

N_SETS = 4


def _matches(rng: random.Random) -> tuple[Match, ...]:
    out: list[Match] = []
    if rng.random() < 0.8:
        out.append(AddrIn(Addr.SADDR, Family.V4, f"s{rng.randrange(N_SETS)}", negate=rng.random() < 0.15))
    if rng.random() < 0.5:
        out.append(IntIn(Field.L4PROTO, ((rng.choice((6, 17)),) * 2,)))
    if rng.random() < 0.5:
        lo = rng.randrange(0, 12)
        out.append(IntIn(Field.DPORT, ((lo, lo + rng.randrange(0, 4)),), negate=rng.random() < 0.1))
    return tuple(out)


def _elements(rng: random.Random, targets: list[str], overlapping: bool) -> tuple[MapElement, ...]:
    out, port = [], 0
    for _ in range(rng.randint(1, 5)):
        lo = rng.randrange(0, 12) if overlapping else port
        hi = lo + rng.randrange(0, 3)
        port = hi + 1
        kind = rng.choice((Kind.ACCEPT, Kind.DROP, Kind.JUMP, Kind.GOTO) if targets else (Kind.ACCEPT, Kind.DROP))
        target = rng.choice(targets) if kind in (Kind.JUMP, Kind.GOTO) else ""
        out.append(MapElement(6, lo, hi, Verdict(kind, target)))
    return tuple(out)


def _ruleset(rng: random.Random) -> FamilyRules:
    """Chains c0..c3 (each jumps only to later ones) under the base chain "input"."""
    names = ["input", "c0", "c1", "c2", "c3"]
    chains: dict[str, Chain] = {}
    maps: dict[str, tuple[MapElement, ...]] = {}
    for i, name in enumerate(names):
        later = names[i + 1:]
        rules: list[Rule] = []
        shape = rng.random()
        for _ in range(rng.randint(0, 9)):
            roll = rng.random()
            if shape < 0.2:  # a verdict chain: decides everything alike (resolved as an outcome)
                kind = rng.choice((Kind.ACCEPT, Kind.DROP, Kind.RETURN))
                rules.append(Rule((), Verdict(kind)))
                break
            if roll < 0.15 and later:
                kind = rng.choice((Kind.JUMP, Kind.GOTO))
                rules.append(Rule(_matches(rng), Verdict(kind, rng.choice(later))))
            elif roll < 0.25:
                key = f"m{len(maps)}"
                maps[key] = _elements(rng, later, overlapping=rng.random() < 0.4)
                rules.append(Rule(_matches(rng), Verdict(Kind.VMAP, key)))
            elif roll < 0.3:
                rules.append(Rule(_matches(rng), Verdict(Kind.CONTINUE)))
            else:
                kinds = (Kind.ACCEPT, Kind.DROP) if name == "input" else (Kind.ACCEPT, Kind.DROP, Kind.RETURN)
                run = rng.choice(kinds)
                for _ in range(rng.randint(1, 3)):  # runs of one verdict (merged)
                    rules.append(Rule(_matches(rng), Verdict(run)))
        policy = rng.choice((Kind.ACCEPT, Kind.DROP)) if name == "input" else None
        chains[name] = Chain(name, tuple(rules), policy)
    sets = {f"s{k}": AddressSet(Family.V4, ((k * 10, k * 10 + 5),)) for k in range(N_SETS)}
    return FamilyRules(Family.V4, chains, {HookName.INPUT: ("input",)}, sets, maps)


def test_symbolic_chains_equal_the_class_walk() -> None:
    rng = random.Random(7)
    pred_of = {f"s{k}": k for k in range(N_SETS)}
    signatures = [frozenset(c) for n in range(N_SETS + 1) for c in combinations(range(N_SETS), n)]
    for case in range(150):
        rules = _ruleset(rng)
        space = HeaderSpace()
        names = [f"x{k}" for k in range(N_SETS)]
        space.bdd.declare(*names)
        members: dict[int, BDDNode] = {k: space.bdd.var(names[k]) for k in range(N_SETS)}
        symbolic = Interpreter(space, rules, HookName.INPUT, pred_of, None, members).hook_accept(frozenset())
        walk = Interpreter(space, rules, HookName.INPUT, pred_of, None)
        for sig in signatures:
            assignment = {names[k]: k in sig for k in range(N_SETS)}
            assert space.bdd.let(assignment, symbolic) == walk.hook_accept(sig), (case, sorted(sig), rules)


def test_balanced_first_match_equals_rule_by_rule() -> None:
    rng = random.Random(11)
    space = HeaderSpace()
    names = [f"x{k}" for k in range(6)]
    space.bdd.declare(*names)
    ports = [space.field_in(Field.DPORT, ((lo, lo + 3),)) for lo in range(0, 40, 4)]
    for _ in range(200):
        leaves = []
        for _ in range(rng.randint(0, 12)):
            m = space.bdd.var(rng.choice(names)) & rng.choice(ports)
            leaves.append((m, m if rng.random() < 0.5 else space.false))
        matched, accepted = first_match(space, leaves)
        want_m, want_a = space.false, space.false
        for m, a in reversed(leaves):
            want_a = space.bdd.ite(m, a, want_a)
            want_m = m | want_m
        assert (matched, accepted) == (want_m, want_a)
        assert disjoin(space, [m for m, _ in leaves]) == want_m


def test_symbolic_chains_with_marks_equal_the_class_walk() -> None:
    """The same at the output hook with ``mark`` rules (steering into the tunnel) in every
    chain: runs of gotos are then blocks carrying the packets their target marks, merged with
    the first block winning (session 9: as ``ite(M1, K1, K2)``)."""
    rng = random.Random(37)
    pred_of = {f"s{k}": k for k in range(N_SETS)}
    signatures = [frozenset(c) for n in range(N_SETS + 1) for c in combinations(range(N_SETS), n)]
    marked = 0
    for case in range(150):
        base = _ruleset(rng)
        chains: dict[str, Chain] = {}
        for name, chain in base.chains.items():
            rules = []
            for r in chain.rules:
                matches = tuple(replace(m, addr=Addr.DADDR) if isinstance(m, AddrIn) else m for m in r.matches)
                verdict = r.verdict
                if verdict.kind in (Kind.ACCEPT, Kind.DROP, Kind.RETURN, Kind.CONTINUE) and rng.random() < 0.3:
                    verdict = Verdict(Kind.MARK)
                    marked += 1
                rules.append(Rule(matches, verdict))
            chains[name] = Chain(name, tuple(rules), chain.policy)
        rules_out = replace(base, chains=chains, hooks={HookName.OUTPUT: ("input",)})
        space = HeaderSpace()
        names = [f"x{k}" for k in range(N_SETS)]
        space.bdd.declare(*names)
        members: dict[int, BDDNode] = {k: space.bdd.var(names[k]) for k in range(N_SETS)}
        symbolic = Interpreter(space, rules_out, HookName.OUTPUT, pred_of, None, members).hook_accept(frozenset())
        walk = Interpreter(space, rules_out, HookName.OUTPUT, pred_of, None)
        for sig in signatures:
            assignment = {names[k]: k in sig for k in range(N_SETS)}
            assert space.bdd.let(assignment, symbolic) == walk.hook_accept(sig), (case, sorted(sig), rules_out)
    assert marked > 200
