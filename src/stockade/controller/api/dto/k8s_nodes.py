"""Bodies of :mod:`stockade.controller.api.k8s_nodes` (a node agent enrolling a pod of its node)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StrictInt

from stockade.controller.api.dto import Strict
from stockade.controller.api.schemas import NAME_PATTERN


class PodEnrollIn(Strict):
    workload: Annotated[str, Field(pattern=NAME_PATTERN, description="the pod's workload, k8s.<ns>.<pod>")]
    public_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$", description="the pod identity's Ed25519 key")]
    agent_version: Annotated[str, Field(max_length=64)] = ""
    include_policy: Annotated[bool, Field(description="answer with the pod's compiled policy too (its first "
                                                      "apply needs no further round trip)")] = False


class PodEnrollOut(BaseModel):
    agent_id: str
    token: str
    workload: str
    revision: int
    policy: Annotated[dict[str, Any] | None, Field(description="with include_policy: the answer of GET "
                                                            "/agents/{id}/policy for the new identity")] = None


AGENT_ID = r"^[0-9a-f]{1,64}$"
MAX_NODE_PODS = 1024  # pods one node request may name (Kubernetes' default maximum per node is 110)
Revision = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


class PodRevision(Strict):
    agent_id: Annotated[str, Field(pattern=AGENT_ID, description="a pod identity this node enrolled")]
    revision: Revision


class PodUpdatesIn(Strict):
    pods: Annotated[list[PodRevision], Field(max_length=MAX_NODE_PODS,
                                             description="each pod identity and the revision the node holds for it")]
    acks: Annotated[list[PodRevision], Field(default_factory=list, max_length=MAX_NODE_PODS,
                                             description="revisions now applied (as POST .../pods/acks)")]
    timeout: Annotated[float, Field(ge=0, le=300)] = 30.0


class PodUpdateOut(BaseModel):
    agent_id: str
    workload: str
    revision: int
    policy: Annotated[dict[str, Any], Field(description="the answer of GET /agents/{pod}/policy?since=<held>")]


class PodUpdatesOut(BaseModel):
    pods: list[PodUpdateOut]
    gone: Annotated[list[str], Field(description="identities of this node that get no policy here any more "
                                                "(revoked, or the pod is gone)")]


class PodAcksIn(Strict):
    acks: Annotated[list[PodRevision], Field(max_length=MAX_NODE_PODS)]


class PodAcksOut(BaseModel):
    gone: list[str]


class PodEnrollItem(Strict):
    workload: Annotated[str, Field(pattern=NAME_PATTERN, description="the pod's workload, k8s.<ns>.<pod>")]
    public_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$", description="the pod identity's Ed25519 key")]


class PodEnrollBatchIn(Strict):
    pods: Annotated[list[PodEnrollItem], Field(min_length=1, max_length=256)]
    agent_version: Annotated[str, Field(max_length=64)] = ""
    include_policy: bool = False


class PodRefusedOut(BaseModel):
    workload: str
    status: int
    message: str


class PodEnrollBatchOut(BaseModel):
    enrolled: list[PodEnrollOut]
    refused: list[PodRefusedOut]
