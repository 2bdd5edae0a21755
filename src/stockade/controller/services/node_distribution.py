"""Node-level policy distribution for Kubernetes node agents (issue 15): one request per node, not per pod.

A node agent enforces every pod of its node, each pod with its own agent identity (revision,
acknowledgement, state, events: the console shows each pod). Per pod that was a long-poll, an
ack and a 15 s heartbeat: at 10,000 pods the heartbeats alone were ~670 requests per second and
every event answered one long-poll per affected *pod*. Here the node speaks for its pods:

* **one long-poll per node** (:meth:`NodeDistribution.wait`): the node names, for each of its pods'
  identities, the revision it holds; the answer, as soon as one of them moved (or at the timeout),
  carries for each moved pod the same :class:`~stockade.compiler.delta.PolicyUpdate` its own
  ``GET /agents/{id}/policy?since=`` returns (set deltas stay set deltas);
* **one ack batch per node** (:meth:`NodeDistribution.ack`), also taken on the long-poll;
* the long-poll and the ack batch are **the pods' heartbeat**: every pod named is marked alive.

Authorisation (:meth:`NodeDistribution.resolve`), on top of the node's own signed credential: every
pod identity named must be one *this* node enrolled (``agents.profile`` = the pod-identity profile
and ``agents.hostname`` = the node's workload); anything else (another node's pod, a host's agent,
an unknown id) refuses the whole request (403), naming the id. An identity of this node that was
revoked, or whose workload is gone or no longer bound to the node (``k8s-node`` label, written by
the sync), is answered as ``gone``: no policy, no ack, no heartbeat for it.

Wake-ups: :class:`~stockade.controller.services.distribution.PolicyDistributor` calls
:meth:`NodeDistribution.on_wake` on the event loop with the hosts whose revision moved; each pod
workload names its node in its ``k8s-node`` label, so only that node's long-polls wake.

Cost (bench/k8s_fanout.py, 10,000 pods on 100 nodes, 100 pod events/s): every batch wakes most
nodes, and each node polls again at once naming its ~100 pods, so this path runs for ~10,000 pod
entries per batch. What is per entry is kept to dictionary lookups: a pod's node is read from its
workload's labels once per workload *object* (:meth:`NodeDistribution.node_of`; a relabel replaces
the object), and a heartbeat is a datetime comparison. The answer is JSON written by
:func:`encode_answer`: a set delta the compiler shares between hosts (the web pods of one
namespace all get the same delta when a db pod comes) is encoded once per process, not per pod.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import select

from stockade.compiler.delta import PolicyUpdate, UpdateKind, policy_update_to_dict, set_delta_to_dict
from stockade.compiler.ir import SetDelta
from stockade.controller.services.auth import ForbiddenError
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.pod_enrolment import NODE_LABEL, PROFILE
from stockade.controller.services.waiters import Waiters
from stockade.controller.storage.db import AgentRow, utcnow
from stockade.errors import NotFoundError
from stockade.model.workloads import Workload

HEARTBEAT_EVERY = 10.0  # seconds: a pod's heartbeat through its node is recorded at most this often (offline: 90 s)


@dataclass(frozen=True)
class PodIdentity:
    """The facts of a pod identity's row that never change: who enrolled it, for which workload."""

    agent_id: str
    node: str  # the node agent's workload (agents.hostname)
    workload: str
    pod_identity: bool  # agents.profile is the pod-identity profile


class HeldPod(NamedTuple):
    """A pod identity of the node (resolved) and the revision the node holds for it (a NamedTuple:
    made for every pod of every node poll, ~10,000 per batch at 10,000 pods, at a third of the cost
    of a frozen dataclass)."""

    agent_id: str
    workload: str
    after: int


@dataclass(frozen=True)
class Resolved:
    bound: tuple[HeldPod, ...]
    gone: tuple[str, ...]  # identities of this node that no longer get policy here


class NodeDistribution:
    """Per-node long-polls over a :class:`PolicyDistributor` (one per distributor: :func:`for_dist`)."""

    def __init__(self, dist: PolicyDistributor) -> None:
        self.dist = dist
        self._identities: dict[str, PodIdentity] = {}  # agent id -> its row's fixed facts (cache)
        self._waiters = Waiters()  # node -> its polls waiting for a pod to move
        self._nodes: dict[str, tuple[Workload, str | None]] = {}  # workload -> (the object read, its node)
        dist.wake_listeners.append(self.on_wake)
        dist.wanted.append(self.is_pod)  # update_for must not wait for the lock on the loop

    # ---- authorisation -------------------------------------------------------------------------
    def unknown(self, agent_ids: list[str]) -> list[str]:
        """Ids whose facts are not cached yet, or not live in this process (call :meth:`load` for them)."""
        return [a for a in agent_ids if a not in self._identities or a not in self.dist.agents]

    def load(self, agent_ids: list[str]) -> None:
        """Read the rows of ``agent_ids`` (blocking: from a thread); live ones another replica
        enrolled are adopted like the agent's own requests adopt them."""
        with self.dist.sessions() as db:
            for chunk in range(0, len(agent_ids), 500):
                part = agent_ids[chunk : chunk + 500]
                for row in db.scalars(select(AgentRow).where(AgentRow.id.in_(part))):
                    self._identities[row.id] = PodIdentity(row.id, row.hostname or "", row.workload,
                                                           row.profile == PROFILE)
                    if row.revoked_at is None and row.id not in self.dist.agents:
                        self.dist.adopt_agent(row)

    def resolve(self, node: str, held: list[tuple[str, int]]) -> Resolved:
        """Check every named identity against ``node`` (403 naming the first foreign one) and split
        them into the pods bound here and the ones gone. Call :meth:`load` for :meth:`unknown` first."""
        bound: list[HeldPod] = []
        gone: list[str] = []
        for agent_id, after in held:
            ident = self._identities.get(agent_id)
            if ident is None or not ident.pod_identity or ident.node != node:
                # the same answer for an unknown id, a host's agent and another node's pod
                raise ForbiddenError(f"agent {agent_id!r} is not a pod identity of node {node!r}")
            live = self.dist.agents.get(agent_id)
            if live is None or self.node_of(ident.workload) != node:
                gone.append(agent_id)  # revoked (re-enrolled), or its pod deleted
                continue
            bound.append(HeldPod(agent_id, ident.workload, after))
        return Resolved(tuple(bound), tuple(gone))

    def is_pod(self, workload: str) -> bool:
        return self.node_of(workload) is not None

    def node_of(self, workload: str) -> str | None:
        """The node ``workload`` is bound to (its ``k8s-node`` label), None when unbound or gone.
        Read once per Workload object: the inventory's objects are frozen and replaced on every
        change, so the object's identity says whether the cached answer still holds."""
        w = self.dist.workloads.get(workload)
        if w is None:
            self._nodes.pop(workload, None)
            return None
        cached = self._nodes.get(workload)
        if cached is not None and cached[0] is w:
            return cached[1]
        node = next((label.value for label in w.labels if label.key == NODE_LABEL), None)
        self._nodes[workload] = (w, node)
        return node

    # ---- acks and heartbeats ---------------------------------------------------------------------
    def ack(self, pods: tuple[HeldPod, ...], acks: dict[str, int]) -> None:
        """Acknowledge ``acks`` (agent id -> revision applied) of the resolved pods, and mark every
        resolved pod alive (the node's request is its pods' heartbeat).

        A pod's heartbeat is recorded at most every ``HEARTBEAT_EVERY`` seconds: the node long-polls
        again after every answer (several times a second during churn) naming all its pods, and each
        recorded heartbeat is a row the agent-state flush writes (110 per poll and per node, where a
        pod's own runtime heartbeated every 15 s)."""
        due = utcnow() - dt.timedelta(seconds=HEARTBEAT_EVERY)  # a heartbeat at or before this is renewed
        agents = self.dist.agents
        for p in pods:
            if acks:
                rev = acks.get(p.agent_id)
                if rev is not None:
                    self.dist.agent_ack(p.agent_id, rev)
            live = agents.get(p.agent_id)
            if live is not None and (live.last_heartbeat is None or live.last_heartbeat <= due):
                self.dist.agent_heartbeat(p.agent_id)

    # ---- the long-poll -----------------------------------------------------------------------------
    def moved(self, pods: tuple[HeldPod, ...]) -> list[HeldPod]:
        revisions = self.dist.revisions
        return [p for p in pods if revisions.get(p.workload, 0) > p.after]

    async def wait(self, node: str, pods: tuple[HeldPod, ...], timeout: float) -> list[HeldPod]:
        """The pods whose revision exceeds what the node holds, as soon as there is one, or [] at
        ``timeout``.

        Each waiter awaits its own future, which :meth:`on_wake` resolves: the woken poll runs on the
        very next turn of the event loop. (An ``asyncio.Event`` under ``wait_for`` took three turns, on
        Python 3.11 through a task of its own, and during pod churn each turn queues behind the acks
        and next polls of every node the previous batch woke.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            moved = self.moved(pods)
            remaining = deadline - loop.time()
            if moved or remaining <= 0 or not pods:
                if not moved and not pods and remaining > 0:
                    await asyncio.sleep(remaining)  # a node with nothing to follow yet: still a long-poll
                return moved
            if not await self._waiters.wait(node, remaining):
                return self.moved(pods)  # the timeout

    def on_wake(self, names: tuple[str, ...]) -> None:
        """On the event loop: wake the long-polls of the nodes whose pods ``names`` name."""
        if not self._waiters:
            return
        for name in names:
            node = self.node_of(name)
            if node is not None:
                self._waiters.wake(node)

    def update_for(self, pod: HeldPod) -> PolicyUpdate | None:
        """The PolicyUpdate for ``pod`` from the revision the node holds (None: nothing compiled)."""
        got = self.dist.fetch_nowait(pod.workload, pod.after or None)
        if got is not None:
            return got
        try:
            return self.dist.fetch(pod.workload, pod.after or None)
        except NotFoundError:
            return None


SHARED_DELTAS = 8192  # set deltas whose JSON is kept (a batch's distinct deltas; the oldest go first)
_DELTA_JSON: dict[int, tuple[SetDelta, str]] = {}  # id -> (the delta, kept alive so the id stays its own; JSON)


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _set_delta_json(d: SetDelta) -> str:
    hit = _DELTA_JSON.get(id(d))
    if hit is not None and hit[0] is d:
        return hit[1]
    text = _json(set_delta_to_dict(d))
    if len(_DELTA_JSON) >= SHARED_DELTAS:
        del _DELTA_JSON[next(iter(_DELTA_JSON))]
    _DELTA_JSON[id(d)] = (d, text)
    return text


def update_json(update: PolicyUpdate) -> str:
    """``policy_update_to_dict(update)`` as JSON text; a set delta's part is encoded once per process
    (the compiler hands the same SetDelta object to every host whose set changed alike)."""
    if update.kind is not UpdateKind.DELTA or update.peer_delta or update.base is None:
        return _json(policy_update_to_dict(update))
    deltas = ",".join(_set_delta_json(d) for d in update.set_deltas)
    return f'{{"revision":{update.revision:d},"full":null,"base":{update.base:d},"set_deltas":[{deltas}]}}'


def encode_answer(moved: Iterable[tuple[HeldPod, PolicyUpdate]], gone: Iterable[str]) -> bytes:
    """The long-poll's answer (``PodUpdatesOut``) as JSON bytes."""
    pods = ",".join(f'{{"agent_id":{_json(p.agent_id)},"workload":{_json(p.workload)},"revision":{u.revision:d},'
                    f'"policy":{update_json(u)}}}' for p, u in moved)
    return f'{{"pods":[{pods}],"gone":{_json(list(gone))}}}'.encode()


_BY_DIST: weakref.WeakKeyDictionary[PolicyDistributor, NodeDistribution] = weakref.WeakKeyDictionary()


def for_dist(dist: PolicyDistributor) -> NodeDistribution:
    """The :class:`NodeDistribution` of ``dist`` (made on first use)."""
    nodes = _BY_DIST.get(dist)
    if nodes is None:
        nodes = _BY_DIST[dist] = NodeDistribution(dist)
    return nodes
