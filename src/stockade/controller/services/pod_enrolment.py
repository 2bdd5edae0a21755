"""Kubernetes node agents enrol the pods bound to their node (issue 15): the node delegation rule.

A node agent is an ordinary agent, enrolled with a pairing profile or an adoption code as the
workload named after its Kubernetes node. It runs one agent identity per local pod (so every
pod has its own credential, key, policy revision, acknowledgement and events, exactly like a
host), and gets those identities here instead of from an activation code:

* the target must be a workload the cluster sync owns (name ``k8s.*``), and
* its ``k8s-node`` label - written by the sync from ``pod.spec.nodeName`` - must equal the
  enrolling agent's own workload name.

So a node can never obtain the credential (or the policy) of a pod on another node, nor of any
non-pod workload. A pod that already has an agent from the *same* node is re-enrolled (the old
credential is revoked: a restarted node agent that lost its state dir recovers); an agent from
anywhere else is a conflict (409). Every enrolment is audited (``agent.enroll``, profile
``k8s-node``, with the node's agent id).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from stockade import agent_signature as sig
from stockade.codec.pairing_body import POD_IDENTITY_PROFILE
from stockade.controller.services import auth
from stockade.controller.services.agent_keys import AgentKeyRing
from stockade.controller.services.auth import ForbiddenError
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.distribution import AgentLive, PolicyDistributor
from stockade.controller.services.events import record_event
from stockade.controller.storage import store
from stockade.controller.storage.db import AgentRow, utcnow
from stockade.errors import ConflictError, Issue, NotFoundError, StockadeError, ValidationError

POD_PREFIX = "k8s."
NODE_LABEL = "k8s-node"
PROFILE = POD_IDENTITY_PROFILE  # AgentRow.profile of pod identities (a name no pairing profile may take)


@dataclass(frozen=True)
class PodEnrolled:
    agent_id: str
    token: str
    workload: str


@dataclass(frozen=True)
class PodRequest:
    workload: str
    public_key: str


def enrol_pod(dist: PolicyDistributor, keys: AgentKeyRing, node_agent_id: str, node: str, pod: str,
              public_key: str, agent_version: str) -> PodEnrolled:
    """An agent identity for pod workload ``pod`` on behalf of the node agent (workload ``node``)."""
    _check_request(pod, public_key)

    def run(db: Session, txn: CompilerTxn) -> PodEnrolled:
        return _enrol_in(dist, keys, db, txn, node_agent_id, node, PodRequest(pod, public_key), agent_version)

    return dist.transact(run)


def enrol_pods(dist: PolicyDistributor, keys: AgentKeyRing, node_agent_id: str, node: str,
               pods: list[PodRequest], agent_version: str) -> list[PodEnrolled | StockadeError]:
    """The batch form (one request, one transaction for a node's pods): each pod is authorised
    and audited exactly as :func:`enrol_pod` does it; a refused pod gets its error in its place
    and does not stop the others."""
    out: list[PodEnrolled | StockadeError] = []
    for p in pods:
        try:
            _check_request(p.workload, p.public_key)
        except StockadeError as exc:
            out.append(exc)
            continue
        out.append(PodEnrolled("", "", p.workload))  # placeholder: enrolled in the transaction below

    def run(db: Session, txn: CompilerTxn) -> list[PodEnrolled | StockadeError]:
        done: list[PodEnrolled | StockadeError] = []
        for p, prior in zip(pods, out, strict=True):
            if isinstance(prior, StockadeError):
                done.append(prior)
                continue
            try:
                done.append(_enrol_in(dist, keys, db, txn, node_agent_id, node, p, agent_version))
            except (NotFoundError, ForbiddenError, ConflictError) as exc:  # raised before anything is written
                done.append(exc)
        return done

    return dist.transact(run)


def _check_request(pod: str, public_key: str) -> None:
    try:
        sig.parse_public_key(public_key)
    except sig.SignatureError as exc:
        raise ValidationError([Issue("api", 0, "public_key", str(exc))]) from None
    if not pod.startswith(POD_PREFIX):
        raise ForbiddenError(f"{pod!r} is not a Kubernetes pod workload")


def _enrol_in(dist: PolicyDistributor, keys: AgentKeyRing, db: Session, txn: CompilerTxn, node_agent_id: str,
              node: str, req: PodRequest, agent_version: str) -> PodEnrolled:
    """Check (nothing written when refused), then enrol: revoke this node's old identity of the pod,
    add the new one, audit both."""
    pod, public_key = req.workload, req.public_key
    try:
        current = store.get_object(db, "workload", pod)
    except NotFoundError:
        raise NotFoundError(f"no pod workload {pod!r} (yet)") from None
    bound = dict(current.body.get("labels") or {}).get(NODE_LABEL)
    if bound != node:
        # the same answer whether the pod is elsewhere or unbound: nothing about other nodes leaks
        raise ForbiddenError(f"pod {pod!r} is not bound to node {node!r}")
    actor = f"agent:{node_agent_id}"
    others = list(db.scalars(select(AgentRow).where(AgentRow.workload == pod, AgentRow.revoked_at.is_(None))))
    for other in others:
        if other.profile != PROFILE or other.hostname != node:
            raise ConflictError(f"workload {pod!r} already has an enrolled agent; revoke it first")
    for other in others:
        other.revoked_at = utcnow()
        record_event(db, actor, "agent.revoke", "agent", other.id, None, {"workload": pod, "reason": "re-enrolled"})
        old = other.id
        dist.agents.pop(old, None)
        keys.forget(old)
    agent_id = secrets.token_hex(8)
    secret = auth.new_secret()
    token_hash = auth.sha256(secret)
    db.add(AgentRow(id=agent_id, workload=pod, token_hash=token_hash, profile=PROFILE, hostname=node,
                    created_at=utcnow(), applied_revision=0, agent_version=agent_version, public_key=public_key))
    record_event(db, actor, "agent.enroll", "agent", agent_id, None,
                 {"workload": pod, "profile": PROFILE, "node": node, "node_agent": node_agent_id,
                  "adopted": True, "key_bound": True})
    dist.agents[agent_id] = AgentLive(agent_id, pod, token_hash)
    keys.set_key(agent_id, public_key)
    txn.undo.append(lambda: dist.agents.pop(agent_id, None))
    txn.undo.append(lambda: keys.forget(agent_id))
    return PodEnrolled(agent_id, f"agt_{agent_id}_{secret}", pod)
