"""Batches of workload changes (issue 19): one delta per host, equal to singles and to a full recompile."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import Compiler, HostDelta, HostPolicy, compile_policy
from stockade.errors import NotFoundError
from stockade.model import (
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
