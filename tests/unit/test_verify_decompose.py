"""The prover's decompositions (session 6) hide no difference.

* **Membership variables at any size**: a policy of 350 rules (above session 5's 300-rule
  limit) are proven without an address sweep, and on their mutants the fast path agrees with
  the exact sweep (same outcome, same counterexamples).
* **Merged runs** (consecutive rules with one verdict evaluated as one rule whose match is
  their OR): a mutant in EACH rule of a run is found, with a packet from that rule's set; a
  mutant that shows only ACROSS two runs (an address in the sets of both) is found, with that
  address.
* **Set parts grouped by name**: two policy sets whose kernel parts have equal contents still
  take the membership path, and their memberships are the OR of their own parts.
* **Atom classes** (eBPF identities): the same classes as the full boundary sweep, on random
  disjoint atoms with unions and a predicate inside an atom, and refused when atoms overlap.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from stockade.backends.iptables.render import render_iptables
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.model.addresses import Family, Range, merge_ranges, subtract_ranges
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from stockade.verify import prove as prove_module
from stockade.verify.ipt_readback import parse_iptables
from stockade.verify.members import symbolic_members
from stockade.verify.offline import iptables_save_texts
from stockade.verify.prove import Proof, prove
from stockade.verify.samples import random_host_policy
from stockade.verify.space import HeaderSpace, address_classes, atom_classes

TCP80 = (ServiceEntry(Proto.TCP, 80, 80),)


def _sets(name: str, *addrs: str) -> tuple[AddressSet, AddressSet]:
    nets = tuple(ipaddress.ip_network(a) for a in addrs)
    return AddressSet(name, Family.V4, nets), AddressSet(name, Family.V6, ())


def _run_policy() -> HostPolicy:
    """An allow on ``pa`` then a run of three denies (pb0..pb2) on the same port: the
    iptables renderer emits the denies as three consecutive DROP rules, one merged run."""
    rules = [HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/a/0", "pa", TCP80)]
    rules += [HostRule(Action.DENY, Direction.INBOUND, f"deny/b{i}", f"pb{i}", TCP80) for i in range(3)]
    sets = (
        *_sets("pa", "10.0.0.1/32", "10.0.0.9/32"),
        *_sets("pb0", "10.0.0.1/32", "10.0.1.0/32"),  # 10.0.0.1 is in pa too: allowed
        *_sets("pb1", "10.0.2.0/32"),
        *_sets("pb2", "10.0.3.0/32"),
    )
    return HostPolicy(
        "srv", EnforcementMode.SELECTIVE, (ipaddress.ip_address("10.77.0.1"),),
        tuple(sorted(rules)), tuple(sorted(sets)), Failsafe(),
    )  # fmt: skip


def _prove_text(hp: HostPolicy, v4: str) -> Proof:
    _, v6, ipsets = iptables_save_texts(render_iptables(hp))
    return prove(hp, parse_iptables(v4, v6, ipsets))


def _drop_line(v4: str, set_name: str) -> str:
    return next(line for line in v4.splitlines() if f"--match-set {set_name} " in line and line.endswith("-j DROP"))


def test_the_run_policy_is_proven_without_a_sweep() -> None:
    hp = _run_policy()
    v4, _, _ = iptables_save_texts(render_iptables(hp))
    assert _drop_line(v4, "STOCKADE-pb1-v4") in v4
    proof = _prove_text(hp, v4)
    assert proof.proven and proof.classes == 0, proof.summary()


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("mutation", ["deleted", "drop-to-return"])
def test_a_mutant_in_each_rule_of_a_merged_run_is_found(which: int, mutation: str) -> None:
    hp = _run_policy()
    v4, _, _ = iptables_save_texts(render_iptables(hp))
    line = _drop_line(v4, f"STOCKADE-pb{which}-v4")
    replacement = "" if mutation == "deleted" else line.replace("-j DROP", "-j RETURN")
    proof = _prove_text(hp, v4.replace(line + "\n", replacement + ("\n" if replacement else "")))
    assert not proof.proven
    (diff,) = proof.differences
    witness = {0: "10.0.1.0", 1: "10.0.2.0", 2: "10.0.3.0"}[which]  # pb0's other address is allowed by pa
    assert str(diff.packet.src) == witness and diff.packet.dport == 80 and diff.packet.l4proto == 6
    assert not diff.policy_accepts and diff.kernel_accepts


def test_a_mutant_that_shows_only_across_two_runs_is_found() -> None:
    """pb0's DROP copied in front of pa's RETURN: only 10.0.0.1, in pa AND pb0, changes."""
    hp = _run_policy()
    v4, _, _ = iptables_save_texts(render_iptables(hp))
    drop = _drop_line(v4, "STOCKADE-pb0-v4").replace("-A STOCKADE-IN-d ", "-A STOCKADE-IN-a ")
    allow = next(line for line in v4.splitlines() if "STOCKADE-pa-v4" in line and line.endswith("-j RETURN"))
    proof = _prove_text(hp, v4.replace(allow, f"{drop}\n{allow}"))
    (diff,) = proof.differences
    assert str(diff.packet.src) == "10.0.0.1" and diff.policy_accepts and not diff.kernel_accepts


def test_large_policies_take_the_membership_path_and_agree_with_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(6)
    for seed in range(1):
        hp = random_host_policy(
            random.Random(seed), rules=350, peers=60, sets=100, identities=12, mode=EnforcementMode.FULL
        )
        v4, v6, ipsets = iptables_save_texts(render_iptables(hp))
        proof = prove(hp, parse_iptables(v4, v6, ipsets))
        assert proof.proven and proof.classes == 0, proof.summary()
        lines = v4.splitlines()
        verdicts = [i for i, line in enumerate(lines) if line.endswith(("-j DROP", "-j RETURN")) and "-p " in line]
        for i in rng.sample(verdicts, 3):
            swapped = lines[i].replace("-j DROP", "-j RETURN") if lines[i].endswith("DROP") else lines[i][:-6] + "DROP"
            mutant = "\n".join([*lines[:i], swapped, *lines[i + 1:]]) + "\n"  # fmt: skip
            loaded = parse_iptables(mutant, v6, ipsets)
            fast = prove(hp, loaded)
            monkeypatch.setattr(prove_module, "SYMBOLIC_MEMBERS_MAX_RULES", -1)
            slow = prove(hp, loaded)
            monkeypatch.undo()
            assert fast.proven == slow.proven, (seed, i, fast.summary(), slow.summary())
            assert [str(d) for d in fast.differences] == [str(d) for d in slow.differences]


def test_policy_sets_sharing_a_part_take_the_membership_path() -> None:
    """nftables splits a set into ``_host`` and ``_net`` parts; two sets with the same /31 have
    parts of equal contents (one predicate). Session 5 lost one of the names and swept."""
    ranges: list[tuple[Range, ...]] = [
        ((1, 1), (10, 11)),  # 0: policy set a
        ((2, 2), (10, 11)),  # 1: policy set b
        ((1, 1),),  # 2: a_v4_host
        ((10, 11),),  # 3: a_v4_net == b_v4_net
        ((2, 2),),  # 4: b_v4_host
    ]
    spec = {"a": 0, "b": 1}
    kernel = {"a_v4_host": 2, "a_v4_net": 3, "b_v4_host": 4, "b_v4_net": 3}
    space = HeaderSpace()
    found = symbolic_members(space, Family.V4, ranges, spec, kernel)
    assert found is not None
    members, constraint = found
    assert members[0] == members[2] | members[3]
    assert members[1] == members[4] | members[3]
    assert constraint == ~(members[2] & members[3]) & ~(members[4] & members[3])
    # a part that is no part of its set's contents: refused (the sweep decides)
    bad = dict(kernel, b_v4_net=2)
    assert symbolic_members(space, Family.V4, ranges, spec, bad) is None


def _rand_ranges(rng: random.Random, lo: int, hi: int, n: int) -> tuple[Range, ...]:
    points = sorted(rng.sample(range(lo, hi), 2 * n))
    return merge_ranges(zip(points[::2], points[1::2], strict=True))


def test_atom_classes_equal_the_sweep() -> None:
    rng = random.Random(11)
    for _ in range(200):
        n_atoms = rng.randint(1, 6)
        cuts = sorted(rng.sample(range(1, 1000), n_atoms * 2))
        atoms = [merge_ranges([(cuts[2 * i], cuts[2 * i + 1])]) for i in range(n_atoms)]
        # split some atoms into several ranges (identities have many members)
        atoms = [a if rng.random() < 0.5 else _split(rng, a) for a in atoms]
        preds: list[tuple[Range, ...]] = list(atoms)
        for _ in range(rng.randint(0, 4)):  # unions of atoms (policy sets)
            picks = rng.sample(range(n_atoms), rng.randint(1, n_atoms))
            preds.append(merge_ranges(r for k in picks for r in atoms[k]))
        if rng.random() < 0.5:  # one predicate strictly inside one atom (the controller)
            host = rng.choice(atoms)
            lo, hi = host[0]
            if hi > lo:
                preds.append(((lo, lo),))
        if rng.random() < 0.2:
            preds.append(())
        hints = [rng.randint(0, 1200) for _ in range(3)]
        got = atom_classes(preds, range(n_atoms), Family.V4, hints)
        want = address_classes(preds, Family.V4, hints)
        assert got is not None
        assert [c.members for c in got] == [c.members for c in want]  # the same classes, in the same order
        for c in got:
            assert frozenset(i for i, p in enumerate(preds) if any(lo <= c.example <= hi for lo, hi in p)) == c.members
    overlapping = [((1, 5),), ((5, 9),)]
    assert atom_classes(overlapping, range(2), Family.V4) is None
    straddling = [((1, 5),), ((6, 9),), ((5, 6),)]  # neither a union of atoms nor inside one
    assert atom_classes(straddling, range(2), Family.V4) is None


def test_atom_classes_refuse_near_unions() -> None:
    """Predicates that are ALMOST a union of atoms (one address more or less, an atom's first
    address kept but one of its other ranges dropped, one atom swapped for a same-size range
    elsewhere) are never taken for the union: atom_classes either says None or gives the
    sweep's classes. (Its union check compares sizes first, then the merged ranges.)"""
    rng = random.Random(23)
    refused = 0
    for _ in range(300):
        n_atoms = rng.randint(2, 6)
        cuts = sorted(rng.sample(range(1, 2000), n_atoms * 2))
        atoms = [_split(rng, merge_ranges([(cuts[2 * i], cuts[2 * i + 1])])) for i in range(n_atoms)]
        picks = rng.sample(range(n_atoms), rng.randint(1, n_atoms))
        union = merge_ranges(r for k in picks for r in atoms[k])
        how = rng.randrange(5)
        if how == 0:  # one address more, just past a range
            lo, hi = rng.choice(union)
            near = merge_ranges([*union, (hi + 1, hi + 1)])
        elif how == 1:  # one address less
            lo, hi = rng.choice(union)
            near = subtract_ranges(union, ((lo, lo),))
        elif how == 2:  # an atom's later range dropped (its lowest address still in)
            k = rng.choice(picks)
            last = atoms[k][0][1]
            near = subtract_ranges(union, atoms[k][1:] if len(atoms[k]) > 1 else ((last, last),))
        elif how == 3:  # as many addresses, shifted off the atoms' edges
            near = tuple((lo + 1, hi + 1) for lo, hi in union)
        else:  # as many addresses, every atom's lowest still in: an atom's last one swapped for a free one
            k = rng.choice(picks)
            last = atoms[k][-1][1]
            free = next(a for a in range(2001, 2100) if all(not lo <= a <= hi for at in atoms for lo, hi in at))
            if last == atoms[k][0][0]:
                continue
            near = merge_ranges([*subtract_ranges(union, ((last, last),)), (free, free)])
        if not near or near == union:
            continue
        preds: list[tuple[Range, ...]] = [*atoms, near]
        got = atom_classes(preds, range(n_atoms), Family.V4)
        want = address_classes(preds, Family.V4)
        if got is None:
            refused += 1
            continue
        assert [c.members for c in got] == [c.members for c in want]
    assert refused > 100


def _split(rng: random.Random, atom: tuple[Range, ...]) -> tuple[Range, ...]:
    lo, hi = atom[0]
    if hi - lo < 4:
        return atom
    a = rng.randint(lo + 1, hi - 2)
    return ((lo, a - 1), (a + 1, hi))


def test_ipset_members_merge_as_merge_ranges() -> None:
    """The read-back's fast merge of ipset members (C-level when already apart) equals
    merge_ranges on overlapping, adjacent, nested and apart members."""
    from stockade.verify.ipt_readback import _merged

    rng = random.Random(5)
    for _ in range(3000):
        rs = [(a, a + rng.choice((0, 0, 0, 1, 3))) for a in (rng.randint(0, 60) for _ in range(rng.randint(0, 12)))]
        assert _merged(list(rs)) == merge_ranges(rs), rs
