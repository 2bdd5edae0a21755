"""The agent's proof loop: prove that the kernel gives every packet the policy's verdict.

The loop proves after every apply (the agent pokes it) and every ``interval`` seconds, and
reports a state change as an event: "proven at revision N", the counterexample when the kernel
differs, or why the proof could not be made. On a node agent the proofs of all pod runtimes
pass through the shared apply gate at the lowest priority, so they never hold up a new pod's
first apply.

After a proof the loop asks for a full garbage collection (a proof's BDD manager is C memory
freed only with its last node, and nodes sit in reference cycles). One full collection walks the
whole process heap: in a node agent with 110 pod runtimes (600 MiB of heap) each took a large
fraction of a second, and 110 proofs after a start-up asked for 110 of them, which held the GIL
and kept the node agent at most of a core for tens of seconds after its pods were programmed.
:class:`Collections` runs them at most once per ``gap`` seconds per process: one collection
frees the garbage of every proof that finished before it, and a proof that finished after the
last one is always followed by another within ``gap``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable

from stockade.agent import heap, libc_malloc
from stockade.agent.apply_gate import ApplyGate, Priority
from stockade.agent.enforcer import Enforcer
from stockade.agent.transport import EventKind
from stockade.errors import StockadeError

log = logging.getLogger("stockade.agent")

Report = Callable[[EventKind, str, "int | None"], None]  # (kind, detail, revision) -> an agent event
COLLECT_GAP = 2.0  # full collections after proofs: at most one per this many seconds per process


def collect_and_trim() -> None:
    """A full collection, then glibc gives the freed pages back (``malloc_trim``).

    A proof's BDD manager (CUDD) is C memory in the malloc arena of the thread that proved; freed, it
    stays in that arena (glibc returns only an arena's top). A node agent proves on many threads: at
    110 pods 15 arenas held 516 of its 620 MiB. ``malloc_trim`` returns every
    arena's free pages (a few ms; with the collections coalesced, bench/k8s.py at 110 pods: 668-683
    -> 519-568 MiB at rest). In a process that keeps its long-lived heap frozen
    (:mod:`stockade.agent.heap`: the node agent) the collection walks only what is not frozen,
    unless a deep one is due."""
    frozen = heap.installed()
    if frozen is not None:
        frozen.begin()
    gc.collect()
    if frozen is not None:
        frozen.end()
    libc_malloc.trim()


def deep_collection_when_quiet(starting: bool) -> bool:
    """The frozen heap's deep collection (:mod:`stockade.agent.heap`), run now when it is due and
    nothing is ``starting`` (True: it ran). The node agent calls it at every reconcile pass: left to
    the collections after proofs, the deep one (150-420 ms at 110 pods) often found a pod starting
    under steady churn and, once overdue, ran anyway with new pods waiting through it."""
    frozen = heap.installed()
    if starting or frozen is None or not frozen.due():
        return False
    collect_and_trim()  # thaws (quiet: nothing starting), walks everything, freezes again
    return True


class Collections:
    """Full garbage collections asked for by proofs, run at most once per ``gap`` seconds.

    :meth:`request` collects at once when the last collection is ``gap`` old, else marks one as
    due and a single background thread runs it when the gap has passed (so the garbage of the last
    proof of a burst is freed too, at most ``gap`` later)."""

    def __init__(self, gap: float = COLLECT_GAP, collect: Callable[[], object] = collect_and_trim,
                 clock: Callable[[], float] = time.monotonic, background: bool = True) -> None:
        self.gap = gap
        self._background = background  # False (tests): a due collection runs only at run_due()
        self._collect = collect
        self._clock = clock
        self._lock = threading.Lock()
        self._last = float("-inf")  # clock() when the last collection began
        self._due = False  # a request came since the last collection began
        self._thread: threading.Thread | None = None
        self.runs = 0

    def request(self) -> None:
        with self._lock:
            now = self._clock() - self._last >= self.gap and not self._due
            if now:
                self._begin()
            else:
                self._due = True
                if self._thread is None and self._background:
                    self._thread = threading.Thread(target=self._later, name="stockade-gc", daemon=True)
                    self._thread.start()
        if now:
            self._collect()

    @property
    def due(self) -> bool:
        with self._lock:
            return self._due

    def _begin(self) -> None:
        self._last = self._clock()
        self._due = False
        self.runs += 1

    def run_due(self) -> float:
        """Run the collection that is due once the gap has passed; the seconds it must still wait
        (0: run now, or nothing due)."""
        with self._lock:
            if not self._due:
                return 0.0
            wait = self._last + self.gap - self._clock()
            if wait > 0:
                return wait
            self._begin()
        self._collect()
        return 0.0

    def _later(self) -> None:
        while True:
            wait = self.run_due()
            with self._lock:
                if wait <= 0 and not self._due:
                    self._thread = None
                    return
            time.sleep(max(wait, 0.01))


COLLECTIONS = Collections()  # the process's: every proof loop of a node agent shares it


class ProofLoop:
    """Proves on demand (``poke``) and periodically; reports each new outcome once."""

    def __init__(self, enforcer: Enforcer, report: Report, revision: Callable[[], int], stop: threading.Event, *,
                 interval: float, min_gap: float = 0.0, gate: ApplyGate | None = None,
                 collections: Collections = COLLECTIONS) -> None:
        self.enforcer = enforcer
        self.report = report
        self.revision = revision
        self.stop = stop
        self.interval = interval
        self.min_gap = min_gap
        self.gate = gate
        self.collections = collections
        self.proving = False  # a turn (in the gate, proving) under way
        self.poke = threading.Event()
        self._last: tuple[str, int, str] | None = None  # (state, revision, detail) last reported

    def run(self) -> None:
        while not self.stop.is_set():
            self.poke.wait(self.interval)
            if self.stop.is_set():
                return
            self.turn()
            if self.min_gap > 0 and self.stop.wait(self.min_gap):
                return  # applies during the gap left the poke set: the newest revision is proven next

    def turn(self) -> None:
        """One proof (through the gate, if any), then a full collection asked for."""
        self.proving = True
        self.poke.clear()
        try:
            if self.gate is None:
                self.prove_now()
            else:
                with self.gate.admit(Priority.PROOF, self.stop) as admitted:
                    if admitted is not None:
                        self.prove_now()
        except Exception as exc:  # never let the prover thread die
            log.exception("proof failed: %s", exc)
        finally:
            # a proof's BDD manager (CUDD, C memory) is freed only with its last node, and nodes
            # can sit in reference cycles until a full collection: one follows every proof (an
            # agent proving after every apply otherwise grew by hundreds of MiB), coalesced across
            # the process's proof loops (see Collections)
            self.collections.request()
            self.proving = False

    @property
    def pending(self) -> bool:
        """A proof asked for (an apply since the last one) or under way."""
        return self.proving or self.poke.is_set()

    def prove_now(self) -> str | None:
        """Prove once; report "proven at revision N" or the counterexample when it changed.
        Returns the state (proven / differs / failed), None when there is nothing to prove."""
        revision = self.revision()
        try:
            proof = self.enforcer.prove()
        except StockadeError as exc:
            self._report("failed", revision, str(exc), EventKind.PROOF_FAILED)
            return "failed"
        if proof is None:
            return None
        if proof.proven:
            detail = f"proven at revision {revision}: {proof.classes} address classes in {proof.seconds * 1000:.0f} ms"
            self._report("proven", revision, detail, EventKind.PROVEN)
            return "proven"
        self._report("differs", revision, "; ".join(str(d) for d in proof.differences), EventKind.PROOF_DIFFERS)
        return "differs"

    def _report(self, state: str, revision: int, detail: str, kind: EventKind) -> None:
        key = (state, revision, detail if state != "proven" else "")
        if key != self._last:
            self._last = key
            self.report(kind, detail[:2000], revision)
