"""The node agent's one long-poll for all its pods (issue 15): requests per node, not per pod.

Each local pod keeps its own agent identity and runtime (:class:`PodRuntime`: its enforcer in the
pod's namespace, tamper watch, proofs, events, flows, cache), but no runtime long-polls,
acknowledges or heartbeats on its own any more. One :class:`NodePoller` thread per node does it
for all of them with the node's credential (:mod:`stockade.controller.api.k8s_nodes`):

* ``POST /agents/{node}/pods/updates`` names every pod identity with the revision the node holds
  for it; the answer brings, for each pod whose revision moved, the same PolicyUpdate the pod's
  own fetch would (set deltas stay set deltas; one shared by many pods is decoded once per answer,
  :class:`~stockade.compiler.delta.SharedDecode`). The poller dispatches each to its pod's runtime on
  a small pool (:meth:`~stockade.agent.agent.Agent.update`: through the node's apply gate, verified,
  cached, refused like any agent's), and long-polls again once they are applied (at most
  ``ACK_CARRY`` later), the revisions applied riding on that long-poll: one request per round;
* the revisions applied while a long-poll is out go back as one ``POST .../pods/acks`` batch (what
  finished within a few milliseconds of each other);
* the long-poll and the acks are the pods' heartbeats (the runtimes send one at start only);
* new pods are enrolled in batches (:class:`PodEnroller`: ``POST .../pods/enroll-batch``, each pod
  still authorised and audited on its own).

A pod added while a long-poll is out abandons it (the next one names the new pod); a pod whose
update failed is asked for again from what it has in force after ``RETRY_SECONDS``; a pod the
controller calls ``gone`` (re-enrolled, deleted) is dropped from the poll.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stockade import __version__
from stockade.agent.agent import Agent
from stockade.agent.backoff import Backoff, BackoffPolicy
from stockade.agent.flows import collector_for
from stockade.agent.host import HostReport
from stockade.agent.http_client import LONG_POLL_MARGIN, HttpControllerClient
from stockade.agent.state import Credential, StateDir
from stockade.agent.transport import ControllerUnreachableError, Enrollment, EventKind
from stockade.agent_signature import public_key_text
from stockade.compiler.delta import PolicyUpdate, SharedDecode, policy_update_from_dict
from stockade.errors import AuthError, ConflictError, Issue, NotFoundError, StockadeError, ValidationError
from stockade.k8s.node_types import NodeOptions

log = logging.getLogger("stockade.k8s.node")
POD_HEARTBEAT_SECONDS = 1e9  # a pod runtime heartbeats once, at start: the node's requests keep it alive
RETRY_SECONDS = 1.0  # a pod whose update failed is asked for again this soon
ACK_LINGER = 0.02  # acks finishing within this long of each other go as one batch
ACK_CARRY = 0.05  # after an answer, the next long-poll waits this long at most for its applies' acks
ENROL_LINGER = 0.01  # pod enrolments gathered this long go as one batch
ENROL_BATCH = 64


# ---- the node protocol's calls ----------------------------------------------------------------
@dataclass(frozen=True)
class PodUpdate:
    agent_id: str
    update: PolicyUpdate


@dataclass(frozen=True)
class NodeAnswer:
    updates: tuple[PodUpdate, ...]
    gone: tuple[str, ...]


def _revisions(revs: dict[str, int]) -> list[dict[str, Any]]:
    return [{"agent_id": a, "revision": r} for a, r in sorted(revs.items())]


def _malformed(what: str, exc: Exception) -> ValidationError:
    return ValidationError([Issue("controller", 0, what, f"unexpected answer: {exc!r}")])


def poll_pods(client: HttpControllerClient, held: dict[str, int], acks: dict[str, int],
              timeout: float) -> NodeAnswer:
    """One node long-poll (``held``: pod agent id -> revision the node holds)."""
    resp = client._request("POST", client._agent_path("pods/updates"), timeout=timeout + LONG_POLL_MARGIN,
                           json={"pods": _revisions(held), "acks": _revisions(acks), "timeout": timeout})
    data = client._json(resp)
    try:
        shared = SharedDecode()  # the pods' common set deltas and sets: parsed once per answer
        updates = tuple(PodUpdate(str(p["agent_id"]), policy_update_from_dict(p["policy"], shared=shared))
                        for p in data["pods"])
        return NodeAnswer(updates, tuple(str(g) for g in data["gone"]))
    except (KeyError, TypeError) as exc:
        raise _malformed("pods/updates", exc) from exc


def ack_pods(client: HttpControllerClient, acks: dict[str, int]) -> tuple[str, ...]:
    """One ack batch; the identities the controller says are gone."""
    data = client._json(client._request("POST", client._agent_path("pods/acks"), json={"acks": _revisions(acks)}))
    try:
        return tuple(str(g) for g in data["gone"])
    except (KeyError, TypeError) as exc:
        raise _malformed("pods/acks", exc) from exc


EnrolResult = tuple[Enrollment, PolicyUpdate | None]
_REFUSAL: dict[int, type[StockadeError]] = {404: NotFoundError, 409: ConflictError, 403: AuthError}


def enroll_pods(client: HttpControllerClient, pods: list[tuple[str, str]]) -> dict[str, EnrolResult | StockadeError]:
    """Enrol ``pods`` ((workload, public key)) in one request: workload -> result or its refusal."""
    data = client._json(client._request("POST", client._agent_path("pods/enroll-batch"), json={
        "pods": [{"workload": w, "public_key": k} for w, k in pods], "agent_version": __version__,
        "include_policy": True}))
    out: dict[str, EnrolResult | StockadeError] = {}
    shared = SharedDecode()
    try:
        for e in data["enrolled"]:
            policy = e.get("policy")
            out[str(e["workload"])] = (Enrollment(str(e["agent_id"]), str(e["token"]), str(e["workload"])),
                                       None if policy is None else policy_update_from_dict(policy, shared=shared))
        for r in data["refused"]:
            err = _REFUSAL.get(int(r["status"]))
            msg = str(r["message"])
            out[str(r["workload"])] = err(msg) if err is not None else \
                ValidationError([Issue("controller", 0, "enroll-batch", msg)])
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed("pods/enroll-batch", exc) from exc
    return out


class PodEnroller:
    """Gathers the start threads' pod enrolments into batches (one request for many pods)."""

    def __init__(self, client: HttpControllerClient) -> None:
        self.client = client
        self._queue: list[tuple[str, str, Future[EnrolResult]]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches = 0

    def enroll(self, workload: str, public_key: str) -> EnrolResult:
        fut: Future[EnrolResult] = Future()
        with self._cond:
            if self._stopping:
                raise ControllerUnreachableError("node agent stopping")
            self._queue.append((workload, public_key, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stockade-pod-enrol", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut.result(120)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for _w, _k, fut in self._queue:
                        fut.set_exception(ControllerUnreachableError("node agent stopping"))
                    self._queue.clear()
                    return
            time.sleep(ENROL_LINGER)  # let the other start threads' enrolments join this batch
            with self._cond:
                batch, self._queue = self._queue[:ENROL_BATCH], self._queue[ENROL_BATCH:]
            try:
                got = enroll_pods(self.client, [(w, k) for w, k, _f in batch])
                self.batches += 1
            except StockadeError as exc:
                for _w, _k, fut in batch:
                    fut.set_exception(exc)
                continue
            for w, _k, fut in batch:
                r = got.get(w)
                if r is None:
                    fut.set_exception(_malformed("pods/enroll-batch", KeyError(w)))
                elif isinstance(r, StockadeError):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)


def _poll_client(client: HttpControllerClient) -> HttpControllerClient:
    """A client like ``client`` (same controllers, CA, credential) with connections of its own."""
    twin = type(client)(client.urls, client._ca_pem, transport=client._transport)
    if client._credential is not None:
        twin.use_credential(client._credential, client._ca_pem)
    return twin


def _cut(client: HttpControllerClient) -> None:
    """Shut down ``client``'s open connections: a request blocked on one fails at once. (A client
    over a transport of its own, e.g. a test's, has none recorded: its request runs out.)"""
    for stream in client._streams.snapshot():
        stream.shut_down()


class NodeControllerClient(HttpControllerClient):
    """The agent protocol plus the node agent's one extra call."""

    def enroll_pod(self, workload: str, public_key: str) -> tuple[Enrollment, PolicyUpdate | None]:
        """The pod's identity and, from a controller that sends it, its first policy (the answer of
        ``GET /agents/{id}/policy`` for the new identity: no further round trip before its first apply)."""
        data = self._json(self._request("POST", self._agent_path("pods/enroll"), json={
            "workload": workload, "public_key": public_key, "agent_version": __version__, "include_policy": True}))
        try:
            enrollment = Enrollment(str(data["agent_id"]), str(data["token"]), str(data["workload"]))
        except (KeyError, TypeError) as exc:
            raise ValidationError([Issue("controller", 0, "enroll-pod", f"unexpected answer: {exc!r}")]) from exc
        policy = data.get("policy")
        return enrollment, None if policy is None else policy_update_from_dict(policy)


# ---- a pod's runtime ----------------------------------------------------------------------------
class PodAgent(Agent):
    """A pod's agent runtime under the per-pod protocol: an ordinary agent that never reports the
    pod's interfaces. The cluster sync owns a pod workload's addresses (``status.podIPs``); a pod's
    runtime starts before its IP may exist (address-less workloads, :mod:`stockade.k8s.mapping`), so
    a report of what the node agent knew at its start could land after the sync's write and erase
    the address (``PUT .../interfaces`` replaces the workload's interfaces)."""

    def _report_host(self) -> None:
        return


class PodRuntime(PodAgent):
    """An :class:`~stockade.agent.agent.Agent` whose updates come from the node's :class:`NodePoller`:
    it enforces, watches for tampering, proves, reports events and flows, but never long-polls,
    acknowledges or heartbeats on its own (one heartbeat at start carries its backend)."""

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
        self._inline_acks = True  # the node's poller acknowledges what this runtime applied
        self.milestones.setdefault("enrolled", time.time())
        self.outbox.start(client)
        if self._flows is None and self.credential is not None:  # the node agent hands it in, already reading
            self._flows = collector_for(self.credential, self.state.load_ca(), self.enforcer,
                                        lambda: self.enforcer.policy.local_addresses if self.enforcer.policy else ())
        self.enrolled.set()  # only now: the poller's first update must find the flow reader in place
        self._stop.wait()


# ---- the node's poller -----------------------------------------------------------------------------
class NodePoller:
    """One thread long-polling for every pod of the node; a small pool applying what it brings."""

    def __init__(self, client: HttpControllerClient, *, long_poll_seconds: float = 20.0, workers: int = 4,
                 backoff: BackoffPolicy | None = None) -> None:
        self.client = client
        self._poll_client = _poll_client(client)  # the long-poll's own connections (cut when abandoned)
        self._polling: Future[NodeAnswer] | None = None  # the long-poll out (an abandoned one is not)
        self.long_poll_seconds = long_poll_seconds
        self._pods: dict[str, Agent] = {}  # pod agent id -> its runtime
        self._held: dict[str, int] = {}  # pod agent id -> revision asked beyond (applied, or being applied)
        self._acked: dict[str, int] = {}
        self._acks: dict[str, int] = {}  # to send
        self._busy: set[str] = set()
        self._stale: set[str] = set()  # moved again while busy: long-poll again when done
        self._retry_at = 0.0
        self._carrying: set[str] = set()  # dispatched by the last answer: the next long-poll carries their acks
        self._carried = threading.Event()  # ... all applied (or failed)
        self._carried.set()
        self._lock = threading.Lock()
        self._repoll = threading.Event()  # abandon the long-poll out: a pod came, or failed
        self._ack_poke = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stockade-pod-apply")
        self._threads: list[threading.Thread] = []
        self._backoff = Backoff(backoff or BackoffPolicy())
        self.polls = 0  # long-polls answered (stats)
        self.ack_batches = 0

    def start(self) -> None:
        for target, name in ((self._run, "stockade-node-poll"), (self._ack_loop, "stockade-node-acks")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._repoll.set()
        self._ack_poke.set()
        for t in self._threads:
            t.join(2)
        self._pool.shutdown(wait=False, cancel_futures=True)
        _cut(self._poll_client)
        self._poll_client.close()

    def add(self, agent_id: str, runtime: Agent) -> None:
        """Follow ``runtime``'s pod from the revision it has in force (acknowledged first)."""
        with self._lock:
            self._pods[agent_id] = runtime
            self._held[agent_id] = max(runtime.applied_revision, runtime.refused_revision)
            if runtime.applied_revision:
                self._acks[agent_id] = runtime.applied_revision
                self._ack_poke.set()
        self._repoll.set()

    def remove(self, runtime: Agent) -> None:
        with self._lock:
            for agent_id in [a for a, r in self._pods.items() if r is runtime]:
                self._forget(agent_id)

    def _forget(self, agent_id: str) -> None:
        self._pods.pop(agent_id, None)
        self._held.pop(agent_id, None)
        self._acked.pop(agent_id, None)
        self._acks.pop(agent_id, None)
        self._stale.discard(agent_id)

    # ---- the long-poll -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._retry_at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            self._repoll.clear()  # before the snapshot: a pod added after it abandons the long-poll
            with self._lock:
                # a busy pod is named with the revision it is applying (a newer one marks it stale);
                # a stale one is left out until it is done (it would answer every long-poll at once)
                held = {a: r for a, r in self._held.items() if a not in self._stale}
                acks, self._acks = self._acks, {}
            if not held and not acks:
                self._repoll.wait(1.0)
                self._repoll.clear()
                continue
            try:
                answer = self._long_poll(held, acks)
            except ControllerUnreachableError as exc:
                self._requeue(acks)
                delay = self._backoff.next_delay()
                log.info("node poll: controller unreachable (%s); retry in %.2fs", exc, delay)
                self._stop.wait(delay)
                continue
            except StockadeError as exc:  # refused (403, 422): a bug or a revoked node; never spin
                self._requeue(acks)
                log.error("node poll refused: %s", exc)
                self._stop.wait(self._backoff.next_delay() + 1.0)
                continue
            self._backoff.reset()
            if answer is None:
                self._requeue(acks)  # abandoned: they may not have arrived
                continue
            with self._lock:
                for a, r in acks.items():
                    self._acked[a] = max(r, self._acked.get(a, 0))
            self.polls += 1
            self._carried.clear()  # the ack thread leaves the acks to the next long-poll
            self._dispatch(answer)
            self._carry(answer)

    def _carry(self, answer: NodeAnswer) -> None:
        """Wait (at most ``ACK_CARRY``) for the pods ``answer`` dispatched: their acks then go on
        the next long-poll, not in a request of their own. Meanwhile the ack thread leaves them to
        the long-poll; what is still applying after the wait is acknowledged by the ack thread."""
        with self._lock:  # those still applying (a busy one the answer found stale was not dispatched)
            self._carrying = {u.agent_id for u in answer.updates
                              if u.agent_id in self._busy and u.agent_id not in self._stale}
            if not self._carrying:
                self._carried.set()
        self._carried.wait(ACK_CARRY)
        with self._lock:
            self._carrying.clear()
            self._carried.set()
            if self._acks and self._retry_at > time.monotonic():  # the long-poll waits: don't hold them
                self._ack_poke.set()

    def _long_poll(self, held: dict[str, int], acks: dict[str, int]) -> NodeAnswer | None:
        """:func:`poll_pods` in its own thread, abandoned (None) when a pod comes or one must be retried.

        An abandoned long-poll is cut (its connection shut down): left out, each one held a
        connection and a controller waiter for up to ``long_poll_seconds``, and while pods came
        (110 at start, 2 a second in churn) they piled up past the connection pool's limit, so
        the enrolments queued for a connection; and each one answering later woke the poller and
        abandoned the long-poll then out (a storm of re-polls naming every pod)."""
        result: Future[NodeAnswer] = Future()

        def run() -> None:
            try:
                result.set_result(poll_pods(self._poll_client, held, acks, self.long_poll_seconds))
            except BaseException as exc:
                result.set_exception(exc)
            finally:
                if self._polling is result:  # an abandoned one's end must not abandon the one out now
                    self._repoll.set()

        self._polling = result
        threading.Thread(target=run, name="stockade-node-long-poll", daemon=True).start()
        while not result.done():
            self._repoll.wait()
            self._repoll.clear()
            if self._stop.is_set() or not result.done():  # stopping, or a pod came (or must be retried)
                self._polling = None
                _cut(self._poll_client)  # the next long-poll names it; nothing else uses these connections
                return None
        self._polling = None
        return result.result()

    def _requeue(self, acks: dict[str, int]) -> None:
        with self._lock:
            for a, r in acks.items():
                if a in self._pods and r > self._acks.get(a, 0):
                    self._acks[a] = r

    def _dispatch(self, answer: NodeAnswer) -> None:
        with self._lock:
            for agent_id in answer.gone:
                if agent_id in self._pods:
                    log.warning("node poll: pod identity %s is gone at the controller; no longer followed", agent_id)
                self._forget(agent_id)
            for u in answer.updates:
                runtime = self._pods.get(u.agent_id)
                if runtime is None:
                    continue
                if u.agent_id in self._busy:
                    self._stale.add(u.agent_id)
                    continue
                self._busy.add(u.agent_id)
                self._held[u.agent_id] = max(self._held.get(u.agent_id, 0), u.update.revision)
                self._pool.submit(self._apply, u.agent_id, runtime, u.update)

    def _apply(self, agent_id: str, runtime: Agent, upd: PolicyUpdate) -> None:
        try:
            if runtime.enrolled.wait(10) and runtime.client is not None:
                # fetched afresh when an answer brought a newer revision while this waited (in the
                # pool or at the gate): one delta for both; else the delta in hand is the one to apply
                runtime.update(runtime.client, upd.revision, upd, newer_known=lambda: self._is_stale(agent_id))
        except StockadeError as exc:  # the runtime reported it (apply-failed event) where it applies
            log.info("pod %s: revision %d not applied (%s); asked again in %.1f s", agent_id, upd.revision, exc,
                     RETRY_SECONDS)
        except Exception as exc:  # a bug must not stop the others
            log.exception("pod %s: update failed: %s", agent_id, exc)
        with self._lock:
            self._busy.discard(agent_id)
            if agent_id in self._carrying:
                self._carrying.discard(agent_id)
                if not self._carrying:
                    self._carried.set()
            if agent_id not in self._pods:
                return
            reached = max(runtime.applied_revision, runtime.refused_revision)
            if runtime.applied_revision > max(self._acked.get(agent_id, 0), self._acks.get(agent_id, 0)):
                self._acks[agent_id] = runtime.applied_revision
                self._ack_poke.set()
            stale = agent_id in self._stale
            self._stale.discard(agent_id)
            if reached < upd.revision:  # failed: from what is in force, after a pause
                self._held[agent_id] = reached
                self._retry_at = time.monotonic() + RETRY_SECONDS
                self._repoll.set()
                return
            # a refetch may have gone past ``upd``: ask beyond what is in force (asked from ``upd``,
            # the controller would answer at once with a delta from a revision no longer in force,
            # which the runtime refuses into a full fetch and reload)
            self._held[agent_id] = max(self._held.get(agent_id, 0), reached)
            if stale:
                self._repoll.set()

    def _is_stale(self, agent_id: str) -> bool:
        with self._lock:
            return agent_id in self._stale

    # ---- acks ------------------------------------------------------------------------------------
    def _ack_loop(self) -> None:
        while not self._stop.is_set():
            self._ack_poke.wait()
            self._ack_poke.clear()
            if self._stop.is_set():
                return
            deadline = time.monotonic() + 0.25
            while time.monotonic() < deadline:  # gather what finishes together (busy pods first)
                self._stop.wait(ACK_LINGER)
                with self._lock:
                    if not self._busy:
                        break
            with self._lock:
                if not self._carried.is_set():  # the next long-poll takes them (it is poked by them)
                    continue
                acks, self._acks = self._acks, {}
            if not acks:
                continue
            try:
                gone = ack_pods(self.client, acks)
            except StockadeError as exc:
                log.info("node acks: %s; sent with the next long-poll", exc)
                self._requeue(acks)
                continue
            self.ack_batches += 1
            with self._lock:
                for a, r in acks.items():
                    self._acked[a] = max(r, self._acked.get(a, 0))
                for a in gone:
                    self._forget(a)


def enrol_node_bare(o: NodeOptions, state: StateDir, report: HostReport, stop: threading.Event) -> Credential | None:
    """The node's credential from its activation code, for a node agent that leaves the node's own
    firewall alone (``--no-host-policy``: no host agent enrols it). Retried while the controller is
    unreachable; None when stopped first."""
    if not o.activation_code:
        raise AuthError("node agent not enrolled: an activation code is needed the first time")
    key = public_key_text(state.load_or_create_key())
    client = NodeControllerClient(o.controller, state.load_ca())
    try:
        while not stop.is_set():
            try:
                e = client.enroll(o.activation_code, report, key)
            except ControllerUnreachableError as exc:
                log.info("node enrolment: %s; retrying", exc)
                stop.wait(1.0)
                continue
            if e.ca_pem:
                state.save_ca(e.ca_pem)
            cred = Credential(o.controller, e.agent_id, e.token, e.workload, state.key_path)
            state.save_credential(cred)
            return cred
    finally:
        client.close()
    return None
