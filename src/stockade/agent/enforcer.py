"""Keeping one HostPolicy in force through a backend: apply, verify, delta, tamper restore.

The :class:`Enforcer` is the only part of the agent that touches the firewall. It holds the
policy it last put in force and the backend's normalised read-back right after it did so
(the *baseline*). :meth:`Enforcer.check` compares a fresh read-back with the baseline;
any difference (a flushed table, a deleted rule, an extra set element) is tamper: the full
artifact is applied again, atomically, and a :class:`TamperReport` returned.

Every public method takes one lock, so the enforce loop and the tamper watcher never
interleave. Failures leave the previous policy in force (the backend's apply is atomic,
and render fails before anything is touched).
"""

from __future__ import annotations

import contextlib
import difflib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol

from stockade.agent.state import StateDir
from stockade.agent.transport import AgentEvent, EventKind
from stockade.backends.base import (
    ArtifactT,
    Backend,
    BackendControl,
    ChangeFeedSource,
    EventFlows,
    FlowSource,
    NetlinkGroup,
    NetnsBound,
    NflogFlows,
    PeerUpdating,
    Verifying,
    VerifyingReadBack,
    VerifyReport,
    check_delta_capabilities,
)
from stockade.compiler.delta import NO_PEERS, delta_between, peer_delta
from stockade.compiler.ir import HostPolicy, PeerDelta, SetDelta
from stockade.errors import ApplyError, BackendError, StockadeError, ValidationError
from stockade.model.workloads import EnforcementMode
from stockade.verify.prove import Proof, prove
from stockade.verify.readback import read_backend


@dataclass(frozen=True)
class TamperReport:
    """What the watcher found changed, and whether restoring it worked."""

    summary: str  # "table missing" or the first differing lines
    restored: bool
    error: str = ""
    seconds: float = 0.0  # from the start of the check to the verified restore


def summarise_difference(expected: str, actual: str, limit: int = 6) -> str:
    if not actual.strip():
        return "table missing"
    lines = [
        ln
        for ln in difflib.unified_diff(expected.splitlines(), actual.splitlines(), lineterm="", n=0)
        if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
    ]
    shown = "; ".join(ln.strip() for ln in lines[:limit])
    more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
    return f"{len(lines)} line(s) differ: {shown}{more}"


class Rendered(Protocol):
    """A rendered artifact bound to the backend that rendered it (the enforcer never looks inside)."""

    def apply(self) -> None: ...

    def verify(self) -> VerifyReport | None:
        """The backend's structural check of the kernel against this artifact; None: it has none."""
        ...

    def verify_read_back(self) -> tuple[VerifyReport, str] | None:
        """The check and the read-back from one listing; None: the backend can't (call both)."""
        ...


@dataclass(frozen=True)
class _Bound(Generic[ArtifactT]):
    backend: Backend[ArtifactT]
    verifier: Verifying[ArtifactT] | None
    artifact: ArtifactT

    def apply(self) -> None:
        self.backend.apply(self.artifact)

    def verify(self) -> VerifyReport | None:
        return None if self.verifier is None else self.verifier.verify(self.artifact)

    def verify_read_back(self) -> tuple[VerifyReport, str] | None:
        if isinstance(self.backend, VerifyingReadBack):
            both: tuple[VerifyReport, str] = self.backend.verify_read_back(self.artifact)
            return both
        return None


class Enforcer:
    """One backend, one policy in force. Thread-safe.

    The backend's optional capabilities (:mod:`stockade.backends.base`) are looked up here,
    once: a :class:`~stockade.backends.base.Verifying` backend checks every full apply,
    :attr:`flows` says where the agent reads flows, :attr:`change_monitor` is where
    the tamper watcher hears of changes, :attr:`netns` the namespace the backend programs (None: the
    agent's own). The artifact type stays with the backend (:class:`Rendered`).
    """

    def __init__(self, backend: Backend[ArtifactT]) -> None:
        self._bind(backend)
        self._lock = threading.Lock()
        self._policy: HostPolicy | None = None
        self._artifact: Rendered | None = None
        self._baseline: str | None = None  # None: nothing to guard (idle, or nothing applied)

    def _bind(self, backend: Backend[ArtifactT]) -> None:
        """Look the backend's optional capabilities up, once."""
        self.backend: BackendControl = backend
        self._render = _renderer(backend)
        self.verifying = isinstance(backend, Verifying)
        self.flows: NflogFlows | EventFlows | None = (
            backend.flow_source() if isinstance(backend, FlowSource) else None
        )
        self.change_monitor: tuple[str, ...] | NetlinkGroup | None = (
            backend.change_monitor() if isinstance(backend, ChangeFeedSource) else None
        )
        self.netns: str | None = backend.netns if isinstance(backend, NetnsBound) else None

    @property
    def policy(self) -> HostPolicy | None:
        return self._policy

    def switch_backend(self, new: Backend[ArtifactT]) -> None:
        """Move the policy in force to ``new``, make-before-break.

        The new backend's rules are applied and verified (read back) while the old ones still
        hold; only then are the old ones removed. Both enforce the same policy, so during the
        overlap a connection passes exactly when it passes either alone: nothing the policy
        blocks gets through, and established connections keep their state (conntrack; eBPF,
        taking over, records conntrack's connections as flows it re-checks against the policy on
        their next packet: :mod:`stockade.backends.ebpf.takeover`). If the new backend fails, its
        partial state is removed and the old backend stays in force (ApplyError). The agent
        switches at start (``--backend``), before its watchers bind, and at run time when the
        controller's setting changes
        (``Agent.follow_backend``, which rebinds the change feed and the flow reader after).
        """
        with self._lock:
            old = self.backend
            render = _renderer(new)
            artifact: Rendered | None = None
            baseline: str | None = None
            if self._policy is not None and self._policy.mode is not EnforcementMode.IDLE:
                try:
                    artifact = render(self._policy)
                    artifact.apply()
                    baseline = self._verify(artifact, new)
                except BackendError as exc:
                    with contextlib.suppress(BackendError):
                        new.remove()
                    raise ApplyError(f"switching to {new.name}: {exc}; {old.name} stays in force") from exc
            policy = self._policy
            self._bind(new)
            self._policy, self._artifact, self._baseline = policy, artifact, baseline
            try:
                old.remove()  # break only after make
            except BackendError as exc:
                raise ApplyError(f"{new.name} is in force, but removing {old.name}'s rules failed: {exc}") from exc

    @property
    def mode(self) -> EnforcementMode | None:
        return self._policy.mode if self._policy is not None else None

    def _verify(self, artifact: Rendered, backend: BackendControl | None = None) -> str:
        """Read back after an apply; raise ApplyError if the kernel does not hold ``artifact``."""
        both = artifact.verify_read_back()
        report, text = both if both is not None else (artifact.verify(), None)
        if report is not None and not report.ok:
            raise ApplyError(f"read-back differs from what was applied: {'; '.join(report.problems)}")
        if text is None:
            text = (backend or self.backend).read_back()
        if not text.strip():
            raise ApplyError("read-back is empty right after apply")
        return text

    def enforce(self, hp: HostPolicy) -> None:
        """Put ``hp`` in force (idle: remove everything). Raises StockadeError, old policy kept."""
        with self._lock:
            if hp.mode is EnforcementMode.IDLE:
                self.backend.remove()
                self._policy, self._artifact, self._baseline = hp, None, None
                return
            artifact = self._render(hp)  # UnsupportedFeatureError/RenderError: nothing touched
            artifact.apply()
            try:
                baseline = self._verify(artifact)
            except BackendError:
                # Put back what we had, so a half-verified policy is not left guarded by nobody.
                self._restore_previous()
                raise
            self._policy, self._artifact, self._baseline = hp, artifact, baseline

    def _restore_previous(self) -> None:
        if self._artifact is not None:
            with contextlib.suppress(BackendError):
                self._artifact.apply()

    def apply_delta(self, new_hp: HostPolicy, deltas: tuple[SetDelta, ...], peers: PeerDelta = NO_PEERS) -> None:
        """Change set members and WireGuard peers only (no reload). ``new_hp`` is the policy the
        deltas lead to; its artifact is rendered (pure) only as the new verify reference."""
        with self._lock:
            self._apply_delta(new_hp, deltas, peers)

    def enforce_as_delta(self, hp: HostPolicy) -> bool:
        """Put the full policy ``hp`` in force as the set and peer deltas from the policy in force,
        when nothing else differs (what the controller sends a pod whose revision fell behind its
        history: ~8 revisions, under churn). False when more differs (nothing touched) or the delta
        fails (element changes toward ``hp`` may already be in; the baseline and the policy in force
        are not updated): the caller then enforces ``hp`` in full. The same checked delta apply a
        controller's delta gets (netlink acks, read-back as the new baseline)."""
        with self._lock:
            current = self._policy
            deltas = None if current is None else delta_between(current, hp)
            if current is None or deltas is None:
                return False
            try:
                self._apply_delta(hp, deltas, peer_delta(current.wireguard, hp.wireguard))
            except StockadeError:
                return False
            return True

    def _apply_delta(self, new_hp: HostPolicy, deltas: tuple[SetDelta, ...], peers: PeerDelta) -> None:
        if self._policy is None or self._policy.rules_key() != new_hp.rules_key():
            raise ApplyError("set delta does not match the policy in force")
        if new_hp.mode is EnforcementMode.IDLE:
            self._policy = new_hp
            return
        check_delta_capabilities(self.backend.name, self.backend.capabilities, deltas)
        old_wg = self._policy.wireguard
        if peers and (old_wg is None or not isinstance(self.backend, PeerUpdating)):
            raise ApplyError("a peer delta, but no WireGuard tunnel is in force here")
        artifact = self._render(new_hp)
        if deltas:
            self.backend.apply_delta(deltas)
        if peers and old_wg is not None and isinstance(self.backend, PeerUpdating):
            self.backend.apply_peer_delta(old_wg, peers)
        # The backend confirmed each element change (netlink acks); one read-back gives the
        # new tamper baseline. The structural verify is for full applies (it costs 2 listings).
        baseline = self.backend.read_back()
        if not baseline.strip():
            raise ApplyError("read-back is empty right after a set delta")
        self._policy, self._artifact, self._baseline = new_hp, artifact, baseline

    def check(self) -> TamperReport | None:
        """Compare the firewall with the baseline; restore and report if it differs."""
        with self._lock:
            if self._baseline is None or self._artifact is None:
                return None
            started = time.monotonic()
            try:
                current = self.backend.read_back()
            except BackendError as exc:
                return TamperReport(f"read-back failed: {exc}", restored=False, error=str(exc))
            if current == self._baseline:
                return None
            summary = summarise_difference(self._baseline, current)
            try:
                self._artifact.apply()
                self._baseline = self._verify(self._artifact)
            except BackendError as exc:
                return TamperReport(summary, restored=False, error=str(exc), seconds=time.monotonic() - started)
            return TamperReport(summary, restored=True, seconds=time.monotonic() - started)

    def prove(self) -> Proof | None:
        """Prove the policy in force against what the kernel holds, every packet; None when nothing
        is in force or the backend has no read-back the prover models. ProofError when the proof
        cannot be carried out. The read-back is taken under the lock (no apply lands mid-read, so
        policy and ruleset belong together); the proof itself runs outside it, so a long proof
        never delays the next apply."""
        with self._lock:
            if self._policy is None:
                return None
            policy, loaded = self._policy, read_backend(self.backend)
        return None if loaded is None else prove(policy, loaded)

    def remove(self) -> None:
        with self._lock:
            self.backend.remove()
            self._policy, self._artifact, self._baseline = None, None, None


def _renderer(backend: Backend[ArtifactT]) -> Callable[[HostPolicy], Rendered]:
    verifier: Verifying[ArtifactT] | None = backend if isinstance(backend, Verifying) else None

    def render(hp: HostPolicy) -> Rendered:
        return _Bound(backend, verifier, backend.render(hp))

    return render


@dataclass(frozen=True)
class CacheStart:
    """What enforcing the on-disk cache at start-up did: the revision in force (0: none) and
    the event that says so (sent once the agent can talk to the controller)."""

    revision: int
    event: AgentEvent


def enforce_cache(state: StateDir, enforcer: Enforcer, clock: Callable[[], float] = time.time) -> CacheStart:
    """Put the cached policy in force, before anything talks to the network."""
    try:
        cached = state.load_policy()
    except ValidationError as exc:
        return CacheStart(0, AgentEvent(EventKind.CACHE_UNUSABLE, str(exc), None, clock()))
    if cached is None:
        return CacheStart(0, AgentEvent(EventKind.STARTED, "no cached policy", None, clock()))
    try:
        enforcer.enforce(cached.policy)
    except StockadeError as exc:
        return CacheStart(0, AgentEvent(EventKind.APPLY_FAILED, f"cached policy: {exc}", cached.revision, clock()))
    detail = f"enforcing cached revision {cached.revision}"
    return CacheStart(cached.revision, AgentEvent(EventKind.STARTED, detail, cached.revision, clock()))
