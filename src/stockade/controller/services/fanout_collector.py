"""The garbage collector kept out of a large change's critical path (:class:`FanoutCollector`).

Why: a global change at 25,000 agents allocates for a second on every replica before its agents
have their answers: the writer's transaction, each follower's catch-up, then the fan-out, where
each answered agent comes straight back with its next poll (~63 objects the collector tracks).
At a young collection every 20,000 net allocations, each replica ran 6-8 young collections inside
its catch-up alone (one every ~14 ms, about half of it) and 20-30 more inside the fan-out, each
walking the polls already re-held (bench/controller.py with a trace, session 13). A collection
triggered by allocations cannot tell a change being answered from garbage piling up.

What:

* A catch-up or a transaction runs with the collector paused (``stockade.compiler.collections_paused``,
  the compiler's pause without its freeze): bounded work whose allocations are the change's own state.
  Reference counting frees what it drops.
* A change that bumps ``large`` hosts or more opens a window (:meth:`FanoutCollector.begin`,
  called before the pause ends): the young generation's threshold is raised to ``during`` (what
  may pile up meanwhile stays bounded: past it CPython collects as usual), and ``quiet`` seconds
  after the last large change it goes back and one young collection runs then. The change's
  survivors are walked once, after the agents have their answers, instead of once per collection
  inside it. Only cyclic garbage waits for it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Protocol

__all__ = ["FANOUT_LARGE", "FANOUT_QUIET", "FANOUT_YOUNG_AFTER", "Collector", "FanoutCollector"]

FANOUT_LARGE = 1_000  # hosts bumped by one change that make it large
FANOUT_QUIET = 4.0  # seconds after the last large change: its fan-out is answered (25,000 agents: ~3 s)
# net allocations between young collections meanwhile (one change at 25,000 agents: ~250,000 per replica)
FANOUT_YOUNG_AFTER = 2_000_000


class Collector(Protocol):
    """The garbage collector's calls this uses (``gc``; a fake in tests)."""

    def get_threshold(self) -> tuple[int, int, int]: ...

    def set_threshold(self, young: int, middle: int, old: int, /) -> None: ...

    def collect(self, generation: int, /) -> int: ...


class _Gc:
    def get_threshold(self) -> tuple[int, int, int]:
        return gc.get_threshold()

    def set_threshold(self, young: int, middle: int, old: int, /) -> None:
        gc.set_threshold(young, middle, old)

    def collect(self, generation: int, /) -> int:
        return gc.collect(generation)


class FanoutCollector:
    """Tell it each change's size (:meth:`begin`, any thread); it paces the young collections
    (the window's end runs on ``loop``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, large: int = FANOUT_LARGE,
                 quiet: float = FANOUT_QUIET, during: int = FANOUT_YOUNG_AFTER,
                 collector: Collector | None = None) -> None:
        self._loop = loop
        self.large, self.quiet, self.during = large, quiet, during
        self._gc: Collector = collector if collector is not None else _Gc()
        self._lock = threading.Lock()
        self._until = 0.0  # loop time at which the open window ends (moved on by each large change)
        self._saved: int | None = None  # the young threshold to restore: a window is open
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.windows = 0  # windows closed, each with its one collection (tests, metrics)

    @property
    def open(self) -> bool:
        return self._saved is not None

    def begin(self, hosts: int) -> None:
        """A change bumped ``hosts`` hosts and its answers are about to go out (any thread)."""
        if hosts < self.large:
            return
        with self._lock:
            if self._closed:
                return
            self._until = self._loop.time() + self.quiet
            if self._saved is not None:
                return
            young, middle, old = self._gc.get_threshold()
            self._saved = young
            self._gc.set_threshold(max(young, self.during), middle, old)
        try:
            self._loop.call_soon_threadsafe(self._arm)
        except RuntimeError:  # the loop is closed: stopping
            self.close()

    def _arm(self) -> None:
        with self._lock:
            if self._timer is None and self._saved is not None:
                self._timer = self._loop.call_at(self._until, self._end)

    def _end(self) -> None:
        with self._lock:
            self._timer = None
            if self._saved is None or self._moved():
                return
        # the one collection, run before the threshold goes back (then no allocation in between
        # starts another); a change begun meanwhile keeps the window open
        self._gc.collect(0)
        with self._lock:
            if self._saved is None or self._moved():
                return
            self._restore()
        self.windows += 1

    def _moved(self) -> bool:
        """A later large change moved the end: wait for it (caller holds the lock)."""
        if self._loop.time() < self._until:
            self._timer = self._loop.call_at(self._until, self._end)
            return True
        return False

    def _restore(self) -> None:  # (caller holds the lock)
        if self._saved is None:
            return
        _young, middle, old = self._gc.get_threshold()
        self._gc.set_threshold(self._saved, middle, old)
        self._saved = None

    def close(self) -> None:
        """Stop: the threshold goes back now, no collection is run (the lifespan ends)."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._restore()
