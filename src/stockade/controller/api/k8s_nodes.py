"""The node agent's one extra call (issue 15): an agent identity for a pod bound to its node.

``POST /agents/{agent_id}/pods/enroll`` ``{workload, public_key, agent_version}`` by a node agent
(its own signed credential) returns the pod's credential, as ``/agents/enroll`` does for an
activation code. The rule (pod workload ``k8s.*`` whose ``k8s-node`` label names the caller's
workload) lives in :mod:`stockade.controller.services.pod_enrolment`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from stockade.compiler.delta import policy_update_to_dict
from stockade.controller.api.dto.k8s_nodes import PodEnrollIn, PodEnrollOut
from stockade.controller.api.schemas import ErrorOut
from stockade.controller.context import controller_of, require
from stockade.controller.services import pod_enrolment
from stockade.controller.services.auth import ForbiddenError, Permission, Principal
from stockade.errors import StockadeError

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}


@router.post("/agents/{agent_id}/pods/enroll", tags=["Agent protocol"], responses=ERRORS, status_code=201,
             operation_id="enroll-pod")
def enroll_pod(request: Request, agent_id: str, body: PodEnrollIn,
               principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> PodEnrollOut:
    if principal.agent_id != agent_id:
        raise ForbiddenError("an agent may only act for itself")
    ctl = controller_of(request)
    out = pod_enrolment.enrol_pod(ctl.dist, ctl.agent_keys, agent_id, principal.workload, body.workload,
                                  body.public_key, body.agent_version)
    policy: dict[str, Any] | None = None
    if body.include_policy:
        # the pod's first policy in the same answer: its node agent applies it at once (the pod waits at
        # the CNI's default-deny meanwhile), instead of after its runtime's enrolment and first long-poll
        try:
            policy = policy_update_to_dict(ctl.dist.fetch(out.workload, None))
        except StockadeError:
            policy = None  # nothing compiled for it yet: the runtime's long-poll brings it
    return PodEnrollOut(agent_id=out.agent_id, token=out.token, workload=out.workload,
                        revision=ctl.dist.revisions.get(out.workload, 0), policy=policy)
