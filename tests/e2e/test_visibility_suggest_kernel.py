"""Kernel proof of suggestions: rules suggested from real traffic allow exactly that traffic.

1. Every workload of the example estate is a lab host (plus an unmanaged office desktop) in
   visibility mode, enforced by the real nftables backend; an NFLOG reader runs in each host.
2. The "legitimate" traffic - the probes the estate's policy allows in full mode - is sent for
   real; what the kernel logs becomes flow records, merged per connection.
3. Suggestions are made from those connections for every app group, against a draft holding the
   estate's inventory, services and IP lists but no rule at all, and all are accepted.
4. That policy is enforced in full mode and the whole probe vocabulary (every host pair, every
   port, TCP/UDP/ICMP, v4 and v6) is probed: a probe gets through exactly when it was part of
   the observed traffic.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import replace

import pytest

from stockade.evaluator import Evaluator, Verdict
from stockade.lab import probe_matrix
from stockade.lab.estate import EstateLab, evaluate_probe, hosts_for_policy, registry_backend
from stockade.model import EnforcementMode, Label, Policy
from stockade.policyfile import load_policy
from stockade.visibility import FlowRecord, accept, merge_sides, suggest, with_accepted
from stockade.visibility.appmap import group_values
from tests.e2e.harness import ESTATE
from tests.e2e.test_visibility_nflog import GROUP, Collector

pytestmark = pytest.mark.kernel
A = ipaddress.ip_address
OFFICE = ("office", (A("10.70.0.200"), A("fd70::c8")))
TCP = (22, 443, 445, 5432, 8080, 9100, 12345)
UDP = (53,)


def moded(policy: Policy, mode: EnforcementMode) -> Policy:
    return replace(policy, workloads=tuple(replace(w, mode=mode) for w in policy.workloads))


@pytest.fixture(scope="module")
def estate_lab() -> Iterator[EstateLab]:
    estate = load_policy(ESTATE)
    hosts = hosts_for_policy(estate, tcp_ports=TCP, udp_ports=UDP, unmanaged=[OFFICE])
    with EstateLab(hosts, backend=registry_backend("nftables", log_group=GROUP)) as lab:
        yield lab


def test_suggested_rules_allow_exactly_the_observed_traffic(estate_lab: EstateLab) -> None:
    estate = load_policy(ESTATE)
    vocabulary = probe_matrix([(n, h.addresses) for n, h in estate_lab.hosts.items()], tcp_ports=TCP,
                              udp_ports=UDP)
    full = Evaluator(moded(estate, EnforcementMode.FULL))
    legit = [p for p in vocabulary if evaluate_probe(full, p).verdict is Verdict.ALLOWED]
    assert 50 < len(legit) < len(vocabulary) // 3

    # 1-2. visibility mode: send the legitimate traffic for real and read what the kernel logs
    visible = moded(estate, EnforcementMode.VISIBILITY)
    estate_lab.enforce(visible)
    collectors = [Collector(estate_lab.lab.netns(w.name)) for w in estate.workloads]
    run = estate_lab.check(visible, legit)
    packets = [p for c in collectors for p in c.finish()]
    assert not run.disagreements and all(c.result.succeeded for c in run.checks)
    records = [FlowRecord(p.key, p.side, p.verdict, p.rule_id, 1, p.time, p.time) for p in packets]
    connections = merge_sides(records)
    seen = {(c.key.src, c.key.dst, c.key.proto, c.key.port) for c in connections}
    wanted = {(p.src, p.dst, p.proto, p.evaluator_port) for p in legit}
    assert wanted <= seen  # every legitimate connection was logged (by one side or both)

    # 3. suggestions for every app group, accepted into a draft without rules
    draft = replace(estate, rulesets=(), deny_rules=())
    groups = sorted({group_values(w.labels, ("app", "env")) for w in estate.workloads})
    for values in groups:
        group = tuple(Label(k, v) for k, v in zip(("app", "env"), values, strict=True))
        draft = with_accepted(draft, accept(suggest(draft, connections, group)))
    assert draft.validate() == []

    # 4. full mode: the real kernel lets through exactly the observed traffic
    suggested = moded(draft, EnforcementMode.FULL)
    result = estate_lab.run(suggested, vocabulary)
    assert [c.describe() for c in result.disagreements] == []  # the kernel agrees with the evaluator
    got_through = {c.probe for c in result.checks if c.result.succeeded}
    assert got_through == set(legit), (
        f"allowed but not observed: {sorted(map(str, got_through - set(legit)))[:10]}; "
        f"observed but blocked: {sorted(map(str, set(legit) - got_through))[:10]}")
    print(f"\n{len(connections)} observed connections -> {sum(len(rs.rules) for rs in draft.rulesets)} suggested "
          f"rules; {len(vocabulary)} probes: {len(got_through)} through, all observed, none else")
