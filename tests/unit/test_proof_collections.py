"""Full collections after proofs (issue 15): coalesced across a process's proof loops.

A node agent runs one proof loop per pod. Each proof is followed by a full garbage collection (a
proof's BDD manager is freed only with its last node), and one full collection walks the whole
heap: 110 pods' proofs after a start-up asked for 110 of them and kept the node agent at most of a
core for tens of seconds. They now share one :class:`~stockade.agent.proving.Collections`: at most
one collection per gap, and a proof that finished after the last one is always followed by another.
"""

from __future__ import annotations

import threading

import pytest

from stockade.agent import proving
from stockade.agent.apply_gate import ApplyGate
from stockade.agent.fake import wait_until
from stockade.agent.proving import Collections, ProofLoop


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Enforcer:
    def __init__(self) -> None:
        self.proofs = 0

    def prove(self) -> None:
        self.proofs += 1


def _loops(n: int, collections: Collections, gate: ApplyGate | None = None) -> tuple[list[ProofLoop], _Enforcer]:
    enforcer = _Enforcer()
    loops = [ProofLoop(enforcer, lambda *a: None, lambda: 1, threading.Event(), interval=300.0,  # type: ignore[arg-type]
                       min_gap=30.0, gate=gate, collections=collections) for _ in range(n)]
    return loops, enforcer


@pytest.mark.parametrize("gated", [False, True])
def test_the_proofs_of_110_pods_ask_for_one_collection_per_gap_and_none_is_lost(gated: bool) -> None:
    clock, collected = _Clock(), []
    collections = Collections(gap=2.0, collect=lambda: collected.append(clock.now), clock=clock, background=False)
    loops, enforcer = _loops(110, collections, ApplyGate() if gated else None)
    for loop in loops:
        loop.poke.set()
        loop.turn()
        assert not loop.pending  # proven, nothing asked for
    assert enforcer.proofs == 110  # every pod still proven ...
    assert collected == [100.0] and collections.due  # ... and ONE collection so far (it was 110), one due
    assert collections.run_due() == pytest.approx(2.0) and collected == [100.0]  # not before the gap
    clock.now += 2.0
    assert collections.run_due() == 0.0 and collected == [100.0, 102.0] and not collections.due
    assert collections.run_due() == 0.0 and len(collected) == 2  # nothing due: nothing run
    clock.now += 5.0
    loops[0].turn()  # a proof long after the last collection: collected at once
    assert collected[-1] == 107.0 and not collections.due


def test_a_due_collection_runs_by_itself_after_the_gap() -> None:
    collected: list[int] = []
    collections = Collections(gap=0.05, collect=lambda: collected.append(1))
    collections.request()
    collections.request()  # within the gap: due, run by the background thread
    assert wait_until(lambda: len(collected) == 2 and not collections.due, 5.0)
    assert collections.runs == 2


def test_every_proof_loop_shares_the_process_collections() -> None:
    """The default: an agent's proof loop uses the process's Collections, so a node agent's pods share one."""
    loop = ProofLoop(_Enforcer(), lambda *a: None, lambda: 1, threading.Event(), interval=300.0)  # type: ignore[arg-type]
    assert loop.collections is proving.COLLECTIONS


def test_the_malloc_knobs_leave_an_operators_arena_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.agent import libc_malloc

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert libc_malloc.limit_arenas(2) is False  # the operator's choice stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    glibc = libc_malloc._LIBC is not None
    assert libc_malloc.limit_arenas(8) is glibc  # glibc's default for 1 core+; elsewhere nothing is done
    libc_malloc.trim()  # never raises, glibc or not
