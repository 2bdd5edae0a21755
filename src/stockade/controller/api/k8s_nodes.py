"""The node agent's one extra call (issue 15): an agent identity for a pod bound to its node.

``POST /agents/{agent_id}/pods/enroll`` ``{workload, public_key, agent_version}`` by a node agent
(its own signed credential) returns the pod's credential, as ``/agents/enroll`` does for an
activation code. The rule (pod workload ``k8s.*`` whose ``k8s-node`` label names the caller's
workload) lives in :mod:`stockade.controller.services.pod_enrolment`.

The node protocol (:mod:`stockade.controller.services.node_distribution`): one request per node
instead of one per pod, every pod keeping its own identity, revision and acknowledgement::

    POST /agents/{node}/pods/enroll-batch  {pods: [{workload, public_key}], agent_version, include_policy}
         -> 200 {enrolled: [as pods/enroll], refused: [{workload, status, message}]}
         each pod authorised and audited as pods/enroll does it (one transaction)
    POST /agents/{node}/pods/updates  {pods: [{agent_id, revision}], acks: [{agent_id, revision}], timeout}
         long-poll -> {pods: [{agent_id, workload, revision, policy}], gone: [agent_id]}
         ``policy``: the pod's GET /agents/{pod}/policy?since=<revision held>
    POST /agents/{node}/pods/acks  {acks: [{agent_id, revision}]}  -> {gone}

Both mark every pod they name alive (the node's requests are its pods' heartbeats). A pod
identity this node did not enrol refuses the whole request (403).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from stockade.compiler.delta import PolicyUpdate, policy_update_to_dict
from stockade.controller.api.dto.k8s_nodes import (
    PodAcksIn,
    PodAcksOut,
    PodEnrollBatchIn,
    PodEnrollBatchOut,
    PodEnrollIn,
    PodEnrollOut,
    PodRefusedOut,
    PodRevision,
    PodUpdatesIn,
    PodUpdatesOut,
)
from stockade.controller.api.schemas import ErrorOut
from stockade.controller.context import Controller, controller_of, require
from stockade.controller.services import node_distribution, pod_enrolment
from stockade.controller.services.auth import ForbiddenError, Permission, Principal
from stockade.controller.services.node_distribution import HeldPod, NodeDistribution, Resolved
from stockade.errors import AuthError, ConflictError, NotFoundError, StockadeError

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}


@router.post("/agents/{agent_id}/pods/enroll", tags=["Agent protocol"], responses=ERRORS, status_code=201,
             operation_id="enroll-pod")
def enroll_pod(request: Request, agent_id: str, body: PodEnrollIn,
               principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> PodEnrollOut:
    _self(principal, agent_id)
    ctl = controller_of(request)
    out = pod_enrolment.enrol_pod(ctl.dist, ctl.agent_keys, agent_id, principal.workload, body.workload,
                                  body.public_key, body.agent_version)
    return _enrolled(ctl, out, body.include_policy)


def _self(principal: Principal, agent_id: str) -> None:
    if principal.agent_id != agent_id:
        raise ForbiddenError("an agent may only act for itself")


def _enrolled(ctl: Controller, out: pod_enrolment.PodEnrolled, include_policy: bool) -> PodEnrollOut:
    policy: dict[str, Any] | None = None
    if include_policy:
        # the pod's first policy in the same answer: its node agent applies it at once (the pod waits at
        # the CNI's default-deny meanwhile), instead of after its runtime's enrolment and first long-poll
        try:
            policy = policy_update_to_dict(ctl.dist.fetch(out.workload, None))
        except StockadeError:
            policy = None  # nothing compiled for it yet: the runtime's long-poll brings it
    return PodEnrollOut(agent_id=out.agent_id, token=out.token, workload=out.workload,
                        revision=ctl.dist.revisions.get(out.workload, 0), policy=policy)


def _refusal_status(exc: StockadeError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, AuthError):
        return 403
    return 422


@router.post("/agents/{agent_id}/pods/enroll-batch", tags=["Agent protocol"], responses=ERRORS,
             operation_id="enroll-pods")
def enroll_pods(request: Request, agent_id: str, body: PodEnrollBatchIn,
                principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> PodEnrollBatchOut:
    """Enrol many pods of this node in one request (one transaction): each one authorised and audited
    as ``pods/enroll`` does it; a refused pod is listed with its status and does not stop the others."""
    _self(principal, agent_id)
    ctl = controller_of(request)
    wanted = [pod_enrolment.PodRequest(p.workload, p.public_key) for p in body.pods]
    results = pod_enrolment.enrol_pods(ctl.dist, ctl.agent_keys, agent_id, principal.workload, wanted,
                                       body.agent_version)
    enrolled: list[PodEnrollOut] = []
    refused: list[PodRefusedOut] = []
    for req, got in zip(wanted, results, strict=True):
        if isinstance(got, StockadeError):
            refused.append(PodRefusedOut(workload=req.workload, status=_refusal_status(got), message=str(got)))
        else:
            enrolled.append(_enrolled(ctl, got, body.include_policy))
    return PodEnrollBatchOut(enrolled=enrolled, refused=refused)


async def _resolve(ctl: Controller, nodes: NodeDistribution, node: str, pods: list[PodRevision]) -> Resolved:
    unknown = nodes.unknown([p.agent_id for p in pods])
    if unknown:
        await run_in_threadpool(nodes.load, unknown)
    return nodes.resolve(node, [(p.agent_id, p.revision) for p in pods])


@router.post("/agents/{agent_id}/pods/updates", tags=["Agent protocol"], responses=ERRORS,
             operation_id="wait-for-pod-updates", response_model=PodUpdatesOut)
async def wait_for_pod_updates(request: Request, agent_id: str, body: PodUpdatesIn,
                               principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """The node's one long-poll for all its pods: answers as soon as one of them has a revision
    above the one the node holds (or at the timeout) with each moved pod's update."""
    _self(principal, agent_id)
    ctl = controller_of(request)
    nodes = node_distribution.for_dist(ctl.dist)
    node = principal.workload
    held = await _resolve(ctl, nodes, node, body.pods)
    acked = await _resolve(ctl, nodes, node, body.acks) if body.acks else None
    if acked is not None:
        nodes.ack(acked.bound, {p.agent_id: p.after for p in acked.bound})
    nodes.ack(held.bound, {})  # alive
    if ctl.dist.loop is None:  # served without lifespan (tests on an ASGI transport)
        ctl.dist.loop = asyncio.get_running_loop()
    if ctl.dist.shared and any(p.after > ctl.dist.revisions.get(p.workload, 0) for p in held.bound):
        await run_in_threadpool(ctl.dist.follow_changes)  # heard of on another replica
    ctl.metrics.waiting.inc()
    try:
        moved = await nodes.wait(node, held.bound, min(body.timeout, ctl.settings.long_poll_max))
    finally:
        ctl.metrics.waiting.dec()
    out: list[tuple[HeldPod, PolicyUpdate]] = []
    for p in moved:
        upd = ctl.dist.fetch_nowait(p.workload, p.after or None)
        if upd is None:
            upd = await run_in_threadpool(nodes.update_for, p)
        if upd is not None:
            out.append((p, upd))
    nodes.ack(held.bound, {})  # alive at the answer too: a poll held 20 s is not a silence
    # hot path of every node: JSON written directly, shared set deltas encoded once (the schema is PodUpdatesOut)
    return Response(node_distribution.encode_answer(out, held.gone), media_type="application/json")


@router.post("/agents/{agent_id}/pods/acks", tags=["Agent protocol"], responses=ERRORS,
             operation_id="ack-pod-policies")
async def ack_pod_policies(request: Request, agent_id: str, body: PodAcksIn,
                           principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> PodAcksOut:
    """One batch of the node's pods' acknowledgements (each pod still has its own applied revision)."""
    _self(principal, agent_id)
    ctl = controller_of(request)
    nodes = node_distribution.for_dist(ctl.dist)
    resolved = await _resolve(ctl, nodes, principal.workload, body.acks)
    nodes.ack(resolved.bound, {p.agent_id: p.after for p in resolved.bound})
    return PodAcksOut(gone=list(resolved.gone))
