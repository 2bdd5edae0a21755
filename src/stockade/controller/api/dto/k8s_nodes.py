"""Bodies of :mod:`stockade.controller.api.k8s_nodes` (a node agent enrolling a pod of its node)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

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
