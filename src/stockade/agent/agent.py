"""The agent's runtime: enforce the cache, enrol, report the host, follow the controller.

Order of start-up (the cache comes first so a host is never left open while the
controller is away)::

    1. enforce the cached policy (state dir), if any          no network needed
    2. start the tamper watcher (read back every ~0.5 s)      restore + event on change
    3. enrol with the activation code (first run only)        retried with backoff
    4. report the host; watch netlink for address changes
    5. loop: long-poll "revision N ready" -> fetch full/delta -> render, apply, verify
       -> cache -> ack; controller unreachable -> keep enforcing, back off with jitter

Anything wrong with an answer (malformed policy, a feature the backend lacks, a revision
going backwards, a policy for another workload) is refused with an event and the
previous policy stays in force; the refused revision is not asked for again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stockade.agent import wireguard_key
from stockade.agent.apply_gate import ApplyGate, Priority
from stockade.agent.backoff import Backoff, BackoffPolicy
from stockade.agent.enforcer import CacheStart, Enforcer, enforce_cache
from stockade.agent.enrolment import EnrolDeps, enrol_client
from stockade.agent.flows import FlowCollector, collector_for
from stockade.agent.host import HostReport
from stockade.agent.hostinfo import AddressWatcher, read_host
from stockade.agent.outbox import Outbox
from stockade.agent.proving import ProofLoop
from stockade.agent.state import CachedPolicy, Credential, StateDir
from stockade.agent.systemd import notify as notify_systemd
from stockade.agent.transport import (
    AgentEvent,
    ControllerClient,
    ControllerUnreachableError,
    EventKind,
    Heartbeat,
    LongPollAnswer,
    PolicyUpdate,
    UpdateKind,
    poll_timeout,
)
from stockade.agent.watch import ChangeFeed, feed_for
from stockade.backends.base import TunnelReporting
from stockade.backends.wireguard import DEFAULT_PORT as WIREGUARD_PORT
from stockade.compiler.delta import apply_update
from stockade.compiler.ir import HostPolicy
from stockade.errors import (
    AuthError,
    BackendError,
    ConflictError,
    NotFoundError,
    RenderError,
    StockadeError,
    UnsupportedFeatureError,
    ValidationError,
)

if TYPE_CHECKING:
    from stockade.backends.base import Backend

log = logging.getLogger("stockade.agent")

ClientFactory = Callable[[str, "str | None"], ControllerClient]  # (controller URL, CA PEM) -> client
BackendFactory = Callable[[str], "Backend[Any]"]  # backend name -> a fresh backend (StockadeError: unavailable)


@dataclass(frozen=True)
class AgentOptions:
    controller: str | None = None  # needed for the first enrolment; then the credential's URL
    activation_code: str | None = None
    # the long-poll timeout's cap; None: the hold the controller advertises (20 s until it does)
    long_poll_seconds: float | None = None
    tamper_interval: float = 0.5  # read-back period without a live change feed
    tamper_safety_interval: float = 1.0  # read-back period with one (it pokes on every change)
    change_feed: bool = True  # use the backend's change feed (nf_tables' netlink group) when there is one
    heartbeat_seconds: float = 15.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    watch_addresses: bool = True
    proof_interval: float = 300.0  # prove the kernel == policy this often, and after every apply (0: never)
    proof_min_gap: float = 0.0  # at least this long between proofs: applies meanwhile are proven as one
    wireguard_rotate_interval: float = 0.0  # make and register a new WireGuard key this often (0: never)
    wireguard_retry_seconds: float = 30.0  # a key the controller did not take yet: try again this often
    # The backend enforcing when the controller's setting is null (``--backend``); "": the one the
    # enforcer starts with. A workload's ``backend`` setting, when set, wins (docs/migration.md).
    default_backend: str = ""
    available_backends: tuple[str, ...] = ()  # reported in heartbeats: the controller refuses others


class Refused(Exception):
    """Internal: an answer the agent will not enforce (reported as POLICY_REFUSED)."""


class Agent:
    def __init__(
        self,
        options: AgentOptions,
        state: StateDir,
        enforcer: Enforcer,
        client_factory: ClientFactory,
        *,
        host_reader: Callable[[], HostReport] = read_host,
        clock: Callable[[], float] = time.time,
        cache: CacheStart | None = None,
        gate: ApplyGate | None = None,
        backend_factory: BackendFactory | None = None,
        flows: FlowCollector | None = None,
    ) -> None:
        self.options = options
        self.backend_factory = backend_factory
        self.default_backend = options.default_backend or enforcer.backend.name
        self.state = state
        self.enforcer = enforcer
        self.client_factory = client_factory
        self.host_reader = host_reader
        self.clock = clock
        self.applied_revision = 0
        self.refused_revision = 0
        self.tamper_count = 0
        self.credential: Credential | None = None
        self.client: ControllerClient | None = None
        self.outbox = Outbox(self._heartbeat, heartbeat_seconds=options.heartbeat_seconds, backoff=options.backoff)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher: AddressWatcher | None = None
        # flow reporting (backends that are flow sources); a node agent hands its pods' in, started and
        # bound before their first policy went in force (else: made once enrolled)
        self._flows: FlowCollector | None = flows
        self._pending_ack: int | None = None
        self._last_failure: tuple[int, str] | None = None
        self._datapath = ""  # the WireGuard datapath last reported ("": no tunnel)
        self._last_refusal: int | None = None
        self._inline_acks = False  # the controller takes acks on the long-poll (learnt from its answers)
        self._advertised_hold: float | None = None  # the controller's advertised long-poll hold (seconds)
        self._poke = threading.Event()  # wakes the enforce loop: long-poll answered, stop, address change
        self._interrupted = threading.Event()
        self._backoff = Backoff(options.backoff)
        self.enrolled = threading.Event()
        self.converged = threading.Event()  # set after every successful apply (tests wait on it)
        # wall-clock time of the first enrolled / long-poll answered / admitted / policy in hand /
        # applied (the node agent logs them per pod: bench/k8s.py splits a new pod's latency)
        self.milestones: dict[str, float] = {}
        self._feed: ChangeFeed | None = feed_for(enforcer.change_monitor) if options.change_feed else None
        self._tamper_poke = threading.Event()
        self.proofs = ProofLoop(enforcer, self._event, lambda: self.applied_revision, self._stop,
                                interval=options.proof_interval, min_gap=options.proof_min_gap, gate=gate)
        self.keys = wireguard_key.KeyRegistration(
            state.path, self._stop, lambda: self.client, retry_seconds=options.wireguard_retry_seconds,
            rotate_every=options.wireguard_rotate_interval, port=WIREGUARD_PORT)
        self._cache = cache  # the caller may have enforced the cache already (fast start-up)
        self.gate = gate  # shared with the other runtimes of a node agent: first applies go first
        if cache is not None:
            self._adopt_cache(cache)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Enforce the cache now (unless done already), then run everything else in daemon threads."""
        if self._cache is None:
            self.enforce_cache()
            notify_systemd("READY=1")  # the cache is in force (the CLI says so itself, earlier)
        self._spawn(self._tamper_loop, "stockade-tamper")
        self._spawn(self._main, "stockade-enforce")
        if self.options.proof_interval > 0:
            self._spawn(self.proofs.run, "stockade-prove")
        self._spawn(self.keys.run, "stockade-wireguard-key")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads; the rules in force stay in force."""
        self._stop.set()
        self._poke.set()
        self._tamper_poke.set()
        if self._feed is not None:
            self._feed.stop()
        if self._watcher is not None:
            self._watcher.stop()
        if self.client is not None:
            self.outbox.flush(min(timeout, 0.5))
        self.outbox.stop(timeout)
        if self._flows is not None:
            self._flows.stop(timeout)
        if self.client is not None:
            self.client.close()
        deadline = time.monotonic() + timeout  # one budget for all threads, not ``timeout`` each
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def request_stop(self) -> None:
        """Ask the agent to stop (safe from a signal handler); ``wait()`` then returns."""
        self._stop.set()
        self._poke.set()

    def wait(self) -> None:
        """Block until ``stop()`` (for the CLI's foreground run)."""
        while not self._stop.wait(1.0):
            pass

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopping."""
        return self._stop.wait(seconds)

    def _event(self, kind: EventKind, detail: str, revision: int | None = None) -> None:
        log.info("event %s (revision %s): %s", kind.value, revision, detail)
        self.outbox.event(AgentEvent(kind, detail, revision, self.clock()))

    def _heartbeat(self) -> Heartbeat:
        mode = self.enforcer.mode
        return Heartbeat(self.applied_revision, mode.value if mode is not None else "", self.tamper_count,
                         self.enforcer.backend.name, self.options.available_backends)

    # ---- 1. the cache --------------------------------------------------------------------------
    def enforce_cache(self) -> None:
        """Enforce the on-disk cache now (``start()`` does it unless it was done already)."""
        self._cache = enforce_cache(self.state, self.enforcer, self.clock)
        if self._cache.revision:
            self.milestones.setdefault("applied", time.time())
        self._adopt_cache(self._cache)

    def _adopt_cache(self, cache: CacheStart) -> None:
        if cache.revision:
            self.applied_revision = cache.revision
        log.info("event %s (revision %s): %s", cache.event.kind.value, cache.event.revision, cache.event.detail)
        self.outbox.event(cache.event)

    # ---- 2. tamper watcher -----------------------------------------------------------------------
    def _start_feed(self) -> None:
        if self._feed is None:
            return
        try:
            self._feed.start(self._tamper_poke.set)
        except OSError as exc:
            log.warning("change feed unavailable (%s); polling every %.1fs", exc, self.options.tamper_interval)

    def _tamper_loop(self) -> None:
        failing: str | None = None  # the error of a restore that keeps failing
        self._start_feed()
        feed_started = time.monotonic()
        while not self._stop.is_set():
            live = self._feed is not None and self._feed.alive
            interval = self.options.tamper_safety_interval if live else self.options.tamper_interval
            poked = self._tamper_poke.wait(interval)
            self._tamper_poke.clear()
            if self._stop.is_set():
                return
            if poked:
                self._stop.wait(0.01)  # let a burst of changes land before reading back
            if self._feed is not None and not self._feed.alive and time.monotonic() - feed_started > 5.0:
                self._feed.stop()
                self._start_feed()
                feed_started = time.monotonic()
            try:
                report = self.enforcer.check()
            except Exception as exc:  # never let the watcher die
                log.exception("tamper check failed: %s", exc)
                continue
            self._report_datapath(self.applied_revision)  # a cache start or a restore made the tunnel
            if report is None:
                failing = None
                continue
            if not report.restored and report.error == failing:
                continue  # the same failure every interval: reported once
            failing = None if report.restored else report.error
            self.tamper_count += 1
            state = f"restored in {report.seconds * 1000:.0f} ms" if report.restored else \
                f"NOT restored: {report.error}"
            via = "change feed" if poked else "periodic read-back"
            self._event(EventKind.TAMPER, f"{report.summary}; found by {via}; {state}", self.applied_revision)
            self.outbox.heartbeat_now()

    def request_proof(self) -> None:
        """Prove the policy in force soon (the prover's next turn; at most every ``proof_min_gap``)."""
        self.proofs.poke.set()

    def prove_now(self) -> str | None:
        """Prove once and report the outcome when it changed (``ProofLoop.prove_now``)."""
        return self.proofs.prove_now()

    # ---- 3. enrolment ------------------------------------------------------------------------------
    def _enrol(self) -> ControllerClient | None:
        deps = EnrolDeps(self.client_factory, self.host_reader, self.options.backoff, self._stop, self._sleep)
        got = enrol_client(self.state, self.options.controller, self.options.activation_code, deps)
        if got is None:
            return None
        client, self.credential = got
        self.keys.register(client)
        return client

    # ---- 4/5. the main thread ----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            client = self._enrol()
        except AuthError as exc:
            log.error("%s", exc)
            self._event(EventKind.POLICY_REFUSED, f"enrolment refused: {exc}")
            return
        if client is None:
            return
        self.client = client
        self.milestones.setdefault("enrolled", time.time())
        self.enrolled.set()
        if self.applied_revision:
            self._pending_ack = self.applied_revision  # what the cache put in force
        self.outbox.start(client)
        if self._flows is None and self.credential is not None:
            self._flows = collector_for(self.credential, self.state.load_ca(), self.enforcer,
                                        lambda: self.enforcer.policy.local_addresses if self.enforcer.policy else ())
        self._report_host()
        if self.options.watch_addresses:
            self._watcher = AddressWatcher(self.on_address_change, lambda e: log.warning("address watch: %s", e))
            self._watcher.start()
        while not self._stop.is_set():
            try:
                self._step(client)
                self._backoff.reset()
            except ControllerUnreachableError as exc:
                # Re-acknowledge once it is back: a restarted controller may have lost the ack.
                if self.applied_revision and self._pending_ack is None:
                    self._pending_ack = self.applied_revision
                delay = self._backoff.next_delay()
                log.info("controller unreachable (%s); enforcing revision %d, retry in %.2fs",
                         exc, self.applied_revision, delay)
                self._sleep(delay)
            except AuthError as exc:
                delay = self.options.backoff.maximum
                log.error("controller refused our credential (%s); retry in %.1fs", exc, delay)
                self._sleep(delay)
            except Exception as exc:  # a bug must not stop enforcement: log, back off, go on
                log.exception("enforce loop: %s", exc)
                self._sleep(self._backoff.next_delay())

    def on_address_change(self) -> None:
        """Netlink said addresses or links changed: fresh connections, then report the host."""
        log.info("host addresses changed; reporting")
        if self.client is not None:
            self.client.reconnect()
        self._interrupted.set()  # abandon a long-poll that may hang on a vanished address
        self._poke.set()
        self._report_host()

    def _report_host(self) -> None:
        try:
            self.outbox.host(self.host_reader())
        except Exception as exc:
            log.warning("cannot read host interfaces: %s", exc)

    def _step(self, client: ControllerClient) -> None:
        if self._pending_ack is not None:
            client.ack(self._pending_ack)
            self._pending_ack = None
        after = max(self.applied_revision, self.refused_revision)
        answer = self._long_poll(client, after)
        if answer is None:
            return
        self._inline_acks = answer.inline
        self._advertised_hold = answer.hold
        if answer.heartbeat:
            self.outbox.alive()  # the controller took the long-poll as our heartbeat
        self.milestones.setdefault("answered", time.time())
        rev = answer.revision
        if rev == self.applied_revision or rev == self.refused_revision:
            return
        if rev < self.applied_revision:
            self._refuse(rev, f"revision went backwards: controller has {rev}, agent applied {self.applied_revision}")
            return
        self.update(client, rev, answer.update)

    def _long_poll(self, client: ControllerClient, after: int) -> LongPollAnswer | None:
        """``client.wait_revision`` in its own thread, abandoned (None) on stop or address change.

        A long-poll whose connection left from an address the host just lost would wait for
        its read timeout; the enforce loop does not: it starts a new one on fresh connections.
        """
        result: Future[LongPollAnswer] = Future()
        self._poke.clear()
        applied = self.applied_revision or None  # acknowledged on the way (inline controllers)
        timeout = poll_timeout(self.options.long_poll_seconds, self._advertised_hold, random.random())

        def run() -> None:
            try:
                result.set_result(client.wait_revision(after, timeout, applied))
            except BaseException as exc:
                result.set_exception(exc)
            finally:
                self._poke.set()

        threading.Thread(target=run, name="stockade-long-poll", daemon=True).start()
        while not result.done():
            self._poke.wait()
            self._poke.clear()
            if self._stop.is_set() or self._interrupted.is_set():
                self._interrupted.clear()
                return None
        return result.result()

    def update(self, client: ControllerClient, announced: int, prefetched: PolicyUpdate | None = None,
               newer_known: Callable[[], bool] | None = None) -> None:
        """Fetch (unless the long-poll brought it) and apply the controller's policy, then ack.

        ``announced`` is the revision the long-poll announced (named in events when the
        answer is too malformed to carry its own). With a gate (node agents) the work waits for
        its turn: a first policy ahead of every other runtime's delta; a runtime that queued drops
        the update its long-poll brought and fetches from what it has in force, so the revisions
        published while it waited arrive as one delta. ``newer_known`` (a node's poller, which sees
        every revision published for the pod) decides instead: refetch exactly when it says one came
        after ``prefetched`` (queued at the gate or in the poller's pool), else apply ``prefetched``.
        """
        if self.gate is None:
            self._update(client, announced, prefetched)
            return
        first = self.enforcer.policy is None
        with self.gate.admit(Priority.FIRST if first else Priority.DELTA, self._stop) as admitted:
            if admitted is None:
                return  # stopping
            self.milestones.setdefault("admitted", time.time())
            refetch = admitted.queued if newer_known is None else newer_known()
            self._update(client, announced, None if refetch else prefetched)

    def _update(self, client: ControllerClient, announced: int, prefetched: PolicyUpdate | None) -> None:
        since = self.applied_revision if self.enforcer.policy is not None and self.applied_revision else None
        upd = prefetched
        if upd is None:
            try:
                upd = client.fetch_policy(since)
            except ValidationError as exc:
                self._refuse(announced, f"malformed policy: {exc}")
                return
            except NotFoundError:
                return  # nothing compiled for us yet
        self.milestones.setdefault("fetched", time.time())
        try:
            hp = self._resolve(client, upd)
        except Refused as exc:
            self._refuse(upd.revision, str(exc))
            return
        except ValidationError as exc:  # the full policy fetched after an unusable delta
            self._refuse(announced, f"malformed policy: {exc}")
            return
        except NotFoundError:
            return
        if hp is None:
            return
        self.milestones.setdefault("applied", time.time())
        self.state.save_policy(CachedPolicy(upd.revision, hp))
        self.applied_revision = upd.revision
        self.proofs.poke.set()
        self.converged.set()
        if self._inline_acks:
            return  # the next long-poll, sent at once, carries the ack
        try:
            client.ack(upd.revision)
        except ControllerUnreachableError:
            self._pending_ack = upd.revision
            raise

    def _resolve(self, client: ControllerClient, upd: PolicyUpdate) -> HostPolicy | None:
        """Apply ``upd``; the HostPolicy now in force, or None when nothing changed."""
        if upd.revision < self.applied_revision:
            raise Refused(f"revision went backwards: {upd.revision} < applied {self.applied_revision}")
        if upd.kind is UpdateKind.UNCHANGED:
            return None
        if upd.kind is UpdateKind.DELTA:
            try:
                new_hp = apply_update(self.enforcer.policy, self.applied_revision, upd)
            except ConflictError as exc:  # not from what is in force, or does not fit it exactly
                log.info("delta %s -> %d refused (%s); fetching the full policy", upd.base, upd.revision, exc)
                return self._resolve(client, client.fetch_policy(None))
            assert new_hp is not None
            try:
                self.enforcer.apply_delta(new_hp, upd.set_deltas, upd.peer_delta)
            except StockadeError as exc:
                log.info("delta not applied (%s); reloading in full", exc)
                self._enforce_full(new_hp, upd.revision)
            return new_hp
        assert upd.policy is not None
        hp = upd.policy
        if self.credential is not None and hp.workload != self.credential.workload:
            raise Refused(f"policy is for workload {hp.workload!r}, this agent is {self.credential.workload!r}")
        self.follow_backend(hp.backend, upd.revision)
        if not self.enforcer.enforce_as_delta(hp):  # only set members and peers moved: no reload
            self._enforce_full(hp, upd.revision)
        return hp

    # ---- the controller's backend setting ------------------------------------------------------
    def follow_backend(self, wanted: str | None, revision: int | None = None) -> bool:
        """Move what is in force to the backend the controller names (None: ``default_backend``),
        make-before-break; True when a switch happened.

        Precedence: the workload's setting wins when set; the agent's ``--backend`` is the default
        it falls back to. A backend this agent cannot make, or whose apply fails, is refused with a
        ``backend-switch-failed`` event and the old backend stays in force (the policy is the same
        either way: nothing is widened); the next policy with the setting tries again.
        """
        target = wanted or self.default_backend
        current = self.enforcer.backend.name
        if target == current:
            return False
        try:
            if self.backend_factory is None:
                raise BackendError(f"this agent cannot switch backends at run time (wanted {target})")
            new = self.backend_factory(target)
            self.enforcer.switch_backend(new)
        except StockadeError as exc:
            self._event(EventKind.BACKEND_SWITCH_FAILED,
                        f"switch {current} -> {target} refused: {exc}; {current} stays in force", revision)
            self.outbox.heartbeat_now()
            return False
        self.state.save_backend(target)
        self._rebind_watchers()
        self._event(EventKind.BACKEND_SWITCHED, f"{current} -> {target} (make-before-break)", revision)
        self.outbox.heartbeat_now()
        return True

    def _rebind_watchers(self) -> None:
        """The change feed and the flow reader follow the backend now in force."""
        if self._feed is not None:
            self._feed.stop()
        self._feed = feed_for(self.enforcer.change_monitor) if self.options.change_feed else None
        self._start_feed()
        self._tamper_poke.set()
        if self._flows is not None:
            self._flows.stop(1.0)
            self._flows = None
        if self.credential is not None and self.client is not None:
            self._flows = collector_for(self.credential, self.state.load_ca(), self.enforcer,
                                        lambda: self.enforcer.policy.local_addresses if self.enforcer.policy else ())

    def _enforce_full(self, hp: HostPolicy, revision: int) -> None:
        try:
            self.enforcer.enforce(hp)
        except (UnsupportedFeatureError, RenderError) as exc:
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        except BackendError as exc:
            # Possibly transient: report once per (revision, error), let the loop back off and retry.
            if self._last_failure != (revision, str(exc)):
                self._last_failure = (revision, str(exc))
                self._event(EventKind.APPLY_FAILED, str(exc), revision)
            raise
        self._report_datapath(revision)

    def _report_datapath(self, revision: int | None) -> None:
        """One event when the WireGuard tunnel comes up on (or moves to) a datapath:
        "WireGuard datapath: kernel" or "... wireguard-go"."""
        backend = self.enforcer.backend
        datapath = backend.wireguard_datapath() if isinstance(backend, TunnelReporting) else ""
        if datapath and datapath != self._datapath:
            self._event(EventKind.WIREGUARD_DATAPATH, f"WireGuard datapath: {datapath}", revision)
        self._datapath = datapath

    def _refuse(self, revision: int, detail: str) -> None:
        """Report once per revision; long-poll past it so it is not fetched again."""
        if revision != self._last_refusal:
            self._last_refusal = revision
            self._event(EventKind.POLICY_REFUSED, detail, revision)
        if revision > self.applied_revision:
            self.refused_revision = revision
        log.warning("refused revision %d: %s (still enforcing %d)", revision, detail, self.applied_revision)
