"""The prover without a kernel: address classes, the read-back parsers, offline proofs of rendered artifacts.

* address classes are exact (brute force over a small address range);
* 80 random policies rendered by the iptables renderer are proven equal offline, and single
  mutations of the rendered text are found, with a counterexample the evaluator-side spec
  and the kernel-side model disagree on;
* nftables JSON with constructs the prover does not model is refused, naming the construct;
* a JSON listing (as ``nft -j`` prints it) of a policy proves equal, and a removed element
  yields a counterexample from the hinted address.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from stockade.backends.iptables.render import render_iptables
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family, merge_ranges
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from stockade.verify.ipt_readback import parse_iptables
from stockade.verify.nft_readback import parse_nft_table
from stockade.verify.offline import iptables_save_texts, prove_iptables_artifact
from stockade.verify.prove import prove
from stockade.verify.samples import random_host_policy
from stockade.verify.space import address_classes


def test_address_classes_are_exact() -> None:
    rng = random.Random(7)
    for _ in range(50):
        preds = []
        for _ in range(rng.randint(0, 5)):
            rs = sorted({(lo, lo + rng.randint(0, 9)) for lo in (rng.randint(0, 200) for _ in range(3))})
            merged: list[tuple[int, int]] = []
            for lo, hi in rs:
                if merged and lo <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
                else:
                    merged.append((lo, hi))
            preds.append(tuple(merged))
        for _ in range(rng.randint(0, 3)):  # single addresses (peers), merged as the prover merges them
            preds.append(merge_ranges((x, x) for x in {rng.randint(0, 60) for _ in range(rng.randint(1, 12))}))
        rng.shuffle(preds)
        classes = address_classes(preds, Family.V4, hints=[rng.randint(0, 250)])
        sig_of = {c.members: c for c in classes}
        assert len(sig_of) == len(classes)
        every = {frozenset(i for i, p in enumerate(preds) if any(lo <= a <= hi for lo, hi in p)) for a in range(260)}
        assert set(sig_of) == every  # no class without an address, none missing
        for a in range(0, 260):
            sig = frozenset(i for i, p in enumerate(preds) if any(lo <= a <= hi for lo, hi in p))
            assert sig in sig_of
            ex = sig_of[sig].example
            assert frozenset(i for i, p in enumerate(preds) if any(lo <= ex <= hi for lo, hi in p)) == sig


def test_random_iptables_artifacts_prove_equal_offline() -> None:
    for seed in range(80):
        hp = random_host_policy(random.Random(seed))
        proof = prove_iptables_artifact(hp, render_iptables(hp))
        assert proof.proven, f"seed {seed}: {proof.summary()}"


def _mutants(text: str) -> list[str]:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        ours = line.startswith(("-A STOCKADE-IN", "-A STOCKADE-OUT"))
        if not ours or line.startswith(("-A STOCKADE-INPUT", "-A STOCKADE-OUTPUT")):
            continue
        if "-j RETURN" in line and "failsafe" not in line:
            out.append("\n".join([*lines[:i], line.replace("-j RETURN", "-j DROP"), *lines[i + 1:]]))
        if "-j DROP" in line and "default" not in line:
            out.append("\n".join([*lines[:i], *lines[i + 1:]]))
    return out


def test_mutated_iptables_text_is_caught() -> None:
    caught = total = 0
    for seed in range(15):
        hp = random_host_policy(random.Random(seed), mode=EnforcementMode.FULL)
        v4, v6, ipsets = iptables_save_texts(render_iptables(hp))
        for mutant in _mutants(v4):
            total += 1
            proof = prove(hp, parse_iptables(mutant, v6, ipsets))
            # many text mutants are equivalent (a rule on an empty set, or shadowed): only the
            # kernel test's hand-made mutants are all semantic; here every difference must be real
            caught += not proof.proven
            for d in proof.differences:
                assert d.policy_accepts != d.kernel_accepts
    assert total > 20 and caught > total // 4, (caught, total)


def _policy() -> HostPolicy:
    n = ipaddress.ip_network
    return HostPolicy(
        "srv", EnforcementMode.FULL, (ipaddress.ip_address("10.77.0.1"),),
        (HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/a/0", "pa", (ServiceEntry(Proto.TCP, 80, 80),)),),
        (AddressSet("pa", Family.V4, (n("10.0.0.1/32"),)), AddressSet("pa", Family.V6, ())),
        Failsafe(),
    )  # fmt: skip


def _rule(chain: str, *expr: object, comment: str = "") -> dict[str, object]:
    body: dict[str, object] = {"family": "inet", "table": "t", "chain": chain, "handle": 1, "expr": list(expr)}
    if comment:
        body["comment"] = comment
    return {"rule": body}


def _listing(extra: list[dict[str, object]] | None = None, elems: list[str] | None = None) -> list[dict[str, object]]:
    """A hand-written list-layout table for ``_policy()``, in ``nft -j`` form."""
    tcp80 = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}
    tcp22 = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}
    saddr = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@pa_v4"}}
    est = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
    lo_in = {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}
    lo_out = {"match": {"op": "==", "left": {"meta": {"key": "oif"}}, "right": "lo"}}
    nd = {"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                    "right": {"set": [{"range": [133, 137]}]}}}
    return [
        {"table": {"family": "inet", "name": "t"}},
        {"set": {"family": "inet", "table": "t", "name": "pa_v4", "type": "ipv4_addr",
                 "elem": elems if elems is not None else ["10.0.0.1"]}},
        {"chain": {"family": "inet", "table": "t", "name": "input", "type": "filter", "hook": "input", "prio": 0,
                   "policy": "drop"}},
        {"chain": {"family": "inet", "table": "t", "name": "output", "type": "filter", "hook": "output", "prio": 0,
                   "policy": "drop"}},
        _rule("input", est, {"accept": None}), _rule("input", lo_in, {"accept": None}),
        _rule("input", nd, {"accept": None}), _rule("input", tcp22, {"accept": None}),
        *(extra or []),
        _rule("input", tcp80, saddr, {"counter": None}, {"accept": None}),
        _rule("output", est, {"accept": None}), _rule("output", lo_out, {"accept": None}),
        _rule("output", nd, {"accept": None}),
    ]  # fmt: skip


def test_nft_listing_proves_and_a_removed_element_is_found() -> None:
    hp = _policy()
    assert prove(hp, parse_nft_table(_listing(), "t")).proven
    proof = prove(hp, parse_nft_table(_listing(elems=[]), "t"), hints=[ipaddress.ip_address("10.0.0.1")])
    d = proof.differences[0]
    assert str(d.packet.src) == "10.0.0.1" and d.packet.dport == 80 and d.policy_accepts and not d.kernel_accepts


@pytest.mark.parametrize(
    ("expr", "construct"),
    [
        ({"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}}, "meta mark"),
        ({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, "interface"),
        ({"limit": {"rate": 5, "per": "second"}}, "limit"),
        ({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "ttl"}}, "right": 1}}, "ttl"),
    ],
)
def test_unmodelled_nft_constructs_are_refused(expr: dict[str, object], construct: str) -> None:
    listing = _listing([_rule("input", expr, {"accept": None})])
    with pytest.raises(UnmodelledConstructError, match=construct):
        parse_nft_table(listing, "t")


def test_unmodelled_iptables_constructs_are_refused() -> None:
    hp = random_host_policy(random.Random(1))
    v4, v6, ipsets = iptables_save_texts(render_iptables(hp))
    for bad, what in (("-m mark --mark 1 -j RETURN", "mark"), ("-i eth0 -j RETURN", "eth0"),
                      ("-j MARK --set-mark 1", "set-mark"), ("-j MARK", "MARK")):  # fmt: skip
        text = v4.replace("COMMIT", f"-A STOCKADE-IN {bad}\nCOMMIT")
        with pytest.raises(UnmodelledConstructError, match=what):
            parse_iptables(text, v6, ipsets)


def test_symbolic_memberships_and_the_class_sweep_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path (set membership as BDD variables) proves what the sweep proves, and a
    mutant it cannot prove still gets the sweep's concrete counterexample."""
    import stockade.verify.prove as prove_module

    for seed in range(30):
        hp = random_host_policy(random.Random(seed), mode=EnforcementMode.FULL)
        v4, v6, ipsets = iptables_save_texts(render_iptables(hp))
        variants = [v4, *_mutants(v4)[:3]]
        for text in variants:
            loaded = parse_iptables(text, v6, ipsets)
            fast = prove(hp, loaded)
            monkeypatch.setattr(prove_module, "SYMBOLIC_MEMBERS_MAX_RULES", -1)
            slow = prove(hp, loaded)
            monkeypatch.undo()
            assert fast.proven == slow.proven, (seed, fast.summary(), slow.summary())
            assert [str(d) for d in fast.differences] == [str(d) for d in slow.differences]


def test_iptables_save_tokens_equal_shlex() -> None:
    """The read-back's fast tokenizer splits every line as shlex does (it falls back to shlex
    wherever quoting could make them differ)."""
    import shlex

    from stockade.verify.ipt_readback import _tokens

    rng = random.Random(3)
    lines = [
        '-A STOCKADE-IN -m set --match-set S src -m comment --comment "ruleset/r1/0" -j NFLOG --nflog-prefix "stk:a"',
        'a""b', 'a "" b', 'a"b c"d', '-A X --comment "a\\"b"', "a 'b c'", 'a "b', '"a b" "c d"', "x\ty", "é",
    ]  # fmt: skip
    lines += ["".join(rng.choice(' ab"\'\\\t') for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    for line in lines:
        try:
            want: object = shlex.split(line)
        except ValueError:
            want = ValueError
        try:
            got: object = _tokens(line)
        except ValueError:
            got = ValueError
        assert got == want, repr(line)
