"""The Kubernetes node agent (issue 15): one process per node enforcing every local pod inside its namespace.

``stockade k8s node-agent --node NAME ...`` (a DaemonSet pod: hostNetwork, hostPID, NET_ADMIN +
SYS_ADMIN) runs:

* **the node's own host policy**: an ordinary :class:`~stockade.agent.agent.Agent` in the node's
  namespace, enrolled as the workload named after the node (``--no-host-policy`` enrols the same
  identity but leaves the node's firewall alone);
* **one agent identity per local pod**: the node agent watches the pods bound to its node
  (``fieldSelector=spec.nodeName=NAME``, the sync's :class:`~stockade.k8s.reflector.Reflector`),
  finds each pod's network namespace from its UID (:mod:`stockade.k8s.podns`: cgroup + procfs),
  pins it as ``stk-<node hash>-<uid>``, obtains the pod's credential from the controller with its own node
  credential (``POST /agents/{id}/pods/enroll``: allowed only for pods the sync bound to this
  node, see :mod:`stockade.controller.services.pod_enrolment`) and runs an ordinary
  :class:`~stockade.agent.agent.Agent` for the pod whose backend programs *that* namespace.
  Every pod so has its own policy revision, acknowledgement, tamper watch, events and flows,
  exactly like a host; deltas of pod churn reach each pod as set deltas.

A new pod is protected before its first connection by :mod:`stockade.k8s.cni`: a chained CNI
plugin installs a default-deny table in the sandbox's namespace while the sandbox is being
created (before any container starts); the pod agent's first apply replaces it atomically with
the pod's policy. kube-proxy's and the CNI's tables are never touched: the backend owns only its
``inet stockade`` table, in the pod's namespace (and the node's, for the host policy).

The pod agents share one :class:`~stockade.agent.apply_gate.ApplyGate`: a new pod's first apply
(and its start, and its wait for its sandbox) goes ahead of the pods' peer-set deltas, and a pod
whose deltas queued applies every revision published meanwhile as one step. Each pod's tamper
watch is woken by a change feed in its namespace (:class:`~stockade.agent.watch.NetlinkFeed`);
its safety read-back runs every ``pod_tamper_interval`` seconds (default 10).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from stockade.agent import heap, libc_malloc
from stockade.agent.agent import Agent, AgentOptions
from stockade.agent.apply_gate import ApplyGate
from stockade.agent.enforcer import CacheStart, Enforcer
from stockade.agent.flows import FlowCollector, FlowReader, collector_for, open_reader_early
from stockade.agent.host import HostReport, InterfaceReport
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.proving import COLLECTIONS, deep_collection_when_quiet
from stockade.agent.state import CachedPolicy, Credential, StateDir
from stockade.agent.transport import AgentEvent, EventKind
from stockade.agent_signature import public_key_text
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.netlink_apply import NetlinkTableBackend, TemplateCache
from stockade.compiler.delta import PolicyUpdate, UpdateKind
from stockade.errors import NotFoundError, StockadeError
from stockade.k8s.node_poll import (
    POD_HEARTBEAT_SECONDS,
    NodeControllerClient,
    NodePoller,
    PodAgent,
    PodEnroller,
    PodRuntime,
    enrol_node_bare,
)
from stockade.k8s.node_types import LocalPod, NodeOptions, NodeStats
from stockade.k8s.podns import NamespaceIndex, PodNetns, pin, pin_prefix, stale_pins, unpin

log = logging.getLogger("stockade.k8s.node")
RETRY_SECONDS = 0.1  # a pod whose workload or namespace is not there yet is tried again this soon ...
RETRY_MAX = 5.0  # ... doubling up to this while it keeps failing
FAST_RETRY, FAST_RETRY_FOR = 0.05, 5.0  # but a pod seen less than FAST_RETRY_FOR ago: every FAST_RETRY
NS_POLL, NS_POLL_LATE = 0.01, 0.25  # an enrolled pod's namespace is looked for this often (after FAST_RETRY_FOR: late)
FIRST_FRESH = 5.0  # an enrolment's policy kept longer than this for a namespace not found yet is not applied
START_WORKERS = 8  # pods started (and stopped) at once
SETTLE_CHECK = 1.0  # with nothing to start but proofs or applies under way: look whether settled this often
MALLOC_ARENAS = 2  # glibc malloc arenas shared by the node agent's ~8 threads per pod
PINS_CHECK = 1.0  # pins left by an earlier run looked for at most this often (not at every 10 ms pass)
HOLD_SECONDS = 10.0  # a starting pod keeps other pods' deltas back (each at most the gate's max_defer) this long
AWAIT_HOLD = 1.0  # a pod awaiting its sandbox (policy in hand) keeps them back too, at most this long
GATE_LOG = 5.0  # the pods' deltas' waits in the apply gate are logged this often (when there were any)


BackendFactory = Callable[[str | None], NftablesBackend]  # pinned netns name (None: the node's) -> backend


@dataclass
class _Running:
    pod: LocalPod
    netns: str
    agent: Agent
    backend: NftablesBackend
    started: float  # monotonic: when the node agent started on it (for timing)


class NodeAgent:
    def __init__(self, options: NodeOptions, *, backend_factory: BackendFactory | None = None,
                 finder: Callable[[str], PodNetns | None] | None = None) -> None:
        self.options = options
        self.templates = TemplateCache()  # pods' table shapes, for applies with no nft process
        self._backend_factory = backend_factory or self._default_backend
        self._finder = finder or NamespaceIndex().find
        self._desired: dict[str, LocalPod] = {}
        self._running: dict[str, _Running] = {}
        self._host_network: set[str] = set()
        self._retry: dict[str, tuple[float, float]] = {}  # uid -> (next attempt, delay) of a failing pod
        self._pool = ThreadPoolExecutor(max_workers=START_WORKERS, thread_name_prefix="stockade-pod")
        self._starting: dict[str, Future[bool]] = {}  # uid -> its start under way
        self._first: dict[str, tuple[PolicyUpdate, float]] = {}  # uid -> (policy, monotonic when) its enrolment
        self._awaiting: set[str] = set()  # enrolled, policy in hand, namespace not found yet: looked for
        # by the reconcile loop every NS_POLL (a cheap incremental scan), started the moment it is found
        self._addressed: set[str] = set()  # pods whose IP just appeared: their sandbox exists, look again now
        self._early: dict[str, tuple[PodNetns, str] | None] = {}  # uid -> namespace found and pinned on the
        # pod's first attempt, while its enrolment may still wait for the controller's commit (None: not found)
        self._stopping: dict[str, threading.Thread] = {}
        self.pin_prefix = pin_prefix(options.node)
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._born = time.monotonic()
        self._pins_checked = float("-inf")  # monotonic: the last look for pins of pods that are gone
        self._pending = True  # the last reconcile pass left a wanted pod not started (or a start under way)
        self.host_agent: Agent | None = None
        self.client: NodeControllerClient | None = None
        self.credential: Credential | None = None
        self.stats = NodeStats()
        self.gate = ApplyGate(slots=options.apply_slots, first_slots=START_WORKERS)  # shared by the pod agents
        self.state = StateDir(options.state_dir / "node")
        self.poller: NodePoller | None = None  # with node_poll: follows every pod (after the node enrols)
        self.enroller: PodEnroller | None = None

    def _default_backend(self, netns: str | None) -> NftablesBackend:
        if netns is None or not self.options.pod_netlink:
            return NftablesBackend(self.options.table, netns=netns)
        return NetlinkTableBackend(self.options.table, netns=netns, templates=self.templates)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        libc_malloc.limit_arenas(MALLOC_ARENAS)
        if self.options.frozen_heap:  # the deep collections wait while a new pod waits (stockade.agent.heap)
            heap.install(heap.FrozenHeap(quiet=lambda: not self._pending))
            heap.log_long_pauses()  # before the pods' threads (see stockade.agent.libc_malloc)
        self._thread = threading.Thread(target=self._run, name="stockade-node", daemon=True)
        self._thread.start()

    def stop(self, remove_pod_rules: bool = False) -> None:
        """Stop every agent; the rules in force stay (pods stay protected) unless ``remove_pod_rules``."""
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            running = list(self._running)
        for uid in running:
            self._stop_pod(uid, forget=remove_pod_rules, wait=True)
        self._pool.shutdown(wait=True)
        with self._lock:
            late = list(self._running)  # started while we were stopping
        for uid in late:
            self._stop_pod(uid, forget=remove_pod_rules, wait=True)
        for t in list(self._stopping.values()):
            t.join(5)
        if self.poller is not None:
            self.poller.stop()
        if self.enroller is not None:
            self.enroller.stop()
        if self.host_agent is not None:
            self.host_agent.stop()
        if self.client is not None:
            self.client.close()
        self.templates.close()

    def set_pods(self, pods: Mapping[str, LocalPod]) -> None:
        """The complete set of pods bound to this node, as the API says now."""
        now = time.time()
        with self._lock:
            before, self._desired = self._desired, dict(pods)
            for uid in [u for u in self.stats.stages if u not in pods]:
                del self.stats.stages[uid]
            for uid, p in pods.items():
                if p.ready:
                    self.stats.stages.setdefault(uid, {}).setdefault("seen", now)
                if p.addresses:
                    self.stats.stages.setdefault(uid, {}).setdefault("ip", now)
                    old = before.get(uid)
                    if old is None or not old.addresses:
                        self._addressed.add(uid)
        self._poke.set()

    def enforced(self) -> dict[str, str]:
        """uid -> pinned netns of the pods being enforced."""
        with self._lock:
            return {uid: r.netns for uid, r in self._running.items()}

    def pod_agent(self, uid: str) -> Agent | None:
        with self._lock:
            r = self._running.get(uid)
        return r.agent if r is not None else None

    # ---- the node's identity -------------------------------------------------------------------------
    def _enrol_node(self) -> NodeControllerClient | None:
        o = self.options
        report = HostReport(o.node, "linux", ())
        if o.host_policy:
            from stockade.agent.hostinfo import read_host

            def host_reader() -> HostReport:
                return HostReport(o.node, read_host().os, read_host().interfaces)

            enforcer = Enforcer(self._backend_factory(None))
            self.host_agent = Agent(AgentOptions(controller=o.controller, activation_code=o.activation_code,
                                                 long_poll_seconds=o.long_poll_seconds,
                                                 tamper_interval=o.host_tamper_interval),
                                    self.state, enforcer, HttpControllerClient, host_reader=host_reader)
            self.host_agent.start()
            while not self.host_agent.enrolled.wait(0.2):
                if self._stop.is_set():
                    return None
            cred = self.host_agent.credential
        else:
            cred = self.state.load_credential()
            if cred is None:
                cred = enrol_node_bare(o, self.state, report, self._stop)
        if cred is None:
            return None
        client = NodeControllerClient(cred.controller, self.state.load_ca())
        client.use_credential(cred, self.state.load_ca())
        self.credential = cred
        log.info("node %s: agent %s (workload %s)", o.node, cred.agent_id, cred.workload)
        return client

    # ---- reconcile ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.client = self._enrol_node()
        except StockadeError as exc:
            log.error("node agent cannot enrol: %s", exc)
            return
        if self.client is None:
            return
        if self.options.node_poll:
            self.enroller = PodEnroller(self.client)
            self.poller = NodePoller(self.client, long_poll_seconds=self.options.long_poll_seconds,
                                     workers=max(2, self.options.apply_slots * 2))
            self.poller.start()
        settled = False
        while not self._stop.is_set():
            self._poke.clear()
            pending = self._pending = self._reconcile()
            deep_collection_when_quiet(pending)  # not left to a proof's collection, which may find a pod starting
            if waits := self.gate.take_delta_waits(every=GATE_LOG):  # what starts and holds cost (bench/k8s.py)
                log.info("gate waits at %.3f: %s", time.time(), waits)
            was, settled = settled, not pending and self.settled()
            if settled and not was:
                log.info("node agent settled: %d pods enforced, no start, apply or proof pending (%.1f s after "
                         "start)", len(self.enforced()), time.monotonic() - self._born)
            self._poke.wait(self._wait_seconds(pending) if settled or pending else SETTLE_CHECK)

    def settled(self) -> bool:
        """Every wanted pod started and nothing of theirs under way: no start, nothing queued, running or
        held in the apply gate, no pod's proof asked for or running, no collection due (bench/k8s.py
        measures "at rest" from here: until then the start-up's proofs are still running)."""
        with self._lock:
            agents = [r.agent for r in self._running.values()]
        return (not self._starting and self.gate.idle() and not COLLECTIONS.due
                and not any(a.proofs.pending for a in agents))

    def _reconcile(self) -> bool:
        """One pass: start what is wanted, stop what is not; True when something is still under way.

        Starting a pod (find and pin its namespace, enrol it, start its agent) runs on a small pool
        and stopping one (its agent's threads wind down) on a thread of its own, so a slow pod never
        holds up the rest: at 2 deletes + 2 creates per second a sequential loop fell seconds behind.
        """
        with self._lock:
            desired = {uid: p for uid, p in self._desired.items() if p.ready}
            running = set(self._running)
            addressed, self._addressed = self._addressed, set()
        for uid in addressed:
            self._retry.pop(uid, None)  # its sandbox exists now (the CNI gave it the IP): no backoff
        for uid in sorted(running - set(desired)):
            self._stop_pod(uid, forget=True)
        now = time.monotonic()
        if now - self._pins_checked >= PINS_CHECK:
            self._pins_checked = now
            for uid in stale_pins(set(desired) | set(self._stopping), self.pin_prefix):
                unpin(uid, self.pin_prefix)  # pinned by an earlier run for a pod that is gone
        for uid in set(self._retry) - set(desired):
            del self._retry[uid]
        for uid in set(self._first) - set(desired):
            del self._first[uid]
        with self._lock:
            gone, self._awaiting = self._awaiting - set(desired), self._awaiting & set(desired)
        for uid in gone:
            self.gate.release(uid)
        for uid in set(self._early) - set(desired):
            self._early.pop(uid, None)
        for uid, fut in list(self._starting.items()):
            if not fut.done():
                continue
            del self._starting[uid]
            try:
                done, error = fut.result(), ""
            except StockadeError as exc:
                done, error = False, str(exc)
            if done:
                self._retry.pop(uid, None)
                continue
            delay = min(RETRY_MAX, self._retry.get(uid, (0.0, RETRY_SECONDS / 2))[1] * 2)
            if not error and time.time() - self.stats.stages.get(uid, {}).get("seen", 0.0) < FAST_RETRY_FOR:
                delay = FAST_RETRY  # a new pod: its workload is being committed, its sandbox started
            self._retry[uid] = (time.monotonic() + delay, delay)
            if error:
                pod = desired.get(uid)
                log.warning("pod %s: %s; retrying in %.1f s", f"{pod.namespace}/{pod.name}" if pod else uid, error,
                            delay)
        with self._lock:  # afresh: a start that finished above is running now (a stale view started it twice)
            running = set(self._running)
            host_network = set(self._host_network)
        for uid, pod in sorted(desired.items()):
            if self._stop.is_set():
                break
            if uid in running or uid in host_network or uid in self._starting:
                continue
            spotted: PodNetns | None = None
            if uid in self._awaiting:
                spotted = self._find(pod)
                if spotted is None:
                    continue  # its sandbox is not there yet
                self._stage(uid, "spotted")
                with self._lock:
                    self._awaiting.discard(uid)
            elif self._retry.get(uid, (0.0, 0.0))[0] > now:
                continue
            fut = self._pool.submit(self._start_pod, pod, spotted)
            fut.add_done_callback(lambda _f: self._poke.set())
            self._starting[uid] = fut
        return bool(self._starting) or any(uid not in running and uid not in host_network for uid in desired)

    def _wait_seconds(self, pending: bool) -> float:
        """How long the reconcile loop sleeps (a poke wakes it sooner)."""
        if not pending:
            return 5.0
        with self._lock:
            seen = [self.stats.stages.get(uid, {}).get("seen", 0.0) for uid in self._awaiting]
        if not seen:
            return FAST_RETRY
        return NS_POLL if time.time() - max(seen) < FAST_RETRY_FOR else NS_POLL_LATE

    def _start_pod(self, pod: LocalPod, spotted: PodNetns | None = None) -> bool:
        """Start enforcing ``pod``; deltas and proofs of the other pods wait meanwhile (the gate's
        hold, ended by the first apply or HOLD_SECONDS, whichever comes first)."""
        t0 = time.monotonic()
        self.gate.begin_hold()
        self.gate.release(pod.uid)  # its wait for a sandbox ends: this hold follows on without a gap
        started = False
        try:
            started = self._start_pod_held(pod, t0, spotted)  # True: the hold is ended by _time_first_apply (or above)
        finally:
            if not started:
                self.gate.end_hold()
        return started

    def _stage(self, uid: str, name: str, first: bool = False) -> None:
        with self._lock:
            stages = self.stats.stages.setdefault(uid, {})
            if first:
                stages.setdefault(name, time.time())
            else:
                stages[name] = time.time()  # the attempt that succeeded

    def _start_pod_held(self, pod: LocalPod, t0: float, spotted: PodNetns | None = None) -> bool:
        """``spotted``: the namespace the reconcile loop just found (by :meth:`_find`) for this enrolled
        pod, used instead of a second scan; :func:`~.podns.pin` checks it is still the pod's."""
        with self._lock:
            if pod.uid in self._running:
                self.gate.end_hold()
                return True  # already enforced: never a second runtime for one pod
        self._stage(pod.uid, "taken", first=True)
        self._stage(pod.uid, "started")
        if pod.host_network and self._in_node_namespace(pod):
            return True
        # enrol first: the sync writes a pod as soon as it is bound (before its IP and usually before
        # its sandbox); until that write commits this is a cheap 404, retried soon (FAST_RETRY). The
        # namespace is then looked for at every attempt until found (its policy kept meanwhile)
        state = StateDir(self.options.state_dir / "pods" / pod.uid, durable=False)  # dies with the machine
        cred = state.load_credential()
        if cred is not None and cred.workload != pod.workload:
            state.wipe()
            cred = None
        first, brought = self._kept_first(pod.uid)
        early = self._early_namespace(pod)
        if cred is None:
            assert self.client is not None and self.credential is not None
            key = public_key_text(state.load_or_create_key())
            try:
                e, first = (self.enroller.enroll if self.enroller else self.client.enroll_pod)(pod.workload, key)
                brought = time.monotonic()
            except NotFoundError:
                return False  # the sync has not made it a workload yet
            ca = self.state.load_ca()
            if ca:
                state.save_ca(ca)
            cred = Credential(self.credential.controller, e.agent_id, e.token, e.workload, state.key_path)
            state.save_credential(cred)
        self._stage(pod.uid, "enrolled", first=True)
        if early is not None:
            ns, netns = early
            with self._lock:
                self._early.pop(pod.uid, None)
        else:
            found = spotted if spotted is not None and spotted.uid == pod.uid else self._find(pod)
            if found is None:
                if first is not None:
                    self._first[pod.uid] = (first, brought)  # for the next attempt (the credential is kept on disk)
                with self._lock:
                    self._awaiting.add(pod.uid)
                self.gate.hold_for(pod.uid, AWAIT_HOLD)  # its sandbox may come any moment: deltas wait
                return False  # no process of it yet (or already gone)
            ns = found
            self._stage(pod.uid, "found")
            if ns.host_network:
                self._host_network_pod(pod)
                return True
            netns = pin(ns, self.pin_prefix)
            self._stage(pod.uid, "pinned")
        addresses = tuple(ipaddress.ip_address(a) for a in pod.addresses)
        report = HostReport(pod.workload, "kubernetes pod", (InterfaceReport("eth0", addresses),))
        backend = self._backend_factory(netns)
        enforcer = Enforcer(backend)
        flows: FlowCollector | None = None
        reader: FlowReader | None = None
        try:
            cache = self._enforce_first(pod, enforcer, state, first)  # protection first, then visibility: its
            # flow reader is bound before its runtime exists, so before the node acknowledges the pod
            reader, bound = open_reader_early(enforcer, f"pod {pod.uid}")
            if bound:
                self._stage(pod.uid, "flows")
            flows = collector_for(cred, state.load_ca(), enforcer,
                                  lambda: enforcer.policy.local_addresses if enforcer.policy else (), reader=reader)
            reader = None  # the collector's now
            poller = self.poller
            runtime = PodAgent if poller is None else PodRuntime  # PodRuntime: the node's poller brings its updates
            agent = runtime(AgentOptions(long_poll_seconds=self.options.long_poll_seconds,
                                         change_feed=self.options.pod_change_feed, watch_addresses=False,
                                         tamper_interval=self.options.pod_tamper_interval,
                                         proof_min_gap=self.options.pod_proof_min_gap,
                                         tamper_safety_interval=self.options.pod_tamper_interval,
                                         heartbeat_seconds=15.0 if poller is None else POD_HEARTBEAT_SECONDS),
                            state, enforcer, HttpControllerClient, host_reader=lambda: report, gate=self.gate,
                            cache=cache, flows=flows)
        except BaseException:
            if reader is not None:
                reader.close()
            if flows is not None:
                flows.stop(0.5)
            raise
        if cache is not None:
            agent.milestones["applied"] = self.stats.stages.get(pod.uid, {}).get("applied", time.time())
        with self._lock:
            self._running[pod.uid] = _Running(pod, netns, agent, backend, t0)
        agent.start()  # without the enrolment's policy in force: enforces the pod's cache, if any
        if poller is not None:
            poller.add(cred.agent_id, agent)
        self._stage(pod.uid, "runtime")
        if agent.applied_revision:
            agent.request_proof()  # the first policy is proven like any apply
            self.gate.end_hold()
            self._first_applied(pod.uid, agent, t0)
        else:
            threading.Thread(target=self._time_first_apply, args=(pod.uid, agent, t0), daemon=True).start()
        log.info("pod %s/%s: enforcing in %s (%s)", pod.namespace, pod.name, netns, pod.workload)
        return True

    def _kept_first(self, uid: str) -> tuple[PolicyUpdate | None, float]:
        """The policy an earlier attempt's enrolment brought (and when), while fresh. An address-less
        pod is enrolled before its sandbox exists, so that policy may wait; past ``FIRST_FRESH`` it
        is dropped and the pod's runtime asks the controller for the current one instead of
        applying an old revision first."""
        kept = self._first.pop(uid, None)
        if kept is None or time.monotonic() - kept[1] > FIRST_FRESH:
            return None, 0.0
        return kept

    def _early_namespace(self, pod: LocalPod) -> tuple[PodNetns, str] | None:
        """On a pod's first attempt only, find and pin its namespace before enrolling: the procfs
        scan and the pin then overlap the wait for the controller to commit the workload (the
        enrolment is a 404 until then). Not found (no process yet) or the node's own namespace: None,
        and the start looks again after its enrolment, as before."""
        with self._lock:
            if pod.uid in self._early:
                return self._early[pod.uid]
            self._early[pod.uid] = None
        ns = self._find(pod)
        if ns is None or ns.host_network:
            return None
        self._stage(pod.uid, "found")
        netns = pin(ns, self.pin_prefix)
        self._stage(pod.uid, "pinned")
        with self._lock:
            self._early[pod.uid] = (ns, netns)
        return ns, netns

    def _find(self, pod: LocalPod) -> PodNetns | None:
        """The pod's namespace; None while it has none of its own and its spec is not ``hostNetwork``.
        Looked for from the pod's binding on, a pod is seen while its sandbox is being made: a process
        already in the pod's cgroup but not yet in its namespace (runc joins the cgroup first) is in
        the node's. Taken for a host-network pod, it was left to the host policy, unenforced."""
        ns = self._finder(pod.uid)
        if ns is not None and ns.host_network and not pod.host_network:
            return None
        return ns

    def _in_node_namespace(self, pod: LocalPod) -> bool:
        """A ``hostNetwork`` pod (its spec says so) found running in the node's namespace: marked as
        covered by the host policy, nothing enrolled or applied for it."""
        ns = self._finder(pod.uid)
        if ns is None or not ns.host_network:
            return False
        self._host_network_pod(pod)
        return True

    def _host_network_pod(self, pod: LocalPod) -> None:
        with self._lock:
            self._host_network.add(pod.uid)  # the node's own namespace: the host policy covers it
        log.info("pod %s/%s uses the node's network: host policy applies", pod.namespace, pod.name)
        self.gate.end_hold()  # nothing of ours to apply there

    def _time_first_apply(self, uid: str, agent: Agent, t0: float) -> None:
        try:
            agent.converged.wait(HOLD_SECONDS)
        finally:
            self.gate.end_hold()
        if agent.converged.wait(120):
            self._first_applied(uid, agent, t0)

    def _enforce_first(self, pod: LocalPod, enforcer: Enforcer, state: StateDir,
                       first: PolicyUpdate | None) -> CacheStart | None:
        """Put the first policy the enrolment brought in force now, in this start thread (no runtime,
        long-poll or fetch first), and keep it as the pod's cache; its runtime then follows the
        controller from that revision. Only a full policy for this very workload; None (the runtime's
        long-poll brings the policy) for anything else or when the apply fails."""
        if first is None or first.kind is not UpdateKind.FULL or first.policy is None:
            return None
        if first.policy.workload != pod.workload:
            log.warning("pod %s/%s: enrolment brought a policy for %r; ignored", pod.namespace, pod.name,
                        first.policy.workload)
            return None
        try:
            enforcer.enforce(first.policy)
        except StockadeError as exc:
            log.warning("pod %s/%s: first policy not applied (%s); its runtime retries", pod.namespace, pod.name,
                        exc)
            return None
        self._stage(pod.uid, "applied")
        state.save_policy(CachedPolicy(first.revision, first.policy))
        detail = f"enforcing revision {first.revision} (brought by the pod's enrolment)"
        return CacheStart(first.revision, AgentEvent(EventKind.STARTED, detail, first.revision, time.time()))

    def _first_applied(self, uid: str, agent: Agent, t0: float) -> None:
        took = time.monotonic() - t0
        self.stats.programmed[uid] = took
        log.info("pod %s: first policy applied %.1f ms after the node agent took it up", uid, took * 1000)
        with self._lock:
            stages = dict(self.stats.stages.get(uid, {}))
        stages.update({f"agent-{k}": v for k, v in agent.milestones.items()})
        log.info("pod %s: stages %s", uid, json.dumps(stages, sort_keys=True))

    def _stop_pod(self, uid: str, forget: bool, wait: bool = False) -> None:
        with self._lock:
            r = self._running.pop(uid, None)
            self._host_network.discard(uid)
        if r is None:
            return

        if self.poller is not None:
            self.poller.remove(r.agent)

        def wind_down() -> None:
            r.agent.stop(timeout=1.0)
            r.backend.close()
            if forget:
                unpin(uid, self.pin_prefix)
                shutil.rmtree(self.options.state_dir / "pods" / uid, ignore_errors=True)
            self._stopping.pop(uid, None)
            log.info("pod %s/%s: stopped", r.pod.namespace, r.pod.name)

        if wait:
            wind_down()
            return
        # its own thread, not the start pool: an agent's threads take up to a second each to wind down
        # (its long-poll is abandoned), and a new pod must never wait behind a deleted one
        t = threading.Thread(target=wind_down, name="stockade-pod-stop", daemon=True)
        self._stopping[uid] = t
        t.start()
