"""Batches of workload changes (issue 19): one delta per host, equal to singles and to a full recompile."""

from __future__ import annotations

import ipaddress
import itertools
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import Compiler, HostDelta, HostPolicy, compile_policy
from stockade.errors import NotFoundError
from stockade.model import (
    ALL_WORKLOADS,
    AllowRule,
    EnforcementMode,
    Interface,
    Label,
    LabelSelector,
    Policy,
    Ruleset,
    Workload,
)
from tests.unit import policy_strategies as ps

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Change = Workload | str
changes = st.lists(st.one_of(ps.workload(), st.sampled_from(ps.NAMES)), min_size=1, max_size=10)


def _valid(policy: Policy, steps: list[Change]) -> list[Change]:
    """Drop removals of absent workloads and upserts that would share an address."""
    live = {w.name: w for w in policy.workloads}
    out: list[Change] = []
    for c in steps:
        if isinstance(c, str):
            if c in live:
                del live[c]
                out.append(c)
            continue
        owners = {a for w in live.values() if w.name != c.name for a in w.addresses}
        if not owners & set(c.addresses):
            live[c.name] = c
            out.append(c)
    return out


def _apply(state: dict[str, HostPolicy], deltas: list[HostDelta]) -> None:
    """What an agent fleet does with deltas: reload, drop, or patch set members."""
    assert len({d.workload for d in deltas}) == len(deltas), "more than one delta for a host"
    for d in deltas:
        if d.policy is None:
            state.pop(d.workload, None)
            continue
        if not d.rules_changed:
            old = state[d.workload]
            members = {(s.name, s.family): set(s.members) for s in old.sets}
            for sd in d.set_deltas:
                cur = members[(sd.name, sd.family)]
                assert set(sd.removed) <= cur and not set(sd.added) & cur
                cur -= set(sd.removed)
                cur |= set(sd.added)
            assert members == {(s.name, s.family): set(s.members) for s in d.policy.sets}
            assert old.rules_key() == d.policy.rules_key()
        state[d.workload] = d.policy


@PROFILE
@given(ps.policy(), changes)
def test_batch_equals_singles_equals_full_recompile(policy: Policy, raw: list[Change]) -> None:
    steps = _valid(policy, raw)
    singles, batch = Compiler(policy), Compiler(policy)
    start = singles.all_host_policies()

    by_singles = dict(start)
    for c in steps:
        _apply(by_singles, singles.remove_workload(c) if isinstance(c, str) else singles.upsert_workload(c))
    by_batch = dict(start)
    deltas = batch.apply_changes(steps)
    _apply(by_batch, deltas)

    full = compile_policy(batch.policy)
    assert by_singles == by_batch == full == batch.all_host_policies() == singles.all_host_policies()
    assert [d.workload for d in deltas] == sorted(d.workload for d in deltas)
    touched = {d.workload for d in deltas}
    for name in set(start) | set(full):
        if name not in touched:
            assert start.get(name) == full.get(name), f"{name} changed without a delta"
    assert batch.policy == singles.policy


def test_unknown_removal_changes_nothing() -> None:
    comp = Compiler(Policy(workloads=(ps.wl_simple("web1", 1),)))
    before = comp.all_host_policies()
    with pytest.raises(NotFoundError, match="ghost"):
        comp.apply_changes([ps.wl_simple("web2", 2), "ghost"])
    assert comp.all_host_policies() == before
    with pytest.raises(NotFoundError):
        comp.remove_workloads(["web1", "web1"])  # the second is gone by then
    assert comp.all_host_policies() == before


def _pod(i: int, app: str) -> Workload:
    v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.64.0.0")) + i)
    labels = frozenset({Label("app", app), Label("ns", "shop")})
    return Workload(f"{app}-{i}", labels, (Interface("eth0", (v4,)),), EnforcementMode.FULL)


def test_thousand_pod_churn_is_one_delta_per_host() -> None:
    """1,000 web pods created (then deleted) in one batch: each db pod gets ONE set delta.

    The same pods created one by one give each db pod a delta per pod.
    """
    web, db = LabelSelector((Label("app", "web"),)), LabelSelector((Label("app", "db"),))
    rules = (Ruleset("shop", (LabelSelector((Label("ns", "shop"),)),), (AllowRule((web,), (db,), ("http",)),)),)
    dbs = tuple(_pod(5000 + i, "db") for i in range(5))
    policy = Policy(workloads=dbs, services=ps.SERVICES, rulesets=rules)
    pods = [_pod(i, "web") for i in range(1000)]

    comp = Compiler(policy)
    deltas = comp.upsert_workloads(pods)
    db_deltas = [d for d in deltas if d.workload.startswith("db-")]
    assert len(db_deltas) == len(dbs)
    for d in db_deltas:
        assert not d.rules_changed
        (sd,) = [s for s in d.set_deltas if s.added]
        assert sd.removed == () and sum(n.num_addresses for n in sd.added) == 1000
        assert [str(n) for n in sd.added][:2] == ["10.64.0.0/23", "10.64.2.0/24"]  # merged CIDRs
    assert len(deltas) == len(dbs) + len(pods)  # the new pods' own policies, and nothing twice

    singles = Compiler(policy)
    per_pod = [d for p in pods for d in singles.upsert_workload(p) if d.workload.startswith("db-")]
    assert len(per_pod) >= 1000 * len(dbs) // 2  # what the batch saves: a delta per pod per db host

    gone = comp.remove_workloads(p.name for p in pods)
    assert sorted(d.workload for d in gone if d.policy is None) == sorted(p.name for p in pods)
    assert len([d for d in gone if d.policy is not None]) == len(dbs)
    assert comp.all_host_policies() == compile_policy(policy)


def _k8s_pod(name: str, ns: str, app: str, address: int) -> Workload:
    labels = frozenset({Label("ns", ns), Label("app", app)})
    return Workload(name, labels, (Interface("eth0", (ipaddress.IPv4Address(address),)),), EnforcementMode.FULL)


def _k8s_policy(namespaces: int) -> Policy:
    """Pods of ``namespaces`` namespaces (4 frontend, 4 backend, 2 db each), a ruleset scoped to each
    namespace, and cluster DNS (every pod -> coredns) and metrics (prometheus -> every pod)."""
    addresses = itertools.count(int(ipaddress.IPv4Address("10.128.0.0")), 7)  # none adjacent
    pods: list[Workload] = []
    rulesets: list[Ruleset] = []
    for i in range(namespaces):
        ns = f"ns{i:03d}"
        for app, replicas in (("frontend", 4), ("backend", 4), ("db", 2)):
            pods += [_k8s_pod(f"{ns}-{app}-{r}", ns, app, next(addresses)) for r in range(replicas)]
        app_sel = {a: LabelSelector((Label("app", a),)) for a in ("frontend", "backend", "db")}
        rulesets.append(Ruleset(ns, (LabelSelector((Label("ns", ns),)),), (
            AllowRule((app_sel["frontend"],), (app_sel["backend"],), ("http",)),
            AllowRule((app_sel["backend"],), (app_sel["db"],), ("web",)),
        )))
    for k in range(3):
        pods.append(_k8s_pod(f"coredns-{k}", "kube-system", "coredns", next(addresses)))
        pods.append(_k8s_pod(f"prometheus-{k}", "monitoring", "prometheus", next(addresses)))
    dns = LabelSelector((Label("app", "coredns"), Label("ns", "kube-system")))
    prom = LabelSelector((Label("app", "prometheus"), Label("ns", "monitoring")))
    rulesets.append(Ruleset("cluster", (), (
        AllowRule((ALL_WORKLOADS,), (dns,), ("dns",)),
        AllowRule((prom,), (ALL_WORKLOADS,), ("http",)),
    )))
    return Policy(workloads=tuple(sorted(pods)), services=ps.SERVICES, rulesets=tuple(rulesets))


def test_k8s_churn_of_1000_pods_is_one_delta_per_affected_host() -> None:
    """A Kubernetes-shaped estate: 500 pods of 100 of its 150 namespaces deleted and 500 created in
    those namespaces re-using their addresses (a CNI's IPAM), one batch of 1,000 changes.

    Every affected host gets ONE delta; the cluster-wide hosts (coredns, prometheus: their peer set
    is every workload, whose members the batch leaves as they were) and the hosts of untouched
    namespaces get none; applying the deltas gives a full recompile. One change at a time, the
    cluster-wide hosts alone get a delta per pod.
    """
    policy = _k8s_policy(150)
    rng = random.Random(19)
    live = {w.name: w for w in policy.workloads}
    victims = rng.sample(sorted(n for n in live if n.startswith("ns0")), 500)  # ns000-ns099; ns1xx untouched
    freed = [live.pop(n).addresses[0] for n in victims]
    rng.shuffle(freed)
    created = []
    for k, addr in enumerate(freed):
        ns, app = f"ns{rng.randrange(100):03d}", rng.choice(("frontend", "backend", "db"))
        created.append(_k8s_pod(f"{ns}-{app}-x{k}", ns, app, int(addr)))
    batch: list[Change] = [*victims, *created]

    comp = Compiler(policy)
    state = comp.all_host_policies()
    deltas = comp.apply_changes(batch)
    _apply(state, deltas)  # also: never two deltas for one host
    after = replace(policy, workloads=tuple(sorted([*live.values(), *created])))
    assert state == comp.all_host_policies() == compile_policy(after)

    hosts = {d.workload for d in deltas}
    cluster = {f"{app}-{k}" for app in ("coredns", "prometheus") for k in range(3)}
    assert not hosts & cluster  # the every-workload set is unchanged: no delta at all
    touched = {w.name.split("-")[0] for w in created} | {n.split("-")[0] for n in victims}
    untouched = {w.name for w in live.values() if w.name.split("-")[0] not in touched | {"coredns", "prometheus"}}
    assert untouched and not hosts & untouched
    assert {d.workload for d in deltas if d.policy is None} == set(victims)
    assert hosts - set(victims) - {w.name for w in created} <= {w.name for w in live.values()}
    assert len(deltas) < len(batch) + len(live)  # a bound the per-pod emission below breaks

    singles = Compiler(policy)
    per_change = [d for c in batch for d in (singles.remove_workload(c) if isinstance(c, str)
                                             else singles.upsert_workload(c))]
    assert sum(d.workload in cluster for d in per_change) >= len(batch) * len(cluster) // 2
    assert singles.all_host_policies() == state
