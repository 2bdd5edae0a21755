"""NetworkPolicy translation, evaluator and compiler, in memory: every conformance case's expected
matrix against the evaluator, the compiled host policies (a first-match interpreter) against the
evaluator, the incremental compiler against a full compile, and how NetworkPolicy combines with
Stockade's own rules."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from stockade.compiler import Compiler, compile_host, compile_policy
from stockade.compiler.delta import apply_set_deltas
from stockade.evaluator import Evaluator, Verdict
from stockade.k8s.netpol import NetpolResolver, PodInfo, parse_policy, resolve
from stockade.model import (
    AllowRule,
    DenyRule,
    EnforcementMode,
    Interface,
    Label,
    LabelSelector,
    Policy,
    Proto,
    Ruleset,
    Service,
    ServiceEntry,
    Workload,
)
from stockade.model.netpol import KubeNetworkPolicy, NetpolDirection
from tests.k8s.netpol_cases import ALL_PODS, CONTAINER_PORTS, NAMESPACES, PORTS, Case, Step, a_from, cases, np
from tests.unit.test_compiler_vs_evaluator import interpret

PROTO = {"TCP": Proto.TCP, "UDP": Proto.UDP, "SCTP": Proto.SCTP}


def ip_of(pod: str) -> str:
    return f"10.244.7.{10 + ALL_PODS.index(pod)}"


def ip6_of(pod: str) -> str:
    return f"fd44:244:0:7::{10 + ALL_PODS.index(pod):x}"


class World:
    """The nine pods in memory, as the sync would see them."""

    def __init__(self, mode: EnforcementMode = EnforcementMode.SELECTIVE) -> None:
        self.resolver = NetpolResolver()
        self.mode = mode
        for n in NAMESPACES:
            self.resolver.set_namespace(n, {"ns": n, "kubernetes.io/metadata.name": n})
        for pod in ALL_PODS:
            n, name = pod.split("/")
            self.set_pod_labels(pod, {"pod": name})

    def set_pod_labels(self, pod: str, labels: dict[str, str]) -> None:
        n, name = pod.split("/")
        ports = tuple((pn, PROTO[proto], number) for pn, proto, number in CONTAINER_PORTS)
        self.resolver.set_pod(PodInfo(n, name, labels, ports))

    def workloads(self) -> tuple[Workload, ...]:
        return tuple(
            Workload(f"k8s.{p.replace('/', '.')}", frozenset({Label("app", p.split("/")[1])}),
                     (Interface("eth0", (ipaddress.ip_address(ip_of(p)), ipaddress.ip_address(ip6_of(p)))),),
                     self.mode)
            for p in ALL_PODS
        )

    def step(self, s: Step) -> None:
        for pod, labels in s.pod_labels:
            info = self.resolver.pods[tuple(pod.split("/"))]  # type: ignore[index]
            merged = {k: v for k, v in {**info.labels, **labels}.items() if v is not None}
            self.set_pod_labels(pod, merged)
        for n, labels in s.ns_labels:
            merged = {k: v for k, v in {**self.resolver.namespaces[n], **labels}.items() if v is not None}
            self.resolver.set_namespace(n, merged)
        for n, name in s.delete:
            self.resolver.remove_policy(n, name)
        for obj in s.policies:
            self.resolver.set_policy(obj)

    def policy(self, base: Policy | None = None) -> Policy:
        return replace(base or Policy(), workloads=self.workloads(), network_policies=self.resolver.resolved())


CASES = cases("10.244.7.0/24", ip_of)


def _check_matrix(policy: Policy, case: Case, step: int, expect: Any) -> None:
    ev = Evaluator(policy)
    compiled = compile_policy(policy)
    wrong = []
    for s in ALL_PODS:
        for d in ALL_PODS:
            if s == d:
                continue
            for key in case.ports:
                proto, port = PROTO[PORTS[key][0]], PORTS[key][1]
                pairs = ((ip_of(s), ip_of(d)), (ip6_of(s), ip6_of(d))) if case.v6 else ((ip_of(s), ip_of(d)),)
                for src, dst in pairs:
                    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
                    verdict = ev.evaluate(a, b, proto, port).verdict
                    if (verdict is Verdict.ALLOWED) != expect(s, d, key):
                        wrong.append(f"{s}->{d} {key}: evaluator {verdict.value}")
                    got = interpret(compiled, policy, a, b, proto, port)
                    assert got == verdict, f"{case.name}[{step}] {s}->{d} {key}: compiled {got}, evaluator {verdict}"
    assert not wrong, f"{case.name} step {step}: " + "; ".join(wrong[:10])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance_case_in_memory(case: Case) -> None:
    world = World()
    compiler = Compiler(world.policy())
    held = compiler.all_host_policies()
    for i, step in enumerate(case.steps):
        world.step(step)
        policy = world.policy()
        assert not any(p.problems for p in policy.network_policies)
        _check_matrix(policy, case, i, step.expect)
        # the incremental path (what the controller would run) reaches exactly the full compile
        deltas = compiler.replace_network_policies(policy.network_policies)
        for d in deltas:
            assert d.policy is not None
            held[d.workload] = d.policy if d.rules_changed else apply_set_deltas(held[d.workload], d.set_deltas)
        assert held == compile_policy(policy)
        for w in policy.workloads:
            assert compile_host(policy, w.name) == held[w.name]


def test_a_pod_relabel_reaches_other_pods_as_set_deltas_only() -> None:
    world = World()
    world.step(Step(lambda s, d, p: True, (a_from("a-from-b", {"podSelector": {"matchLabels": {"pod": "b"}}}),)))
    compiler = Compiler(world.policy())
    world.set_pod_labels("x/c", {"pod": "b"})
    deltas = compiler.replace_network_policies(world.resolver.resolved())
    assert [d.workload for d in deltas] == ["k8s.x.a"]
    assert not deltas[0].rules_changed and {str(m) for sd in deltas[0].set_deltas for m in sd.added} == {
        ip_of("x/c") + "/32", ip6_of("x/c") + "/128"}


def test_a_peer_pod_changing_address_is_a_set_delta() -> None:
    world = World()
    world.step(Step(lambda s, d, p: True, (a_from("a-from-b", {"podSelector": {"matchLabels": {"pod": "b"}}}),)))
    policy = world.policy()
    compiler = Compiler(policy)
    xb = next(w for w in policy.workloads if w.name == "k8s.x.b")
    moved = replace(xb, interfaces=(Interface("eth0", (ipaddress.ip_address("10.244.7.99"),)),))
    deltas = {d.workload: d for d in compiler.upsert_workload(moved)}
    assert not deltas["k8s.x.a"].rules_changed
    assert {str(m) for sd in deltas["k8s.x.a"].set_deltas for m in sd.added} == {"10.244.7.99/32"}
    assert compiler.all_host_policies() == compile_policy(compiler.policy)


# ---- NetworkPolicy and Stockade rules on one pod ------------------------------------------------

WEB = Service("web", (ServiceEntry(Proto.TCP, 80, 80),))


def _verdict(policy: Policy, src: str, dst: str, proto: Proto = Proto.TCP, port: int = 80) -> tuple[Verdict, str]:
    e = Evaluator(policy).evaluate(ipaddress.ip_address(ip_of(src)), ipaddress.ip_address(ip_of(dst)), proto, port)
    side = e.inbound if e.inbound is not None and e.inbound.action != "allow" else e.outbound
    side = side if side is not None and side.action != "allow" else e.inbound
    assert side is not None
    compiled = compile_policy(policy)
    got = interpret(compiled, policy, ipaddress.ip_address(ip_of(src)), ipaddress.ip_address(ip_of(dst)), proto, port)
    assert got == e.verdict
    return e.verdict, side.rule_id


def _isolating_world() -> World:
    world = World()
    world.step(Step(lambda s, d, p: True, (np("x", "a-from-b", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),)))
    return world


def test_override_deny_comes_before_a_networkpolicy_allow() -> None:
    base = Policy(services=(WEB,), deny_rules=(DenyRule("no-b", (LabelSelector((Label("app", "b"),)),),
                                                        (LabelSelector((Label("app", "a"),)),), ("web",),
                                                        override=True),))
    assert _verdict(_isolating_world().policy(base), "x/b", "x/a") == (Verdict.BLOCKED, "deny/no-b")


def test_a_stockade_deny_yields_to_a_networkpolicy_allow_on_the_isolated_side_only() -> None:
    base = Policy(services=(WEB,), deny_rules=(DenyRule("no-b", (LabelSelector((Label("app", "b"),)),),
                                                        (LabelSelector((Label("app", "a"),)),), ("web",)),))
    policy = _isolating_world().policy(base)
    xb, xa = ipaddress.ip_address(ip_of("x/b")), ipaddress.ip_address(ip_of("x/a"))
    e = Evaluator(policy).evaluate(xb, xa, Proto.TCP, 80)
    assert e.inbound is not None and (e.inbound.action, e.inbound.rule_id) == ("allow", "netpol/x/a-from-b/ingress/0")
    # x/b's egress is isolated by no NetworkPolicy: there the deny is a boundary like any other
    assert e.outbound is not None and (e.outbound.action, e.outbound.rule_id) == ("block", "deny/no-b")
    assert _verdict(policy, "x/b", "x/a") == (Verdict.BLOCKED, "deny/no-b")
    world = _isolating_world()
    world.resolver.set_policy(np("x", "b-out", {"podSelector": {"matchLabels": {"pod": "b"}},
                                                "policyTypes": ["Egress"], "egress": [{}]}))
    assert _verdict(world.policy(base), "x/b", "x/a") == (Verdict.ALLOWED, "netpol/x/a-from-b/ingress/0")


def test_a_stockade_allow_does_not_open_a_direction_networkpolicy_isolates() -> None:
    base = Policy(services=(WEB,), rulesets=(Ruleset("all", (), (AllowRule(
        (LabelSelector((Label("app", "c"),)),), (LabelSelector((Label("app", "a"),)),), ("web",)),)),))
    assert _verdict(_isolating_world().policy(base), "x/c", "x/a") == (Verdict.BLOCKED, "netpol/x/a-from-b/ingress")
    # ... but still decides where no NetworkPolicy isolates (y/a is selected by none)
    full = World(EnforcementMode.FULL)
    full.step(Step(lambda s, d, p: True, (a_from("a-from-b", {"podSelector": {"matchLabels": {"pod": "b"}}}),)))
    policy = full.policy(base)
    assert _verdict(policy, "y/c", "y/a") == (Verdict.ALLOWED, "ruleset/all/0")
    assert _verdict(policy, "y/b", "y/a")[0] is Verdict.BLOCKED  # full mode default, unrelated to NetworkPolicy


# ---- what cannot be expressed never widens ------------------------------------------------------


def test_an_unknown_protocol_is_reported_and_the_policy_isolates_without_allowing() -> None:
    obj = np("x", "dccp", {"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"ports": [{"port": 80, "protocol": "DCCP"}]}, {}]})
    spec = parse_policy(obj)
    assert spec.problems and "DCCP" in spec.problems[0] and spec.rules == ()
    world = World()
    world.resolver.set_policy(obj)
    assert _verdict(world.policy(), "x/b", "x/a") == (Verdict.BLOCKED, "netpol/x/dccp/ingress")


def test_sctp_ports_and_ranges_are_real_rules_decided_per_protocol() -> None:
    obj = np("x", "sctp", {"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"ports": [{"port": 3868, "protocol": "SCTP"},
                                                  {"port": 2905, "endPort": 2910, "protocol": "SCTP"}]}]})
    spec = parse_policy(obj)
    assert spec.problems == ()
    world = World()
    world.resolver.set_policy(obj)
    policy = world.policy()
    for port in (3868, 2905, 2910):
        assert _verdict(policy, "x/b", "x/a", Proto.SCTP, port) == (Verdict.ALLOWED, "netpol/x/sctp/ingress/0")
    assert _verdict(policy, "x/b", "x/a", Proto.SCTP, 2911) == (Verdict.BLOCKED, "netpol/x/sctp/ingress")
    assert _verdict(policy, "x/b", "x/a", Proto.TCP, 3868) == (Verdict.BLOCKED, "netpol/x/sctp/ingress")
    assert _verdict(policy, "x/b", "x/a", Proto.UDP, 3868) == (Verdict.BLOCKED, "netpol/x/sctp/ingress")


def test_an_unreadable_pod_selector_isolates_the_whole_namespace() -> None:
    obj = np("x", "bad", {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Near", "values": ["a"]}]},
                          "ingress": [{}]})
    (resolved,) = resolve([obj], World().resolver.pods.values(), World().resolver.namespaces)
    assert resolved.selected == {"k8s.x.a", "k8s.x.b", "k8s.x.c"} and resolved.rules == ()
    assert "operator" in resolved.problems[0]


@pytest.mark.parametrize("port", [{"port": 0}, {"port": 80, "endPort": 70}, {"port": "http", "endPort": 90},
                                  {"endPort": 90}, {"port": 80, "protocol": "ICMP"}])
def test_bad_ports_are_problems(port: dict[str, Any]) -> None:
    spec = parse_policy(np("x", "p", {"podSelector": {}, "ingress": [{"ports": [port]}]}))
    assert spec.problems and spec.rules == () and spec.ingress


def test_an_except_outside_its_cidr_is_a_problem() -> None:
    spec = parse_policy(np("x", "p", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {
        "cidr": "10.0.0.0/24", "except": ["10.1.0.0/25"]}}]}]}))
    assert spec.problems and spec.egress and spec.ingress


def test_long_names_give_rule_ids_that_fit_nflog_prefixes() -> None:
    pol = KubeNetworkPolicy("n" * 63, "p" * 253, frozenset(), True, True)
    for d in NetpolDirection:
        assert len(pol.rule_id(d, 999)) <= 100 and len(pol.isolation_id(d)) <= 100
    assert pol.ref != KubeNetworkPolicy("n" * 63, "p" * 252, frozenset(), True, True).ref


def test_people_read_networkpolicy_rules_counted_from_one() -> None:
    from stockade.model.rule_ids import rule_title

    assert rule_title("netpol/x/a-from-b/ingress/0") == "NetworkPolicy x/a-from-b ingress rule 1"
    assert rule_title("netpol/x/deny/egress") == "NetworkPolicy x/deny (egress isolated, no NetworkPolicy rule allows)"


def test_incremental_resolution_equals_a_fresh_one_under_random_churn() -> None:
    import random

    rnd = random.Random(16)
    world = World()
    for case in CASES:
        for step in case.steps:
            for obj in step.policies:
                name = f"{case.name}-{obj['metadata']['name']}"[:60]
                world.resolver.set_policy({**obj, "metadata": {**obj["metadata"], "name": name}})
    for _ in range(300):
        what = rnd.random()
        pod = rnd.choice(ALL_PODS)
        if what < 0.5:
            world.set_pod_labels(pod, {"pod": rnd.choice("abc"), **({"x": "1"} if rnd.random() < 0.3 else {})})
        elif what < 0.7:
            n = rnd.choice(NAMESPACES)
            world.resolver.set_namespace(n, {"ns": rnd.choice(["x", "y", "z", "q"]), "kubernetes.io/metadata.name": n})
        elif what < 0.85:
            world.resolver.remove_pod(*pod.split("/"))
        else:
            n, name = pod.split("/")
            port = (rnd.choice(["serve-81-tcp", "other"]), Proto.TCP, 81)
            world.resolver.set_pod(PodInfo(n, name, {"pod": name}, (port,)))
        got = world.resolver.resolved()
        fresh = NetpolResolver()  # the same picture, every policy resolved from scratch
        for n, labels in world.resolver.namespaces.items():
            fresh.set_namespace(n, labels)
        for p in world.resolver.pods.values():
            fresh.set_pod(p)
        fresh.policies = dict(world.resolver.policies)
        fresh.mark_all_dirty()
        assert got == fresh.resolved()


def test_egress_named_and_numbered_ports_to_pods_and_blocks_share_no_set_name() -> None:
    """Pods without the named port and an ipBlock both get the numbered ports: one rule, one set."""
    world = World()
    world.set_pod_labels("z/b", {"pod": "b"})
    world.resolver.set_pod(PodInfo("z", "c", {"pod": "c"}, ()))  # z/c has no named ports
    world.step(Step(lambda s, d, p: True, (np("x", "out", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}, {"ipBlock": {"cidr": "192.0.2.0/24"}}],
                    "ports": [{"port": "serve-81-tcp"}, {"port": 80}]}]}),)))
    policy = world.policy()
    ev = Evaluator(policy)
    xa = ipaddress.ip_address(ip_of("x/a"))
    for dst, port, ok in (("z/b", 81, True), ("z/b", 80, True), ("z/c", 80, True), ("z/c", 81, False),
                          ("y/a", 80, False)):
        verdict = ev.evaluate(xa, ipaddress.ip_address(ip_of(dst)), Proto.TCP, port).verdict
        assert (verdict is Verdict.ALLOWED) is ok, (dst, port, verdict)
    for port, ok in ((80, True), (81, False)):
        verdict = ev.evaluate(xa, ipaddress.ip_address("192.0.2.7"), Proto.TCP, port).verdict
        assert (verdict is Verdict.ALLOWED) is ok
    compiled = compile_policy(policy)
    for dst in ("z/b", "z/c", "y/a"):
        for port in (80, 81):
            d = ipaddress.ip_address(ip_of(dst))
            assert interpret(compiled, policy, xa, d, Proto.TCP, port) == ev.evaluate(xa, d, Proto.TCP, port).verdict
    assert interpret(compiled, policy, xa, ipaddress.ip_address("192.0.2.7"), Proto.TCP, 80) is Verdict.ALLOWED


def test_pods_that_become_workloads_after_the_policy_compile_as_a_full_compile() -> None:
    world = _isolating_world()
    full = world.policy()
    held = {w.name: w for w in full.workloads}
    compiler = Compiler(replace(full, workloads=tuple(w for w in full.workloads if w.name not in (
        "k8s.x.a", "k8s.x.b"))))
    states = compiler.all_host_policies()
    for name in ("k8s.x.b", "k8s.x.a"):  # the peer first: the selected pod's set already holds it
        for d in compiler.upsert_workload(held[name]):
            assert d.policy is not None
            states[d.workload] = d.policy if d.rules_changed else apply_set_deltas(states[d.workload], d.set_deltas)
    assert states == compile_policy(full)
    for d in compiler.remove_workload("k8s.x.b"):  # the peer leaves: a set delta for x/a
        if d.workload == "k8s.x.a":
            assert not d.rules_changed and d.set_deltas
