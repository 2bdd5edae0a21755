"""Software differential test: a first-match interpreter of compiled HostPolicies must give
the reference evaluator's verdict for every pair and probe (the kernel layer repeats this
with real nftables)."""

from __future__ import annotations

import ipaddress
from itertools import permutations

from hypothesis import HealthCheck, given, settings

from stockade.compiler import Direction, HostPolicy, compile_policy
from stockade.evaluator import Evaluator, Verdict
from stockade.model import Action, EnforcementMode, Family, IPAddress, Policy, Proto
from tests.unit import policy_strategies as ps

PROBES: tuple[tuple[Proto, int | None], ...] = (
    (Proto.TCP, 80),
    (Proto.TCP, 8050),
    (Proto.TCP, 443),
    (Proto.UDP, 53),
    (Proto.ICMP, 8),
    (Proto.ICMPV6, 128),
)


def _side(hp: HostPolicy, direction: Direction, peer: IPAddress, proto: Proto, port: int | None) -> str:
    if proto is Proto.ICMPV6 and port in (133, 134, 135, 136, 137):
        return "allow"
    if direction is Direction.INBOUND and any(e.matches(proto, port) for e in hp.failsafe.management):
        return "allow"
    fam = Family.V4 if peer.version == 4 else Family.V6
    action = None
    for rule in hp.rules:
        if rule.direction is not direction:
            continue
        if not any(e.matches(proto, port) for e in rule.services):
            continue
        if not any(peer in net for net in hp.set(rule.peer, fam).members):
            continue
        action = "allow" if rule.action is Action.ALLOW else "block"
        break
    if action is None:
        action = "allow" if hp.mode is EnforcementMode.SELECTIVE else "block"
    if action == "block" and hp.mode is EnforcementMode.VISIBILITY:
        return "would-block"
    return action


def interpret(
    compiled: dict[str, HostPolicy],
    policy: Policy,
    src: IPAddress,
    dst: IPAddress,
    proto: Proto,
    port: int | None,
) -> Verdict:
    owner = {a: w.name for w in policy.workloads for a in w.addresses}
    actions = set()
    if src in owner and compiled[owner[src]].mode is not EnforcementMode.IDLE:
        actions.add(_side(compiled[owner[src]], Direction.OUTBOUND, dst, proto, port))
    if dst in owner and compiled[owner[dst]].mode is not EnforcementMode.IDLE:
        actions.add(_side(compiled[owner[dst]], Direction.INBOUND, src, proto, port))
    if "block" in actions:
        return Verdict.BLOCKED
    if "would-block" in actions:
        return Verdict.POTENTIALLY_BLOCKED
    return Verdict.ALLOWED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps.policy())
def test_compiled_policies_agree_with_evaluator(policy: Policy) -> None:
    compiled = compile_policy(policy)
    ev = Evaluator(policy)
    outsider4 = ipaddress.ip_address("10.0.0.3")  # in IP lists, owned by nobody (hosts are 1-8, 20-27, 40-47)
    endpoints = [a for w in policy.workloads for a in w.addresses] + [outsider4]
    for src, dst in permutations(endpoints, 2):
        if src.version != dst.version:
            continue
        if ev.owner(src) is not None and ev.owner(src) is ev.owner(dst):
            continue
        for proto, port in PROBES:
            if (proto is Proto.ICMP and src.version == 6) or (proto is Proto.ICMPV6 and src.version == 4):
                continue
            expected = ev.evaluate(src, dst, proto, port).verdict
            got = interpret(compiled, policy, src, dst, proto, port)
            assert got == expected, f"{src}->{dst} {proto.value}/{port}: compiled {got}, evaluator {expected}"
