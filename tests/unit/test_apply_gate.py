"""The node-wide apply gate (issue 15): first applies go ahead of deltas, queued deltas coalesce.

The gate on its own (admission order, slots, stop while waiting), then agent runtimes sharing one
over the in-memory controller and firewall: a pod's first policy is applied while other pods'
deltas wait, and a pod whose delta queued applies every revision published meanwhile as ONE delta
(one fetch from what it has in force, one apply, one acknowledgement of the newest revision).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import cast

import pytest

from stockade.agent.agent import Agent
from stockade.agent.apply_gate import ApplyGate, Priority
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import FakeController, FakeControllerClient, MemoryBackend, wait_until
from stockade.agent.state import StateDir
from stockade.compiler.delta import PolicyUpdate
from tests.unit.test_agent_core import host_policy
from tests.unit.test_agent_loop import HOST, OPTIONS


def _enter(gate: ApplyGate, priority: Priority, entered: list[Priority], release: threading.Event,
           stop: threading.Event | None = None) -> threading.Thread:
    def run() -> None:
        with gate.admit(priority, stop) as adm:
            if adm is None:
                return
            entered.append(priority)
            release.wait(5)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_first_applies_go_ahead_of_queued_deltas_and_proofs() -> None:
    gate = ApplyGate(slots=1, first_slots=2, max_defer=30)
    entered: list[Priority] = []
    hold, release = threading.Event(), threading.Event()
    busy = _enter(gate, Priority.DELTA, entered, hold)  # the one background slot is taken
    assert wait_until(lambda: entered == [Priority.DELTA])
    waiters = [_enter(gate, Priority.PROOF, entered, release)]
    assert wait_until(lambda: gate.waiting() == 1)
    waiters.append(_enter(gate, Priority.DELTA, entered, release))
    assert wait_until(lambda: gate.waiting() == 2)
    # a first apply does not wait for the busy delta slot nor behind the queued delta and proof
    waiters.append(_enter(gate, Priority.FIRST, entered, release))
    assert wait_until(lambda: entered == [Priority.DELTA, Priority.FIRST])
    hold.set()  # the running delta ends; the queued delta may not start while the first apply runs
    busy.join(5)
    assert not wait_until(lambda: len(entered) > 2, 0.2)
    release.set()  # the first apply ends: the delta, then the proof
    for t in waiters:
        t.join(5)
    assert entered == [Priority.DELTA, Priority.FIRST, Priority.DELTA, Priority.PROOF]
    assert gate.stats.queued[Priority.DELTA] == 1 and gate.stats.queued[Priority.FIRST] == 0


def test_first_applies_are_bounded_by_their_own_slots() -> None:
    gate = ApplyGate(slots=1, first_slots=2)
    entered: list[Priority] = []
    release = threading.Event()
    threads = [_enter(gate, Priority.FIRST, entered, release) for _ in range(3)]
    assert wait_until(lambda: len(entered) == 2)
    assert not wait_until(lambda: len(entered) > 2, 0.2)
    release.set()
    for t in threads:
        t.join(5)
    assert len(entered) == 3


def test_a_starting_pod_holds_deltas_back_but_never_longer_than_max_defer() -> None:
    gate = ApplyGate(slots=2, max_defer=0.3)
    entered: list[Priority] = []
    release = threading.Event()
    gate.begin_hold()  # a pod is being started
    t = _enter(gate, Priority.DELTA, entered, release)
    assert not wait_until(lambda: bool(entered), 0.15)
    assert wait_until(lambda: entered == [Priority.DELTA], 5)  # aged past max_defer: it goes
    gate.end_hold()
    entered.clear()
    _enter(gate, Priority.PROOF, entered, release)  # no hold, a free slot: at once
    assert wait_until(lambda: entered == [Priority.PROOF], 0.25)
    release.set()
    t.join(5)


def test_a_timed_hold_keeps_deltas_back_until_released_or_run_out() -> None:
    """A pod awaiting its sandbox (policy in hand) holds the gate for a bounded time: a delta queued
    meanwhile waits for its release, or for the hold to run out on its own (no notification: the
    queued delta looks again then), never longer than max_defer; a second hold_for of the same key
    does not extend it."""
    gate = ApplyGate(slots=2, max_defer=30, timed_defer=30)
    entered: list[Priority] = []
    release = threading.Event()
    gate.hold_for("pod-a", 30)
    assert not gate.idle()
    t = _enter(gate, Priority.DELTA, entered, release)
    assert not wait_until(lambda: bool(entered), 0.2)  # held
    gate.release("pod-a")
    assert wait_until(lambda: entered == [Priority.DELTA], 1)
    release.set()
    t.join(5)
    assert gate.idle()
    entered.clear()
    gate.hold_for("pod-b", 0.3)
    gate.hold_for("pod-b", 30)  # not extended
    t = _enter(gate, Priority.PROOF, entered, release)
    assert not wait_until(lambda: bool(entered), 0.15)
    assert wait_until(lambda: entered == [Priority.PROOF], 1)  # ran out after 0.3 s
    t.join(5)
    assert gate.idle()
    gate.release("pod-b")  # ran out already: nothing happens
    assert gate.take_delta_waits().startswith("1 deltas, p50 ") and gate.take_delta_waits() == ""  # drained
    gate.hold_for("pod-c", 30)  # never released: timed_defer bounds every wait for it
    gate.timed_defer = 0.2
    entered.clear()
    t = _enter(gate, Priority.DELTA, entered, release)
    assert wait_until(lambda: entered == [Priority.DELTA], 2)
    t.join(5)
    gate.begin_hold()  # a start under way as well: max_defer (30 s) applies, not timed_defer
    entered.clear()
    t = _enter(gate, Priority.DELTA, entered, release)
    assert not wait_until(lambda: bool(entered), 0.4)
    gate.end_hold()
    assert wait_until(lambda: entered == [Priority.DELTA], 1)  # timed_defer again: it has waited past it
    t.join(5)


def test_a_stopping_waiter_leaves_the_queue() -> None:
    gate = ApplyGate(slots=1)
    entered: list[Priority] = []
    hold, stop = threading.Event(), threading.Event()
    _enter(gate, Priority.DELTA, entered, hold)
    assert wait_until(lambda: entered == [Priority.DELTA])
    waiter = _enter(gate, Priority.DELTA, entered, hold, stop)
    assert wait_until(lambda: gate.waiting() == 1)
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive() and gate.waiting() == 0
    hold.set()


def _waiting(gate: ApplyGate, n: int) -> bool:
    return gate.waiting() == n


class _CountingGate(ApplyGate):
    """Counts how often a waiter woke and looked whether it may enter."""

    looks = 0

    def _may_enter(self, ticket: tuple[int, int]) -> bool:
        self.looks += 1
        return super()._may_enter(ticket)


def test_an_admission_wakes_the_next_waiter_not_every_waiter() -> None:
    """Under churn ~100 pods' deltas and proofs queue at once; every admission and exit woke all of
    them (notify_all) and each went back to sleep (only the head may enter): ~n^2 wake-ups, each a
    GIL hand-off, enough to make a new pod's namespace noticed 100-200 ms late. Now only the head's
    waiter is woken: a few looks per ticket, every ticket still admitted, oldest first."""
    n = 60
    gate = _CountingGate(slots=1)
    first, release = threading.Event(), threading.Event()
    entered: list[Priority] = []
    holder = _enter(gate, Priority.DELTA, entered, first)
    assert wait_until(lambda: entered == [Priority.DELTA])
    order: list[int] = []

    def queued(i: int) -> threading.Thread:
        def run() -> None:
            with gate.admit(Priority.DELTA) as adm:
                assert adm is not None and adm.queued
                order.append(i)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    threads = []
    for i in range(n):
        threads.append(queued(i))
        assert wait_until(functools.partial(_waiting, gate, i + 1))  # queued in this order
    gate.looks = 0
    first.set()
    holder.join(5)
    for t in threads:
        t.join(10)
    release.set()
    assert order == list(range(n)) and gate.idle()
    assert gate.looks <= 4 * n, f"{gate.looks} looks for {n} tickets (every waiter woken at every admission)"


class Node:
    """Agent runtimes of one node (one per pod) sharing a gate, over one fake controller."""

    def __init__(self, tmp: Path, gate: ApplyGate) -> None:
        self.controller = FakeController(inline=True)
        self.gate = gate
        self.tmp = tmp
        self.agents: list[Agent] = []

    def pod(self, workload: str) -> tuple[Agent, MemoryBackend]:
        self.controller.add_code(f"code-{workload}", workload)
        backend = MemoryBackend()
        options = OPTIONS.__class__(**{**OPTIONS.__dict__, "activation_code": f"code-{workload}",
                                       "proof_interval": 0.0})
        agent = Agent(options, StateDir(self.tmp / workload), Enforcer(backend),
                      lambda url, ca: FakeControllerClient(self.controller, url, ca), host_reader=lambda: HOST,
                      gate=self.gate)
        self.agents.append(agent)
        return agent, backend

    def acked(self, workload: str) -> list[int]:
        try:
            return self.controller.agent_for(workload).acked
        except KeyError:
            return []  # not enrolled yet

    def stop(self) -> None:
        for a in self.agents:
            a.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, ApplyGate(slots=1))
    yield n
    n.stop()


def test_queued_deltas_coalesce_and_a_new_pod_is_programmed_meanwhile(node: Node) -> None:
    ctl = node.controller
    old, old_backend = node.pod("server")
    ctl.publish(host_policy("server", peers=("10.0.0.2/32",)))
    old.start()
    assert wait_until(lambda: node.acked("server")[-1:] == [1])
    assert old_backend.applies == 1 and old_backend.deltas_applied == 0
    with ExitStack() as held:
        # every background slot is busy (another pod's long delta): the server pod's deltas queue
        held.enter_context(node.gate.admit(Priority.DELTA))
        ctl.publish(host_policy("server", peers=("10.0.0.2/32", "10.0.0.3/32")))
        # its long-poll brought revision 2 and it waits at the gate; two more revisions come meanwhile
        assert wait_until(lambda: node.gate.waiting() == 1)
        ctl.publish(host_policy("server", peers=("10.0.0.2/32", "10.0.0.3/32", "10.0.0.4/32")))
        ctl.publish(host_policy("server", peers=("10.0.0.3/32", "10.0.0.4/32", "10.0.0.5/32")))
        # a new pod arrives meanwhile: its first policy does not wait behind the queued delta
        new, new_backend = node.pod("client")
        ctl.publish(host_policy("client", peers=("10.0.0.1/32",)))
        new.start()
        assert wait_until(lambda: new_backend.installed == host_policy("client", peers=("10.0.0.1/32",)))
        assert old_backend.installed == host_policy("server", peers=("10.0.0.2/32",)), "delta jumped the gate"
    # released: the three revisions arrive as one delta from revision 1, acknowledged as 4
    want = host_policy("server", peers=("10.0.0.3/32", "10.0.0.4/32", "10.0.0.5/32"))
    assert wait_until(lambda: old_backend.installed == want and node.acked("server")[-1:] == [4])
    assert old_backend.deltas_applied == 1 and old_backend.applies == 1
    assert ("server", 1) in ctl.fetches  # fetched from what it had in force
    assert 2 not in node.acked("server") and 3 not in node.acked("server")


def test_a_node_pods_update_is_refetched_exactly_when_its_poller_knows_a_newer_revision(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a pod that queued at the gate always dropped the update its node's answer brought and
    fetched again (one GET per pod per event), and one that waited in the poller's pool while a newer
    revision came applied the old update, then the newer one (two applies). With ``newer_known`` (the
    node's poller) the refetch happens exactly when a newer revision is known; a host agent's update
    (no ``newer_known``) still refetches when queued."""
    agent, _backend = node.pod("server")
    agent.enforcer.enforce(host_policy("server"))  # a delta, not a first policy (those never queue)
    seen: list[PolicyUpdate | None] = []
    monkeypatch.setattr(agent, "_update", lambda _c, _a, prefetched: seen.append(prefetched))
    upd = PolicyUpdate.delta(1, 2, ())
    client = cast(FakeControllerClient, object())

    def queued(newer: Callable[[], bool] | None) -> None:
        with ExitStack() as held:
            held.enter_context(node.gate.admit(Priority.DELTA))  # the one slot busy: the update queues
            t = threading.Thread(target=agent.update, args=(client, 2, upd, newer))
            t.start()
            assert wait_until(lambda: node.gate.waiting() == 1)
        t.join(5)

    agent.update(client, 2, upd, newer_known=lambda: False)
    agent.update(client, 2, upd, newer_known=lambda: True)
    queued(lambda: False)
    queued(lambda: True)
    queued(None)
    agent.update(client, 2, upd)
    assert seen == [upd, None, upd, None, None, upd]


def test_a_timed_hold_that_ran_out_under_a_starts_hold_does_not_spin_the_head() -> None:
    """A sandbox hold that ran out while a start holds the gate is forgotten, not used as the head's
    next wake-up (it would wake every millisecond, in the very moment a new pod starts)."""
    gate = _CountingGate(slots=2, max_defer=30)
    gate.hold_for("pod-a", 0.01)
    gate.begin_hold()
    time.sleep(0.05)  # pod-a's hold has run out
    entered: list[Priority] = []
    release = threading.Event()
    t = _enter(gate, Priority.DELTA, entered, release)
    time.sleep(0.3)
    assert not entered and gate.looks < 20, gate.looks
    gate.end_hold()
    assert wait_until(lambda: entered == [Priority.DELTA], 1)
    release.set()
    t.join(5)
