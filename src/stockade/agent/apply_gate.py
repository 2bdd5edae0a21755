"""One admission gate for the applies of many agent runtimes sharing a process (the Kubernetes node agent).

A node agent runs one agent runtime per pod (issue 15). When a pod comes or goes, about half the
other pods' peer sets change, and at 110 pods every churn second asked for a few hundred set-delta
applies, read-backs and proofs at once, all in one process on one node's cores. A new pod's first
apply queued behind them (6.5 s p50 from its IP in the API to its table in force). Those pods were
already protected by the sets in force: a late delta only delays a new peer's *allow* (or keeps a
gone peer's address a little longer, which the address's new owner, a pod, cannot use before its
own first apply either); a new pod waits at default-deny (the CNI's table) until its first apply.
So the gate gives the work three classes and admits them in this order:

* ``FIRST``  a runtime's first policy (nothing of its own in force yet): admitted whenever fewer
  than ``first_slots`` first applies are running, never behind a delta or a proof;
* ``DELTA``  any later update of a runtime already enforcing: admitted only while no first apply
  is waiting or running, at most ``slots`` at once, oldest first;
* ``PROOF``  a background proof (kernel == policy): after every waiting delta.

A node agent also *holds* the gate while it starts a pod (finds and pins its namespace, obtains its
credential, starts its runtime, until the first apply): deltas and proofs wait then too, so the new
pod has the node's cores. A pod whose policy is in hand but whose sandbox is not there yet holds the
gate too, for a bounded time (:meth:`ApplyGate.hold_for`): its sandbox may appear at any moment, and
the start must not find the node busy with deltas admitted just before (the start's own hold keeps
only *new* admissions back); a delta waits for such holds at most ``timed_defer`` (0.25 s: under
heavy load pods' waits for their sandboxes overlap, and deltas then waited the whole ``max_defer``).
No work starves: a delta or proof that has waited ``max_defer`` seconds enters despite first applies
and holds (still within ``slots``), so no hold lengthens the longest wait of a delta.

A runtime that had to queue drops the update its long-poll brought and fetches from what it has in
force when admitted, so every revision published while it waited is applied as one step (one
netlink batch, one read-back, one acknowledgement): deltas coalesce per runtime instead of queueing
one apply per revision. Nothing here changes what is enforced, only when; the tamper read-back is
not gated (restoring a tampered table is never delayed).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

STOP_RECHECK = 0.25  # a queued runtime notices its stop this soon


class Priority(IntEnum):
    FIRST = 0
    DELTA = 1
    PROOF = 2


@dataclass(frozen=True)
class Admission:
    """What a caller learns when admitted: whether it had to queue, and for how long."""

    priority: Priority
    queued: bool
    waited: float


@dataclass
class GateStats:
    admitted: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(Priority, 0))
    queued: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(Priority, 0))
    order: list[Priority] = field(default_factory=list)  # the last admissions, oldest first (tests)
    delta_waits: list[float] = field(default_factory=list)  # seconds each delta waited (take_delta_waits)


class ApplyGate:
    """Priority admission of applies and proofs across agent runtimes (see the module docstring)."""

    ORDER_KEPT = 1000

    def __init__(self, slots: int = 2, first_slots: int = 8, max_defer: float = 1.0, timed_defer: float = 0.25) -> None:
        if slots < 1 or first_slots < 1:
            raise ValueError("an apply gate needs at least one slot of each kind")
        self.slots = slots
        self.first_slots = first_slots
        self.max_defer = max_defer
        self.timed_defer = min(timed_defer, max_defer)  # the longest a delta waits for timed holds alone
        self._holds = 0  # pods being started (see begin_hold())
        self._timed: dict[str, float] = {}  # key -> monotonic end of its hold (see hold_for())
        self._since: dict[tuple[int, int], float] = {}  # ticket -> when it began to wait
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wakers: dict[tuple[int, int], threading.Condition] = {}  # ticket -> its waiter's (on _cond's lock)
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, arrival)
        self._seq = itertools.count()
        self._firsts = 0  # first applies running
        self._background = 0  # deltas and proofs running
        self.stats = GateStats()
        self._waits_taken = time.monotonic()  # the last take_delta_waits that took

    def waiting(self) -> int:
        """How many are queued now."""
        with self._cond:
            return len(self._waiting)

    def idle(self) -> bool:
        """Nothing queued, running or held."""
        with self._cond:
            return (not self._waiting and not self._firsts and not self._background and not self._holds
                    and not self._timed_held(time.monotonic()))

    def _timed_held(self, now: float) -> bool:
        """Any timed hold still running (expired ones forgotten); called with the lock held."""
        for key in [k for k, end in self._timed.items() if end <= now]:
            del self._timed[key]
        return bool(self._timed)

    def _may_enter(self, ticket: tuple[int, int]) -> bool:
        if self._waiting[0] != ticket:
            return False  # a higher class, or an older ticket of the same one, goes first
        if ticket[0] == Priority.FIRST:
            return self._firsts < self.first_slots
        if self._background >= self.slots:
            return False
        now = time.monotonic()
        defer = self._defer(now)
        return defer is None or now - self._since[ticket] >= defer

    def _defer(self, now: float) -> float | None:
        """How long a delta or proof may be kept back now: ``max_defer`` while a first apply runs or a
        start holds the gate, ``timed_defer`` while only timed holds do (None: nothing holds it back)."""
        if self._firsts > 0 or self._holds > 0:
            return self.max_defer
        return self.timed_defer if self._timed_held(now) else None

    def _wake_head(self) -> None:
        """Wake the head ticket's waiter, the only one that may enter (``_may_enter``); called with the
        lock held after every change that may let it in. Waking every waiter instead (``notify_all``)
        cost ~100 GIL hand-offs per admission under churn: each of 110 pods' queued deltas and proofs
        woke, found it was not the head and slept again, 220 deltas a second, and a new pod's
        namespace was noticed late (py-spy: ~20 % of the GIL-holding samples in the waits)."""
        if self._waiting:
            waker = self._wakers.get(self._waiting[0])
            if waker is not None:
                waker.notify()

    def _recheck(self, ticket: tuple[int, int], stop: threading.Event | None) -> float | None:
        """How long a waiting ticket sleeps before it looks again without being notified (every
        exit, admission and end of a hold notifies): the head delta or proof until its ``max_defer``
        runs out; any other only to notice ``stop`` (a quarter second). It was 50 ms for all: 110
        pods' proofs queued after a node agent's start-up woke 2,200 times a second."""
        after = STOP_RECHECK if stop is not None else None
        if ticket[0] != Priority.FIRST and self._waiting[0] == ticket:
            now = time.monotonic()
            left = self._since[ticket] + (self._defer(now) or self.max_defer) - now
            if self._timed_held(now):  # a timed hold ends without a notification: look again then (expired
                # ones forgotten first: one left behind would wake the head every millisecond)
                left = min(left, max(0.0, min(self._timed.values()) - now) + 0.001)
            if left > 0:  # past it, only a busy slot keeps it out: its exit notifies
                return left if after is None else min(left, after)
        return after

    def take_delta_waits(self, every: float = 0.0) -> str:
        """How long the deltas admitted since the last take waited: ``<n> deltas, p50 <ms> / p99 <ms> /
        max <ms> ms`` ("" for none, or when the last take is less than ``every`` seconds old). A node
        agent logs it: what starts and holds cost the other pods' peer-set deltas."""
        now = time.monotonic()
        with self._cond:
            if now - self._waits_taken < every:
                return ""
            self._waits_taken = now
            waits, self.stats.delta_waits = sorted(self.stats.delta_waits), []
        if not waits:
            return ""
        p50, p99 = (waits[min(len(waits) - 1, len(waits) * q // 100)] * 1000 for q in (50, 99))
        return f"{len(waits)} deltas, p50 {p50:.1f} / p99 {p99:.1f} / max {waits[-1] * 1000:.1f} ms"

    def begin_hold(self) -> None:
        """Keep deltas and proofs back (each up to ``max_defer``) until :meth:`end_hold`: a pod is
        starting. Begin and end may be called from different threads."""
        with self._cond:
            self._holds += 1

    def end_hold(self) -> None:
        with self._cond:
            self._holds -= 1
            self._wake_head()

    def hold_for(self, key: str, seconds: float) -> None:
        """Keep deltas and proofs back (each up to ``timed_defer``: 0.25 s) while ``key`` (a pod
        awaiting its sandbox) may start, until :meth:`release` of ``key`` or ``seconds`` from now,
        whichever comes first. A second call for a key held already does not extend its hold."""
        with self._cond:
            self._timed.setdefault(key, time.monotonic() + seconds)

    def release(self, key: str) -> None:
        """End ``key``'s timed hold (nothing when it has none or it ran out)."""
        with self._cond:
            if self._timed.pop(key, None) is not None:
                self._wake_head()

    @contextmanager
    def admit(self, priority: Priority, stop: threading.Event | None = None) -> Iterator[Admission | None]:
        """Hold a place of ``priority`` for the ``with`` block; None (nothing held) when ``stop`` is set
        while waiting, so a stopping runtime never blocks in the queue."""
        started = time.monotonic()
        ticket = (int(priority), next(self._seq))
        queued = admitted = False
        with self._cond:
            heapq.heappush(self._waiting, ticket)
            self._since[ticket] = started
            waker = self._wakers[ticket] = threading.Condition(self._lock)  # same lock: woken alone
            while not self._may_enter(ticket):
                queued = True
                if stop is not None and stop.is_set():
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                    del self._since[ticket], self._wakers[ticket]
                    self._wake_head()
                    break
                waker.wait(self._recheck(ticket, stop))
            else:
                heapq.heappop(self._waiting)
                del self._since[ticket], self._wakers[ticket]
                if priority is Priority.FIRST:
                    self._firsts += 1
                else:
                    self._background += 1
                self.stats.admitted[priority] += 1
                self.stats.queued[priority] += queued
                self.stats.order.append(priority)
                del self.stats.order[: -self.ORDER_KEPT]
                if priority is Priority.DELTA and len(self.stats.delta_waits) < self.ORDER_KEPT * 10:
                    self.stats.delta_waits.append(time.monotonic() - started)
                self._wake_head()  # the next ticket may enter too (another free slot)
                admitted = True
        if not admitted:
            yield None
            return
        try:
            yield Admission(priority, queued, time.monotonic() - started)
        finally:
            with self._cond:
                if priority is Priority.FIRST:
                    self._firsts -= 1
                else:
                    self._background -= 1
                self._wake_head()
