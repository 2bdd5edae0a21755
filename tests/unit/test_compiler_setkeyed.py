"""Set-keyed deltas (issue 19): random op sequences applied incrementally equal a full recompile.

A fleet of hosts is driven only by what the compiler hands out: ``SetChanges`` (each changed set
once; a host applies the deltas of the sets its own policy references, strictly) for workload
changes, ``HostDelta``s for rule changes. After every step the fleet must equal a from-scratch
``compile_policy`` of the compiler's policy, and the per-host fan-out (``host_deltas``) and the
compiler's subscriber index must agree with it.
"""

from __future__ import annotations

import gc
import ipaddress
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import Compiler, HostDelta, HostPolicy, compile_policy, ir, members
from stockade.compiler.changes import SetChanges
from stockade.compiler.delta import apply_set_deltas
from stockade.compiler.ir import address_set_chunks, address_set_to_dict, host_policy_from_dict, host_policy_to_dict
from stockade.model import (
    ALL_WORKLOADS,
    AllowRule,
    DenyRule,
    EnforcementMode,
    Interface,
    Label,
    LabelSelector,
    Policy,
    Ruleset,
    Workload,
)
from stockade.model.addresses import Family
from tests.unit import policy_strategies as ps

PROFILE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

workload_op = st.one_of(
    st.tuples(st.just("create"), ps.workload()),
    st.tuples(st.just("delete"), st.sampled_from(ps.NAMES)),
    st.tuples(st.just("relabel"), st.sampled_from(ps.NAMES), ps.labels()),
    st.tuples(st.just("readdress"), st.sampled_from(ps.NAMES), st.integers(1, 120), st.booleans()),
    st.tuples(st.just("mode"), st.sampled_from(ps.NAMES), st.sampled_from(list(EnforcementMode))),
)
op = st.one_of(
    workload_op,
    workload_op,
    st.tuples(st.just("batch"), st.lists(workload_op, min_size=2, max_size=6)),
    st.tuples(st.just("rule_add"), ps.allow_rule(), st.lists(ps.label_selector(), max_size=1)),
    st.tuples(st.just("rule_remove"), st.integers(0, 20)),
)


def _set_names(hp: HostPolicy) -> set[str]:
    return {s.name for s in hp.sets}


def _workload_change(comp: Compiler, live: dict[str, Workload], o: tuple[object, ...]) -> Workload | str | None:
    """The compiler change an op means against ``live`` (None: not applicable), keeping addresses unique."""
    kind, name = o[0], o[1]
    if kind == "create":
        assert isinstance(name, Workload)
        w = name
    else:
        assert isinstance(name, str)
        if name not in live:
            return None
        old = live[name]
        if kind == "delete":
            del live[name]
            return name
        if kind == "relabel":
            assert isinstance(o[2], frozenset)
            w = replace(old, labels=o[2])
        elif kind == "readdress":
            assert isinstance(o[2], int)
            addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.IPv4Address(f"10.0.0.{o[2]}")]
            if o[3]:
                addrs.append(ipaddress.IPv6Address(f"fd00::{o[2]:x}"))
            w = replace(old, interfaces=(Interface("eth0", tuple(addrs)),))
        else:
            assert isinstance(o[2], EnforcementMode)
            w = replace(old, mode=o[2])
    owners = {a for x in live.values() if x.name != w.name for a in x.addresses}
    if owners & set(w.addresses):
        return None
    live[w.name] = w
    return w


def _apply_set_keyed(fleet: dict[str, HostPolicy], sc: SetChanges) -> None:
    """What agents subscribed to sets do: reload the named hosts, patch every set they reference."""
    by_set = sc.by_set()
    reloaded = set()
    for d in sc.reloads:
        reloaded.add(d.workload)
        if d.policy is None:
            fleet.pop(d.workload, None)
        else:
            fleet[d.workload] = d.policy
    for h, hp in list(fleet.items()):
        if h in reloaded:
            continue
        deltas = [d for s in sorted(_set_names(hp)) for d in by_set.get(s, ())]
        if deltas:
            fleet[h] = apply_set_deltas(hp, deltas)  # strict: absent removals / present adds raise


def _apply_host_deltas(fleet: dict[str, HostPolicy], deltas: list[HostDelta]) -> None:
    assert len({d.workload for d in deltas}) == len(deltas), "more than one delta for a host"
    for d in deltas:
        if d.policy is None:
            fleet.pop(d.workload)
        elif d.rules_changed:
            fleet[d.workload] = d.policy
        else:
            fleet[d.workload] = apply_set_deltas(fleet[d.workload], d.set_deltas)
            assert fleet[d.workload] == d.policy


def _check_host_deltas(before: dict[str, HostPolicy], after: dict[str, HostPolicy], deltas: list[HostDelta]) -> None:
    assert [d.workload for d in deltas] == sorted(d.workload for d in deltas)
    changed = {h for h in set(before) | set(after) if before.get(h) != after.get(h)}
    assert {d.workload for d in deltas} == changed
    fleet = dict(before)
    _apply_host_deltas(fleet, deltas)
    assert fleet == after


@PROFILE
@given(ps.policy(), st.lists(op, min_size=1, max_size=10))
def test_set_keyed_ops_equal_full_recompile(policy: Policy, ops: list[tuple[object, ...]]) -> None:
    _run_ops(policy, ops)


@PROFILE
@given(ps.policy(), st.lists(op, min_size=1, max_size=10))
def test_set_keyed_ops_with_one_network_chunks_equal_full_recompile(
    policy: Policy, ops: list[tuple[object, ...]]
) -> None:
    """The same with every changed set cut into one-network chunks: each change splits, merges
    or empties chunks, and the policies holding chunked sets must still equal a full recompile."""
    saved = members.CHUNK
    members.CHUNK = 1
    try:
        _run_ops(policy, ops)
    finally:
        members.CHUNK = saved


def _run_ops(policy: Policy, ops: list[tuple[object, ...]]) -> None:
    comp = Compiler(policy)
    fleet = comp.all_host_policies()
    live = {w.name: w for w in policy.workloads}
    for o in ops:
        before = dict(fleet)
        if o[0] in ("rule_add", "rule_remove"):
            cur = comp.policy
            if o[0] == "rule_add":
                scopes = tuple(o[2]) if isinstance(o[2], list) else ()
                rulesets = (*cur.rulesets, Ruleset(f"rs{len(cur.rulesets)}", scopes, (o[1],)))  # type: ignore[arg-type]
            else:
                assert isinstance(o[1], int)
                flat = [(i, j) for i, rs in enumerate(cur.rulesets) for j in range(len(rs.rules))]
                if not flat:
                    continue
                i, j = flat[o[1] % len(flat)]
                rs = cur.rulesets[i]
                rules = rs.rules[:j] + rs.rules[j + 1 :]
                rulesets = tuple(r for k, r in enumerate(cur.rulesets) if k != i or rules)
                rulesets = tuple(replace(r, rules=rules) if r.name == rs.name else r for r in rulesets)
            deltas = comp.replace_policy(replace(cur, rulesets=rulesets))
            _apply_host_deltas(fleet, deltas)
        else:
            steps = list(o[1]) if o[0] == "batch" else [o]  # type: ignore[call-overload]
            changes = [c for c in (_workload_change(comp, live, s) for s in steps) if c is not None]
            sc = comp.apply_set_changes(changes)
            per_host = comp.host_deltas(sc)
            _apply_set_keyed(fleet, sc)
            full = compile_policy(comp.policy)
            _check_host_deltas(before, full, per_host)
            for s in sc.changed_sets:
                want = {h for h, hp in full.items() if s in _set_names(hp)}
                assert set(comp.subscribers(s)) == want, s
            assert [d.workload for d in sc.reloads] == sorted(d.workload for d in sc.reloads)
            assert len({(d.name, d.family) for d in sc.set_deltas}) == len(sc.set_deltas)
        full = compile_policy(comp.policy)
        assert fleet == full
        assert comp.all_host_policies() == full
    assert comp.policy.workloads == tuple(sorted(live.values(), key=lambda w: w.name))


def _host(i: int, role: str) -> Workload:
    v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.0")) + i)
    return Workload(f"{role}-{i}", frozenset({Label("role", role)}), (Interface("eth0", (v4,)),), EnforcementMode.FULL)


def _estate(n: int) -> Policy:
    """``n`` hosts under an override-deny from all workloads to all workloads (like the bench's ``no-smb``)."""
    web, db = LabelSelector((Label("role", "web"),)), LabelSelector((Label("role", "db"),))
    rules = (Ruleset("shop", (), (AllowRule((web,), (db,), ("http",)),)),)
    deny = (DenyRule("no-smb", (ALL_WORKLOADS,), (ALL_WORKLOADS,), ("dns",), True),)
    hosts = tuple(_host(i, "web" if i % 3 else "db") for i in range(n))
    return Policy(workloads=hosts, services=ps.SERVICES, rulesets=rules, deny_rules=deny)


def test_create_names_the_all_workloads_set_once() -> None:
    """A create that every host sees (the all-workloads set) is one set delta and one reload."""
    comp = Compiler(_estate(300))
    sc = comp.apply_set_changes([_host(1000, "web")])
    assert [d.workload for d in sc.reloads] == ["web-1000"] and sc.reloads[0].rules_changed
    all_name = next(s.name for s in comp.host_policy("web-1").sets if s.selector == "all")
    assert all_name in sc.changed_sets
    (all_delta,) = [d for d in sc.set_deltas if d.name == all_name]
    assert [str(n) for n in all_delta.added] == ["10.1.3.232/32"] and all_delta.removed == ()
    assert len(set(comp.subscribers(all_name))) == 301
    deltas = comp.host_deltas(sc)
    assert len(deltas) == 301  # the fan-out, on demand: every host, one delta each
    assert comp.all_host_policies() == compile_policy(comp.policy)

    gone = comp.apply_set_changes(["web-1000", "db-0"])
    assert [(d.workload, d.policy) for d in gone.reloads] == [("db-0", None), ("web-1000", None)]
    assert comp.all_host_policies() == compile_policy(comp.policy)


def test_stale_set_changes_cannot_be_fanned_out() -> None:
    comp = Compiler(_estate(10))
    first = comp.apply_set_changes([_host(50, "web")])
    comp.apply_set_changes(["web-50"])
    with pytest.raises(ValueError, match="stale"):
        comp.host_deltas(first)
    empty = comp.apply_set_changes([])
    assert empty.set_deltas == () and empty.reloads == () and comp.host_deltas(empty) == []


def test_pod_batch_is_one_set_delta_per_set() -> None:
    """1,000 pods created in one batch: each changed set appears once (both families at most)."""
    comp = Compiler(_estate(30))
    pods = [_host(2000 + i, "web") for i in range(1000)]
    sc = comp.apply_set_changes(pods)
    assert len(sc.reloads) == 1000
    assert len(sc.set_deltas) == len({(d.name, d.family) for d in sc.set_deltas}) == len(sc.changed_sets)
    deltas = comp.host_deltas(sc)
    db_hosts = [d for d in deltas if d.workload.startswith("db-")]
    assert len(db_hosts) == 10 and all(not d.rules_changed for d in db_hosts)
    assert comp.all_host_policies() == compile_policy(comp.policy)


def test_a_create_shares_the_big_sets_chunks_with_the_policies_before() -> None:
    """The created host's own policy holds the all-workloads set as chunks: all but the chunk the
    new address lands in are the objects earlier policies hold (O(changed), not a copy of every
    member), and it reads, compares and encodes exactly as the flat set of a full recompile."""
    saved = members.CHUNK
    members.CHUNK = 16
    try:
        def spaced(i: int) -> Workload:  # no two addresses adjacent: one /32 each, 3,000 networks
            v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.0")) + 2 * i)
            return replace(_host(i, "web" if i % 3 else "db"), interfaces=(Interface("eth0", (v4,)),))

        comp = Compiler(replace(_estate(1), workloads=tuple(spaced(i) for i in range(3000))))
        comp.apply_set_changes([spaced(5000)])  # the first change cuts the sets into chunks
        all_name = next(s.name for s in comp.host_policy("web-1").sets if s.selector == "all")
        before = address_set_chunks(comp.host_policy("web-1").set(all_name, Family.V4))
        address_set_to_dict(comp.host_policy("web-1").set(all_name, Family.V4))  # an agent's answer
        sc = comp.apply_set_changes([spaced(7000)])
        (reload,) = sc.reloads
        assert reload.policy is not None
        new_set = reload.policy.set(all_name, Family.V4)
        assert "members" not in new_set.__dict__  # not joined into one tuple by the compiler
        after = address_set_chunks(new_set)
        assert len(after) > 100
        assert len({id(c) for c in after} - {id(c) for c in before}) == 1  # one chunk copied
        # and the encoder spells only that chunk anew: every other chunk's text is remembered
        assert len([c for c in after if id(c) not in ir._CHUNK_TEXTS]) == 1
        full = compile_policy(comp.policy)
        assert reload.policy == full["web-7000"]
        assert host_policy_to_dict(reload.policy) == host_policy_to_dict(full["web-7000"])
        assert host_policy_from_dict(host_policy_to_dict(reload.policy)) == full["web-7000"]
        assert len(new_set.members) == 3002 and new_set.__dict__["members"] is new_set.members  # joined once
    finally:
        members.CHUNK = saved


def test_no_collection_runs_inside_a_change_or_its_fan_out() -> None:
    """The compiler pauses the collector while it builds its outputs and allocates nothing after
    it resumes: the collection those allocations are due never runs inside the call (over the
    deltas just made) but at the caller's next allocation, or not at all if it drops them first.
    (A ``contextlib`` context manager resumed it and then allocated its ``StopIteration``.)"""
    comp = Compiler(_estate(600))
    runs: list[int] = []
    inside = [False]

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and inside[0]:
            runs.append(info["generation"])

    saved = gc.get_threshold()
    gc.callbacks.append(count)
    try:
        for i in range(5):
            batch = [_host(2000 + i, "web")]
            gc.collect()  # the test's own allocations so far: not the compiler's to collect
            gc.set_threshold(50, 1, 1)  # an allocation after a paused build collects at once
            inside[0] = True
            sc = comp.apply_set_changes(batch)
            inside[0] = False
            gc.collect()
            inside[0] = True
            deltas = comp.host_deltas(sc)
            inside[0] = False
            gc.set_threshold(*saved)
            assert runs == []
            assert len(deltas) == 601 + i
            del deltas, sc
    finally:
        gc.set_threshold(*saved)
        gc.callbacks.remove(count)
