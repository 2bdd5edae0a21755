"""Compiler invariants: incremental == full, exact set membership, family separation, sharing."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import Compiler, HostPolicy, SetDelta, compile_policy, host_policy_to_json
from stockade.compiler.delta import apply_set_deltas
from stockade.model import AllWorkloads, IPListSelector, LabelSelector, Policy, Workload
from stockade.model.addresses import Family
from tests.unit import policy_strategies as ps

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _apply_set_deltas(old: HostPolicy, new: HostPolicy, deltas: tuple[SetDelta, ...]) -> None:
    """The compiler's set deltas lead from ``old`` to exactly ``new`` (the one strict apply:
    nothing removed that is absent, nothing added that is present)."""
    assert apply_set_deltas(old, deltas) == new


changes = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), ps.workload()),
        st.tuples(st.just("remove"), st.sampled_from(ps.NAMES)),
    ),
    min_size=1,
    max_size=8,
)


@PROFILE
@given(ps.policy(), changes)
def test_incremental_equals_full_recompile(policy: Policy, steps: list[tuple[str, object]]) -> None:
    comp = Compiler(policy)
    for kind, arg in steps:
        before = comp.all_host_policies()
        if kind == "upsert":
            assert isinstance(arg, Workload)
            # keep addresses unique: drop the change if another workload owns an address
            owners = {a: w.name for w in comp.policy.workloads for a in w.addresses if w.name != arg.name}
            if any(a in owners for a in arg.addresses):
                continue
            deltas = comp.upsert_workload(arg)
        else:
            assert isinstance(arg, str)
            if arg not in before:
                continue
            deltas = comp.remove_workload(arg)
        after = comp.all_host_policies()
        full = Compiler(comp.policy).all_host_policies()
        assert after == full
        touched = {d.workload for d in deltas}
        for name in set(before) | set(after):
            if name not in touched:
                assert before.get(name) == after.get(name), f"{name} changed without a delta"
        for d in deltas:
            if d.policy is None:
                assert d.workload not in after
                continue
            assert d.policy == after[d.workload]
            if not d.rules_changed:
                _apply_set_deltas(before[d.workload], after[d.workload], d.set_deltas)


@PROFILE
@given(ps.policy(), ps.policy())
def test_replace_policy_equals_full(p1: Policy, p2: Policy) -> None:
    comp = Compiler(p1)
    before = comp.all_host_policies()
    deltas = comp.replace_policy(p2)
    after = comp.all_host_policies()
    assert after == compile_policy(p2)
    for d in deltas:
        if d.policy is not None and not d.rules_changed:
            _apply_set_deltas(before[d.workload], after[d.workload], d.set_deltas)
    for name in set(before) - {d.workload for d in deltas}:
        assert before[name] == after.get(name)


@PROFILE
@given(ps.policy())
def test_set_members_are_exactly_the_selected_workloads(policy: Policy) -> None:
    comp = Compiler(policy)
    groups = policy.group_map()
    iplists = policy.ip_list_map()
    for name, hp in comp.all_host_policies().items():
        for s in hp.sets:
            for m in s.members:
                assert m.version == (4 if s.family is Family.V4 else 6), "family mixed in a set"
        for rule in hp.rules:
            sel = comp._peers[rule.peer]
            v4 = hp.set(rule.peer, Family.V4)
            v6 = hp.set(rule.peer, Family.V6)
            covered = {a for n in v4.members + v6.members for a in ipaddress.ip_network(n)}
            if isinstance(sel, IPListSelector):
                expected = set()
                for net in iplists[sel.ip_list].include:
                    expected |= set(net)
                for net in iplists[sel.ip_list].exclude:
                    expected -= set(net)
            else:
                expected = {
                    a
                    for w in policy.workloads
                    if isinstance(sel, AllWorkloads)
                    or (isinstance(sel, LabelSelector) and sel.matches(w.labels, groups))
                    for a in w.addresses
                }
            assert covered == expected, f"{name}: set {rule.peer} ({sel.canonical()})"


@PROFILE
@given(ps.policy())
def test_same_labels_share_rules_and_json_is_deterministic(policy: Policy) -> None:
    compiled = compile_policy(policy)
    again = compile_policy(Policy(**{**policy.__dict__, "workloads": tuple(reversed(policy.workloads))}))
    for name, hp in compiled.items():
        assert host_policy_to_json(hp) == host_policy_to_json(again[name])
    by_labels: dict[frozenset, HostPolicy] = {}  # type: ignore[type-arg]
    for w in policy.workloads:
        hp = compiled[w.name]
        if w.labels in by_labels:
            assert by_labels[w.labels].rules is hp.rules or by_labels[w.labels].rules == hp.rules
        by_labels[w.labels] = hp


@PROFILE
@given(ps.policy())
def test_compile_host_alone_equals_fleet_compile(policy: Policy) -> None:
    from stockade.compiler import compile_host

    fleet = compile_policy(policy)
    for w in policy.workloads:
        assert compile_host(policy, w.name) == fleet[w.name]


def test_peer_churn_changes_members_not_rules() -> None:
    from stockade.model import AllowRule, Interface, Label, Ruleset

    web = frozenset({Label("role", "web")})
    db = frozenset({Label("role", "db")})
    policy = Policy(
        workloads=(
            Workload("db1", db, (Interface("eth0", (ipaddress.ip_address("10.0.0.9"),)),)),
            Workload("web1", web, (Interface("eth0", (ipaddress.ip_address("10.0.0.1"),)),)),
        ),
        services=ps.SERVICES,
        rulesets=(
            Ruleset(
                "r",
                (),
                (
                    AllowRule(
                        (LabelSelector((Label("role", "web"),)),),
                        (LabelSelector((Label("role", "db"),)),),
                        ("http",),
                    ),
                ),
            ),
        ),
    )
    comp = Compiler(policy)
    db_before = comp.host_policy("db1")
    new_web = Workload("web2", web, (Interface("eth0", (ipaddress.ip_address("10.0.0.2"),)),))
    deltas = {d.workload: d for d in comp.upsert_workload(new_web)}
    db_after = comp.host_policy("db1")
    assert db_after.rules == db_before.rules
    assert not deltas["db1"].rules_changed
    (delta,) = deltas["db1"].set_deltas
    assert delta.family is Family.V4
    assert delta.removed == ()
    assert delta.added == (ipaddress.ip_network("10.0.0.2/32"),)
    v4 = db_after.set(delta.name, Family.V4)
    assert v4.members == (ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("10.0.0.2/32"))
    assert replace(db_before, sets=db_after.sets) == db_after


def test_regression_portless_and_ported_entries_of_one_protocol() -> None:
    """Found by the kernel differential test: sorting None against a port crashed the compiler."""
    from stockade.model import DenyRule, Proto, Service, ServiceEntry

    policy = Policy(
        label_groups=ps.GROUPS,
        services=(
            Service("dns", (ServiceEntry(Proto.UDP, 53, 53),)),
            Service("udp-all", (ServiceEntry(Proto.UDP),)),
        ),
        workloads=tuple(ps.wl_simple(n, i) for i, n in enumerate(("w0", "w1"))),
        deny_rules=(
            DenyRule(
                "d0", (LabelSelector(groups=("tiers",)),), (LabelSelector(groups=("tiers",)),), ("dns", "udp-all")
            ),
        ),
    )
    compiled = compile_policy(policy)
    rules = {r for hp in compiled.values() for r in hp.rules}
    assert {r.direction.value for r in rules} == {"in", "out"}
    assert {r.services for r in rules} == {(ServiceEntry(Proto.UDP),)}
