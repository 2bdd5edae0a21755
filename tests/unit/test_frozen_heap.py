"""The node agent's long-lived heap kept out of the collections after proofs (issue 15, session 10).

A full collection after a proof walked the whole ~400 MiB heap of a node agent at 110 pods and held
the GIL 92-581 ms every ~2 s during churn: the tail of a new pod's time to protection. With
:class:`~stockade.agent.heap.FrozenHeap` installed, a collection freezes what survives it, so the next
one walks only what was made since; a deep collection (everything thawed) still frees what became
cyclic garbage among the frozen, at most ``deep_every + defer_max`` later, and waits for a moment
with no new pod waiting.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from stockade.agent import heap
from stockade.agent.proving import collect_and_trim


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Node:
    """A long-lived object in a reference cycle (as a pod runtime's objects are)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def frozen() -> Iterator[tuple[heap.FrozenHeap, _Clock]]:
    clock = _Clock()
    h = heap.FrozenHeap(deep_every=60.0, defer_max=30.0, clock=clock)
    heap.install(h)
    try:
        yield h, clock
    finally:
        heap.install(None)
        gc.unfreeze()
        gc.collect()


def test_a_collection_after_a_proof_walks_only_what_was_made_since(frozen: tuple[heap.FrozenHeap, _Clock]) -> None:
    long_lived = [[i] for i in range(50_000)]  # the pods' runtimes, policies, clients
    collect_and_trim()  # after a proof: the survivors are frozen ...
    assert gc.get_freeze_count() >= 50_000
    tracked = {id(o) for o in gc.get_objects()}  # ... and no generation holds them: not walked again
    assert not any(id(o) in tracked for o in long_lived[::1000])
    assert len(tracked) < 20_000
    young = [[i] for i in range(100)]
    assert {id(o) for o in young} <= {id(o) for o in gc.get_objects()}  # what is new is still collected


def test_cyclic_garbage_among_the_frozen_is_freed_by_the_deep_collection(
        frozen: tuple[heap.FrozenHeap, _Clock]) -> None:
    h, clock = frozen
    pod = _Node()
    gone = weakref.ref(pod)
    collect_and_trim()  # frozen while the pod runs
    del pod  # the pod deleted: its runtime is cyclic garbage, frozen
    collect_and_trim()
    assert gone() is not None and h.deep == 0  # a collection of what is young does not see it
    clock.now += 60.0
    collect_and_trim()  # the deep one: everything thawed, walked, frozen again
    assert gone() is None and h.deep == 1
    assert gc.get_freeze_count() > 0


def test_the_deep_collection_waits_for_a_quiet_moment_but_not_forever() -> None:
    clock, waiting = _Clock(), [True]
    thawed: list[float] = []
    h = heap.FrozenHeap(lambda: not waiting[0], deep_every=60.0, defer_max=30.0, clock=clock,
                        freeze=lambda: None, unfreeze=lambda: thawed.append(clock.now))
    assert h.begin() is False  # not due yet
    clock.now += 60.0
    assert h.begin() is False and thawed == []  # due, but a new pod is waiting for its namespace
    waiting[0] = False
    assert h.begin() is True and thawed == [160.0]  # quiet: thawed (deep)
    assert h.begin() is False  # the next one is 60 s away
    waiting[0] = True
    clock.now += 89.0
    assert h.begin() is False
    clock.now += 1.0
    assert h.begin() is True and thawed == [160.0, 250.0]  # overdue: runs even with a pod waiting
    h.end()
    assert h.frozen == 1


def test_a_process_without_a_frozen_heap_collects_everything_as_before() -> None:
    heap.install(None)
    frozen_before = gc.get_freeze_count()  # others may have frozen (the compiler does after a build)
    pod = _Node()
    gone = weakref.ref(pod)
    del pod
    collect_and_trim()
    assert gone() is None and gc.get_freeze_count() == frozen_before  # nothing frozen by the collection


def test_the_deep_collection_runs_at_a_moment_nothing_is_starting() -> None:
    """Left to the collections after proofs, the deep collection (the whole heap, 150-420 ms at 110
    pods) often found a pod starting under steady churn, and ran anyway once overdue: pods waited
    through it. The node agent now runs it itself at a reconcile pass with nothing pending
    (``deep_collection_when_quiet``), never while a pod is starting."""
    from stockade.agent import heap
    from stockade.agent.proving import deep_collection_when_quiet

    now = [0.0]
    starting = [False]
    thawed: list[int] = []
    frozen = heap.FrozenHeap(quiet=lambda: not starting[0], deep_every=60.0, clock=lambda: now[0],
                             freeze=lambda: None, unfreeze=lambda: thawed.append(1))
    before = heap.installed()
    heap.install(frozen)
    try:
        assert not frozen.due() and not deep_collection_when_quiet(False) and not thawed  # not due yet
        now[0] = 61.0
        starting[0] = True
        assert frozen.due() and not deep_collection_when_quiet(True) and not thawed  # due, but a pod is starting
        starting[0] = False
        assert deep_collection_when_quiet(False) and thawed == [1] and frozen.deep == 1  # the first quiet pass
        assert not frozen.due() and not deep_collection_when_quiet(False) and frozen.deep == 1
    finally:
        heap.install(before)
