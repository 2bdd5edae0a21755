"""Young collections put off while a replica answers a large fan-out (:class:`FanoutCollector`).

Why: a global change wakes every poll a replica holds at once (8,300 per replica at 25,000 agents
over three replicas). Each answered agent comes straight back with its next poll, ~63 objects the
garbage collector tracks, and every one of them survives each young collection that runs while the
fan-out is being answered: at 25,000 agents a replica ran 20-25 young collections per global change,
0.7-1 s of pauses inside the fan-out, each one walking the polls already re-held (bench/controller.py,
session 12). A collection triggered by allocations cannot tell a fan-out from garbage piling up.

What: once ``large`` polls were woken within a second, the young generation's threshold is raised
to ``during`` (what may pile up meanwhile stays bounded: past it CPython collects as usual), and
``quiet`` seconds after the last such wake the threshold goes back and one young collection runs
then. The fan-out's survivors are walked once, after the agents have their answers, instead of once
per collection inside it. Reference counting frees a request's garbage either way; only cyclic
garbage waits. Event-loop only.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Protocol

__all__ = ["FANOUT_LARGE", "FANOUT_QUIET", "FANOUT_YOUNG_AFTER", "Collector", "FanoutCollector"]

FANOUT_LARGE = 1_000  # polls woken within a second that make a fan-out large
FANOUT_QUIET = 4.0  # seconds after the last large wake: the fan-out is answered and re-held (25,000: ~3 s)
# net allocations between young collections meanwhile: 8,300 re-held polls of ~63 objects fit twice
FANOUT_YOUNG_AFTER = 1_000_000


class Collector(Protocol):
    """The garbage collector's three calls this uses (``gc``; a fake in tests)."""

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
    """Tell it how many polls each wake answered (:meth:`woke`); it paces the young collections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, large: int = FANOUT_LARGE,
                 quiet: float = FANOUT_QUIET, during: int = FANOUT_YOUNG_AFTER,
                 collector: Collector | None = None) -> None:
        self._loop = loop
        self.large, self.quiet, self.during = large, quiet, during
        self._gc: Collector = collector if collector is not None else _Gc()
        self._recent = 0  # polls woken since _recent_since
        self._recent_since = float("-inf")
        self._until = 0.0  # loop time at which the open window ends (moved on by each large wake)
        self._saved: int | None = None  # the young threshold to restore: a window is open
        self._timer: asyncio.TimerHandle | None = None
        self.windows = 0  # windows closed (each with its one collection): for tests and metrics

    @property
    def open(self) -> bool:
        return self._saved is not None

    def woke(self, polls: int) -> None:
        """``polls`` held polls were just woken (answered on the loop's next turns)."""
        now = self._loop.time()
        if now - self._recent_since > 1.0:
            self._recent, self._recent_since = 0, now
        self._recent += polls
        if self._recent < self.large:
            return
        self._until = now + self.quiet
        if self._saved is None:
            young, middle, old = self._gc.get_threshold()
            self._saved = young
            self._gc.set_threshold(max(young, self.during), middle, old)
            self._timer = self._loop.call_at(self._until, self._end)

    def _end(self) -> None:
        if self._loop.time() < self._until:  # a later large wake moved the end
            self._timer = self._loop.call_at(self._until, self._end)
            return
        self._timer = None
        self._restore()
        self._gc.collect(0)
        self.windows += 1

    def _restore(self) -> None:
        if self._saved is None:
            return
        _young, middle, old = self._gc.get_threshold()
        self._gc.set_threshold(self._saved, middle, old)
        self._saved = None

    def close(self) -> None:
        """Stop: the threshold goes back now, no collection is run (the lifespan ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._restore()
