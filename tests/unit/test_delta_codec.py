"""The delta protocol (compiler/delta.py): wire codec, strict apply, composition, host history.

The property test plays the controller: random changes go through the incremental compiler in
random transactions, each host's history records the compiler's deltas, and an agent holding
*any* revision it could have been given gets an answer that, sent over the wire and applied
strictly, is exactly the full compile of the final estate.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.agent.fake import FakeController, wait_until
from stockade.compiler import Compiler, HostDelta, HostPolicy, compile_policy
from stockade.compiler.delta import (
    HostHistory,
    PolicyUpdate,
    UpdateKind,
    apply_set_deltas,
    apply_update,
    compose_set_deltas,
    delta_between,
    merge_host_deltas,
    policy_update_from_dict,
    policy_update_to_dict,
)
from stockade.compiler.ir import SetDelta
from stockade.errors import ConflictError, ValidationError
from stockade.model import EnforcementMode, Interface, Policy, Workload
from stockade.model.addresses import Family
from tests.unit import policy_strategies as ps
from tests.unit.test_agent_core import host_policy
from tests.unit.test_agent_loop import Harness

N = ipaddress.ip_network
LIMIT = 3  # history steps in the property test: small, so agents fall off its end too


def wire(update: PolicyUpdate) -> PolicyUpdate:
    """Through JSON and back, as an agent receives it."""
    return policy_update_from_dict(json.loads(json.dumps(policy_update_to_dict(update))))


# ---- the property ---------------------------------------------------------------------------

upsert = st.tuples(st.just("upsert"), ps.workload())
change = st.one_of(  # mostly inventory changes: they give peers set deltas to compose
    upsert,
    upsert,
    upsert,
    st.tuples(st.just("remove"), st.sampled_from(ps.NAMES)),
    st.tuples(st.just("provision"), ps.policy()),
)
transactions = st.lists(st.lists(change, min_size=1, max_size=3), min_size=1, max_size=10)


def _run(comp: Compiler, kind: str, arg: object) -> list[HostDelta]:
    if kind == "upsert":
        assert isinstance(arg, Workload)
        owners = {a for w in comp.policy.workloads if w.name != arg.name for a in w.addresses}
        if any(a in owners for a in arg.addresses):
            return []  # addresses stay unique, as the controller's validation keeps them
        return comp.upsert_workload(arg)
    if kind == "remove":
        assert isinstance(arg, str)
        return comp.remove_workload(arg) if arg in comp.workload_names else []
    assert isinstance(arg, Policy)
    return comp.replace_policy(arg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps.policy(), transactions)
def test_composed_deltas_lead_from_any_held_revision_to_the_full_compile(
    policy: Policy, txns: list[list[tuple[str, object]]]
) -> None:
    comp = Compiler(policy)
    histories = {n: HostHistory.begin(1, hp, LIMIT) for n, hp in comp.all_host_policies().items()}
    held: dict[str, dict[int, HostPolicy]] = {n: {1: h.policy} for n, h in histories.items()}
    for txn in txns:
        merged: dict[str, HostDelta] = {}
        for kind, arg in txn:
            for d in _run(comp, kind, arg):
                prev = merged.get(d.workload)
                merged[d.workload] = d if prev is None else merge_host_deltas(prev, d)
        for name, d in sorted(merged.items()):
            hist = histories.get(name)
            if d.policy is None:
                histories.pop(name, None)
                held.pop(name, None)
                continue
            if hist is None:
                histories[name] = HostHistory.begin(1, d.policy, LIMIT)
                held[name] = {1: d.policy}
                continue
            nxt = hist.after(d, hist.revision + 1)
            if nxt is None:
                assert d.policy == hist.policy, "a bump was skipped although the policy changed"
                continue
            histories[name] = nxt
            held[name][nxt.revision] = d.policy

    final = compile_policy(comp.policy)
    assert set(histories) == set(final)
    for name, hist in histories.items():
        assert hist.policy == final[name]
        reachable = {s.base for s in hist.steps}
        for since, old in held[name].items():
            update = wire(hist.update_since(since))
            assert update == hist.update_since(since), "the wire codec changed the update"
            new = apply_update(old, since, update)
            assert (new if new is not None else old) == final[name]
            behind = hist.revision - since
            if behind == 0:
                assert update.kind is UpdateKind.UNCHANGED
            elif since not in reachable:
                assert update.kind is UpdateKind.FULL
            elif all(s.set_deltas is not None for s in hist.steps if s.base >= since):
                assert update.kind is UpdateKind.DELTA and update.base == since
        assert hist.update_since(None).kind is UpdateKind.FULL


def test_a_readdressed_host_is_a_rules_change() -> None:
    """The renderers write a host's own addresses into its ruleset: a delta cannot carry them."""
    p = Policy(workloads=(Workload("w0", interfaces=(Interface("eth0", (ipaddress.ip_address("10.0.0.1"),)),)),))
    comp = Compiler(p)
    moved = Workload("w0", interfaces=(Interface("eth0", (ipaddress.ip_address("10.0.0.2"),)),))
    (d,) = comp.upsert_workload(moved)
    assert d.rules_changed and d.set_deltas == ()
    hist = HostHistory.begin(1, compile_policy(p)["w0"]).after(d, 2)
    assert hist is not None and hist.update_since(1).kind is UpdateKind.FULL


# ---- history ----------------------------------------------------------------------------------


def _peer(*members: str) -> HostPolicy:
    return host_policy(peers=members)


def _chain(limit: int, *states: tuple[str, ...]) -> HostHistory:
    hist = HostHistory.begin(1, _peer(*states[0]), limit)
    for i, members in enumerate(states[1:], start=2):
        new = _peer(*members)
        step = delta_between(hist.policy, new)
        nxt = hist.after(HostDelta(new.workload, new, step is None, step or ()), i)
        assert nxt is not None
        hist = nxt
    return hist


def test_history_composes_and_forgets() -> None:
    states = [("10.0.0.1/32",), ("10.0.0.1/32", "10.0.0.2/32"), ("10.0.0.2/32",), ("10.0.0.3/32",),
              ("10.0.0.3/32", "10.0.1.0/24")]
    hist = _chain(3, *states)
    assert hist.revision == 5 and [s.base for s in hist.steps] == [2, 3, 4]
    three = hist.update_since(2)
    assert three.kind is UpdateKind.DELTA and three.base == 2
    # 10.0.0.1 and 10.0.0.2 come and go inside the chain: only the net change is sent
    v4 = next(d for d in three.set_deltas if d.family is Family.V4)
    assert v4.added == (N("10.0.0.3/32"), N("10.0.1.0/24")) and v4.removed == (N("10.0.0.1/32"), N("10.0.0.2/32"))
    assert apply_update(_peer(*states[1]), 2, three) == hist.policy
    assert hist.update_since(1).kind is UpdateKind.FULL  # history + 1 behind
    assert hist.update_since(5).kind is UpdateKind.UNCHANGED
    assert hist.update_since(9).kind is UpdateKind.FULL  # ahead of the controller: start over


def test_a_rules_step_makes_older_revisions_full() -> None:
    hist = _chain(8, ("10.0.0.1/32",), ("10.0.0.2/32",))
    new = replace(hist.policy, mode=EnforcementMode.SELECTIVE)
    nxt = hist.after(HostDelta(new.workload, new, True, ()), 3)
    assert nxt is not None
    assert nxt.after(HostDelta(new.workload, new, False, ()), 4) is None  # nothing changed: no revision
    assert nxt.update_since(1).kind is UpdateKind.FULL and nxt.update_since(2).kind is UpdateKind.FULL


def test_an_empty_step_with_a_different_policy_is_full() -> None:
    hist = HostHistory.begin(1, _peer("10.0.0.1/32"))
    other = _peer("10.0.0.7/32")
    nxt = hist.after(HostDelta(other.workload, other, False, ()), 2)
    assert nxt is not None and nxt.steps[-1].set_deltas is None
    assert nxt.update_since(1).kind is UpdateKind.FULL


def test_a_revision_gap_starts_a_new_history() -> None:
    hist = _chain(8, ("10.0.0.1/32",), ("10.0.0.2/32",))
    new = _peer("10.0.0.3/32")
    nxt = hist.after(HostDelta(new.workload, new, False, delta_between(hist.policy, new) or ()), 7)
    assert nxt is not None and nxt.steps == () and nxt.update_since(2).kind is UpdateKind.FULL


# ---- composing and merging --------------------------------------------------------------------


def _d(added: tuple[str, ...] = (), removed: tuple[str, ...] = (), name: str = "peer1") -> SetDelta:
    return SetDelta(name, Family.V4, tuple(map(N, added)), tuple(map(N, removed)))


def test_compose_cancels_and_refuses_impossible_chains() -> None:
    assert compose_set_deltas([_d(("10.0.0.1/32",))], [_d((), ("10.0.0.1/32",))]) == ()
    assert compose_set_deltas([_d((), ("10.0.0.1/32",))], [_d(("10.0.0.1/32",))]) == ()
    with pytest.raises(ConflictError, match="removed twice"):
        compose_set_deltas([_d((), ("10.0.0.1/32",))], [_d((), ("10.0.0.1/32",))])
    with pytest.raises(ConflictError, match="added twice"):
        compose_set_deltas([_d(("10.0.0.1/32",))], [_d(("10.0.0.1/32",))])


def test_merge_of_a_rules_change_and_set_deltas_is_a_rules_change() -> None:
    hp = _peer("10.0.0.1/32")
    a = HostDelta(hp.workload, hp, True, ())
    b = HostDelta(hp.workload, hp, False, (_d(("10.0.0.2/32",)),))
    assert merge_host_deltas(a, b) == HostDelta(hp.workload, hp, True, ())
    gone = HostDelta(hp.workload, None, True, ())
    assert merge_host_deltas(b, gone) is gone
    assert merge_host_deltas(gone, b).rules_changed


# ---- strict apply -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deltas", "message"),
    [
        ((SetDelta("nope", Family.V4, (N("10.9.9.9/32"),), ()),), "unknown set"),
        ((_d((), ("10.9.9.9/32",)),), "absent members 10.9.9.9/32"),
        ((_d(("10.0.0.2/32",)),), "present members 10.0.0.2/32"),
        ((_d(("10.0.0.7/32", "10.0.0.7/32")),), "present members twice"),
        ((_d(("10.0.0.7/32",)), _d(("10.0.0.8/32",))), "two set deltas"),
    ],
)
def test_strict_apply_refuses_deltas_that_do_not_fit(deltas: tuple[SetDelta, ...], message: str) -> None:
    with pytest.raises(ConflictError, match=message):
        apply_set_deltas(_peer("10.0.0.2/32"), deltas)


def test_strict_apply_removes_then_adds() -> None:
    hp = _peer("10.0.0.2/32")
    out = apply_set_deltas(hp, (_d(("10.0.0.2/31",), ("10.0.0.2/32",)),))
    assert out == _peer("10.0.0.2/31")


def test_apply_update_checks_the_base_revision() -> None:
    hp = _peer("10.0.0.2/32")
    upd = PolicyUpdate.delta(3, 4, (_d(("10.0.0.3/32",)),))
    assert apply_update(hp, 3, upd) == _peer("10.0.0.2/32", "10.0.0.3/32")
    with pytest.raises(ConflictError, match="revision 2 is in force"):
        apply_update(hp, 2, upd)
    with pytest.raises(ConflictError, match="no policy is in force"):
        apply_update(None, 3, upd)
    assert apply_update(hp, 4, PolicyUpdate.unchanged(4)) is None
    assert apply_update(None, 0, PolicyUpdate.full(4, hp)) == hp


# ---- wire codec -------------------------------------------------------------------------------


def test_wire_round_trip_of_every_kind() -> None:
    hp = _peer("10.0.0.2/32", "fd00::2/128")
    for upd in (PolicyUpdate.full(3, hp), PolicyUpdate.unchanged(3),
                PolicyUpdate.delta(2, 3, (_d(("10.0.0.3/32",), ("10.0.0.2/32",)),
                                          SetDelta("peer1", Family.V6, (N("fd00::3/128"),), ())))):
        assert wire(upd) == upd
    assert policy_update_to_dict(PolicyUpdate.delta(2, 3, (_d(("10.0.0.3/32",)),))) == {
        "revision": 3, "full": None, "base": 2,
        "set_deltas": [{"name": "peer1", "family": 4, "added": ["10.0.0.3/32"], "removed": []}],
    }
    assert policy_update_to_dict(PolicyUpdate.unchanged(3)) == {
        "revision": 3, "full": None, "base": 3, "set_deltas": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], ""),
        ({"revision": -1}, "revision"),
        ({"revision": True}, "revision"),
        ({"revision": 2, "policy": {}}, "policy"),
        ({"revision": 2, "full": "text"}, "full"),
        ({"revision": 2, "full": {"workload": "w"}}, "full"),
        ({"revision": 2, "base": "1"}, "base"),
        ({"revision": 2, "base": 3, "set_deltas": []}, "base"),
        ({"revision": 2, "base": 2, "set_deltas": [{"name": "p", "family": 4}]}, "set_deltas"),
        ({"revision": 2, "base": 1, "set_deltas": "no"}, "set_deltas"),
        ({"revision": 2, "base": 1, "set_deltas": ["no"]}, "set_deltas[0]"),
        ({"revision": 2, "base": 1, "set_deltas": [{"family": 4}]}, "set_deltas[0].name"),
        ({"revision": 2, "base": 1, "set_deltas": [{"name": "p", "family": 5}]}, "set_deltas[0].family"),
        ({"revision": 2, "base": 1, "set_deltas": [{"name": "p", "family": 4, "added": ["x"]}]},
         "set_deltas[0].added[0]"),
        ({"revision": 2, "base": 1, "set_deltas": [{"name": "p", "family": 4, "removed": ["fd00::1/128"]}]},
         "set_deltas[0].removed[0]"),
        ({"revision": 2, "base": 1, "set_deltas": [{"name": "p", "family": 4, "added": "10.0.0.1"}]},
         "set_deltas[0].added"),
    ],
)
def test_malformed_wire_answers_name_the_field(body: Any, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        policy_update_from_dict(body)
    assert [i.field for i in err.value.issues] == [field]


# ---- the real agent against the in-memory controller --------------------------------------------

HISTORY = 4


@pytest.mark.parametrize(("behind", "as_delta"), [(1, True), (3, True), (HISTORY + 1, False)])
def test_agent_behind_converges(tmp_path: Path, behind: int, as_delta: bool) -> None:
    """The agent misses ``behind`` revisions (controller unreachable), then catches up: by one
    composed delta while the history reaches back, else by the full policy, which differs from the
    one in force in set members only: applied as their difference, never a reload."""
    h = Harness(tmp_path, FakeController(history=HISTORY))
    h.controller.publish(_peer("10.0.0.2/32"))
    a = h.agent()
    a.start()
    try:
        assert wait_until(lambda: h.acked() == [1])
        h.controller.set_reachable(False)
        for i in range(behind):
            h.controller.publish(_peer("10.0.0.2/32", *(f"10.0.{k + 1}.0/24" for k in range(i + 1))))
        want = h.controller.histories["web1"].policy
        h.controller.set_reachable(True)
        assert wait_until(lambda: h.backend.installed == want and h.acked()[-1] == 1 + behind, 5.0)
        assert (h.backend.deltas_applied, h.backend.applies) == (1, 1)
        assert ("web1", 1) in h.controller.fetches
        sent = h.controller.histories["web1"].update_since(1).kind
        assert sent is (UpdateKind.DELTA if as_delta else UpdateKind.FULL)
    finally:
        h.stop()


def test_a_delta_that_does_not_fit_makes_the_agent_fetch_the_full_policy(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeController())
    h.controller.publish(_peer("10.0.0.2/32"))
    a = h.agent()
    a.start()
    try:
        assert wait_until(lambda: h.acked() == [1])
        new = _peer("10.0.0.2/32", "10.0.0.9/32")
        # a producer bug: the step claims to remove a member the agent does not have
        h.controller.publish(new, (_d(("10.0.0.9/32",), ("10.0.0.77/32",)),))
        assert wait_until(lambda: h.backend.installed == new and h.acked()[-1] == 2)
        assert h.controller.fetches[-2:] == [("web1", 1), ("web1", None)]
        # the controller's delta was refused before anything changed; the full policy fetched then
        # differs from the one in force in members only: applied as their difference, no reload
        assert h.backend.deltas_applied == 1 and h.backend.applies == 1
    finally:
        h.stop()
