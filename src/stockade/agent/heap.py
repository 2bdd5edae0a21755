"""The node agent's long-lived heap kept out of the collections that follow proofs (``gc.freeze``).

Why: every proof is followed by a full garbage collection (a proof's BDD manager is freed only with
its last node, and nodes may sit in reference cycles; :class:`~stockade.agent.proving.Collections`
coalesces them to one per 2 s). A full collection walks every tracked object of the process, and a
node agent at 110 pods holds ~400 MiB of heap (110 pod runtimes, their clients, policies and
templates): in churn at 2 + 2 pods/s each collection held the GIL for 92-581 ms, one every ~2 s
(bench/k8s.py). A new pod whose sandbox appeared meanwhile waited before its namespace was even
seen: with the apply gate's wake-ups (:mod:`~stockade.agent.apply_gate`), the tail of a new pod's
time to protection (p99 252-706 ms for a p50 of ~45-68 ms).

How: after a collection the survivors are moved to the permanent generation (``gc.freeze()``), so the
next collection walks only what was allocated since (a proof's garbage, a new pod's runtime): 10-35
ms in churn. A frozen object is still freed by reference counting, never by a collection: one that
becomes *cyclic* garbage later (a deleted pod's runtime, a proof that ran beside the collection)
waits for a **deep** collection, which thaws everything (``gc.unfreeze()``), walks the whole heap as
before and freezes again. A deep collection is due ``deep_every`` seconds after the last one and
waits for a quiet moment (``quiet()``: for the node agent, no pod waiting for its namespace or being
started) at most ``defer_max`` seconds longer. So cyclic garbage is freed as before, only up to
``deep_every + defer_max`` later (RSS peak in churn +38-57 MiB, at rest unchanged), and the long
pauses come once a minute, when no new pod is waiting, instead of every 2 s.

The CLI's node agent installs one (:func:`install`); any other process (a host agent: one runtime,
a small heap) collects as before.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("stockade.agent")

DEEP_EVERY = 60.0  # a deep collection (the whole heap, thawed) this often ...
DEFER_MAX = 30.0  # ... delayed for a quiet moment at most this much longer
PAUSE_LOGGED = 0.01  # full collections taking longer than this are logged (seconds)


class FrozenHeap:
    """When to thaw before a collection and whether to freeze after it (module docstring).

    ``begin()`` is called before a full collection: True when it is a deep one (the heap thawed);
    ``end()`` after it: the survivors are frozen. A proof running meanwhile has its live objects
    frozen too: freed by reference counting as before, and what of them is cyclic by the next deep
    collection (not freezing then would leave the whole heap thawed until a collection finds no
    proof running, which under churn is seldom: measured, 290-370 ms collections again). Thread-safe."""

    def __init__(self, quiet: Callable[[], bool] = lambda: True, *, deep_every: float = DEEP_EVERY,
                 defer_max: float = DEFER_MAX, clock: Callable[[], float] = time.monotonic,
                 freeze: Callable[[], None] = gc.freeze, unfreeze: Callable[[], None] = gc.unfreeze) -> None:
        self.quiet = quiet
        self.deep_every, self.defer_max = deep_every, defer_max
        self._clock = clock
        self._freeze, self._unfreeze = freeze, unfreeze
        self._lock = threading.Lock()
        self._last_deep = clock()
        self.deep = 0  # deep collections run (stats, tests)
        self.frozen = 0  # freezes

    def due(self) -> bool:
        """A deep collection is due (``deep_every`` since the last): the node agent runs it itself at the
        next moment no pod is starting (:func:`~stockade.agent.proving.deep_collection_when_quiet`)."""
        with self._lock:
            return self._clock() - self._last_deep >= self.deep_every

    def begin(self) -> bool:
        """Before a full collection: thaw the heap when a deep collection is due (and quiet, or
        overdue); True when it did."""
        now = self._clock()
        with self._lock:
            age = now - self._last_deep
            if age < self.deep_every:
                return False
        if age < self.deep_every + self.defer_max and not self.quiet():
            return False  # a new pod is waiting: the deep collection waits for a quiet moment
        with self._lock:
            self._last_deep = now
            self.deep += 1
        self._unfreeze()
        return True

    def end(self) -> None:
        """After a full collection: freeze the survivors."""
        with self._lock:
            self.frozen += 1
            self._freeze()


_HEAP: FrozenHeap | None = None


def install(heap: FrozenHeap | None) -> None:
    """Use ``heap`` for this process's collections after proofs (None: plain full collections)."""
    global _HEAP
    _HEAP = heap


def installed() -> FrozenHeap | None:
    return _HEAP


def log_long_pauses(threshold: float = PAUSE_LOGGED) -> None:
    """Log every full collection (generation 2, automatic or asked for) that held the GIL longer than
    ``threshold``: ``gc pause <ms> ms at <wall clock start>`` (bench/k8s.py reads these lines)."""
    began: list[float] = [0.0, 0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            began[0], began[1] = time.time(), time.perf_counter()
            return
        took = time.perf_counter() - began[1]
        if took >= threshold:
            log.info("gc pause %.1f ms at %.3f (collected %d)", took * 1000, began[0], info.get("collected", 0))

    gc.callbacks.append(timer)
