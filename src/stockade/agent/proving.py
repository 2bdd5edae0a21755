"""The agent's proof loop: prove that the kernel gives every packet the policy's verdict.

The loop proves after every apply (the agent pokes it) and every ``interval`` seconds, and
reports a state change as an event: "proven at revision N", the counterexample when the kernel
differs, or why the proof could not be made. On a node agent the proofs of all pod runtimes
pass through the shared apply gate at the lowest priority, so they never hold up a new pod's
first apply.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable

from stockade.agent.apply_gate import ApplyGate, Priority
from stockade.agent.enforcer import Enforcer
from stockade.agent.transport import EventKind
from stockade.errors import StockadeError

log = logging.getLogger("stockade.agent")

Report = Callable[[EventKind, str, "int | None"], None]  # (kind, detail, revision) -> an agent event


class ProofLoop:
    """Proves on demand (``poke``) and periodically; reports each new outcome once."""

    def __init__(self, enforcer: Enforcer, report: Report, revision: Callable[[], int], stop: threading.Event, *,
                 interval: float, min_gap: float = 0.0, gate: ApplyGate | None = None) -> None:
        self.enforcer = enforcer
        self.report = report
        self.revision = revision
        self.stop = stop
        self.interval = interval
        self.min_gap = min_gap
        self.gate = gate
        self.poke = threading.Event()
        self._last: tuple[str, int, str] | None = None  # (state, revision, detail) last reported

    def run(self) -> None:
        while not self.stop.is_set():
            self.poke.wait(self.interval)
            self.poke.clear()
            if self.stop.is_set():
                return
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
                # can sit in reference cycles until a full collection: collect now, not at some later
                # threshold (an agent proving after every apply otherwise grew by hundreds of MiB)
                gc.collect()
            if self.min_gap > 0 and self.stop.wait(self.min_gap):
                return  # applies during the gap left the poke set: the newest revision is proven next

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
