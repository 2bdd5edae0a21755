"""Request and response bodies of :mod:`stockade.controller.api.agents`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, Field

from stockade.controller.api.dto import Strict
from stockade.controller.api.schemas import (
    MAX_INTERFACES,
    NAME_PATTERN,
    InterfaceBody,
    StrictInt,
)
from stockade.controller.services import enrolment

PublicKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$", description="Ed25519, base64url, no padding")]

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class CodeIn(Strict):
    max_uses: Annotated[StrictInt | None, Field(ge=1, le=1_000_000, description="default: the profile's")] = None
    ttl_seconds: Annotated[StrictInt | None, Field(ge=60, le=enrolment.MAX_CODE_TTL)] = None
    workload: Annotated[str | None, Field(pattern=NAME_PATTERN,
                                          description="adoption code: enrols as this workload only")] = None


class CodeOut(BaseModel):
    id: str
    profile: str
    code: str = Field(description="shown once")
    max_uses: int
    expires_at: dt.datetime
    workload: str | None


class CodeInfoOut(BaseModel):
    id: str
    profile: str
    created_at: dt.datetime
    max_uses: int | None
    uses: int
    expires_at: dt.datetime | None
    workload: str | None
    revoked: bool


class EnrollIn(Strict):
    activation_code: Annotated[str, Field(min_length=8, max_length=128)]
    hostname: Name
    interfaces: list[InterfaceBody] = Field(default_factory=list, max_length=MAX_INTERFACES)
    agent_version: Annotated[str, Field(max_length=64)] = ""
    public_key: PublicKey | None = Field(None, description="the agent's Ed25519 key: every later request is "
                                                           "signed with it (stockade.agent_signature)")


class EnrollOut(BaseModel):
    agent_id: str
    token: str
    workload: str
    revision: int
    key_bound: bool
    quarantined: bool


class InterfacesIn(Strict):
    interfaces: Annotated[list[InterfaceBody], Field(max_length=MAX_INTERFACES)]


class ReportOut(BaseModel):
    revision: int
    held: bool = Field(False, description="a new agent process's address change, applied after its probation")
    quarantined: bool = False


class KeyIn(Strict):
    public_key: PublicKey
    proof: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{86}$", description="the new key's signature over "
                                "stockade.agent_signature.rotation_message")]


class SessionIn(Strict):
    public_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$",
                                     description="the agent's fresh X25519 key, base64url, no padding")]


class SessionOut(BaseModel):
    session: str  # X-Stockade-Session of the requests on it
    public_key: str  # the replica's fresh X25519 key (stockade.agent_session.derive_session_key)
    expires_in: int  # seconds


class WireGuardKeyIn(Strict):
    public_key: Annotated[str, Field(max_length=64, description="base64 of the 32-byte Curve25519 public key")]
    endpoint: Annotated[str | None, Field(None, max_length=45,
                                          description="the address peers send to: one of the workload's own")]
    port: Annotated[StrictInt, Field(ge=1, le=65535, description="the UDP port WireGuard listens on")] = 51820


class RevisionOut(BaseModel):
    revision: int


class PolicyOut(BaseModel):
    revision: int
    full: dict[str, Any] | None
    base: int | None = None
    set_deltas: list[dict[str, Any]] = Field(default_factory=list)


class WaitOut(BaseModel):
    revision: int
    changed: bool
    policy: PolicyOut | None = Field(None, description="with include_policy=true and changed: the fetch answer")
    heartbeat: bool = Field(True, description="the long-poll counted as the agent's heartbeat: an agent that "
                                              "long-polls may send POST .../heartbeat only to report its state")
    hold: float | None = Field(None, description="seconds the controller advertises for the next long-poll's "
                                                 "timeout (the agent jitters it and caps it at its own limit); "
                                                 "a held long-poll keeps the agent online however long")


class AckIn(Strict):
    revision: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


class AgentOut(BaseModel):
    id: str
    workload: str
    hostname: str
    profile: str
    created_at: dt.datetime
    revoked: bool
    desired_revision: int
    applied_revision: int
    converged: bool
    last_heartbeat: dt.datetime | None
    status: str  # online / offline / revoked
    key_bound: bool = Field(description="requests must be signed with the agent's host key")
    quarantined: bool
    quarantine_reason: str | None
    enforcement: str = Field(
        "pending",
        description="proven: the kernel was proven to give every packet the applied revision's verdict; "
        "differs: a proof found a packet it treats otherwise (see proof_detail); applied: applied, not "
        "(yet) proven at that revision; pending: nothing applied",
    )
    proof_detail: str | None = None
    backend: str | None = Field(None, description="the firewall backend in force, as the agent last reported it")
    backends: list[str] = Field(default_factory=list, description="the backends the agent can enforce with")


class ConvergenceOut(BaseModel):
    agents: int
    online: int
    offline: int
    converged: int
    lagging_count: int
    lagging: list[str] = Field(description="workloads behind their desired revision (first `limit`)")


BackendName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class HeartbeatIn(Strict):
    """What an agent says with its heartbeat (every field optional: older agents send less)."""

    applied_revision: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    mode: Annotated[str, Field(max_length=16)] = ""
    tamper_count: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = 0
    backend: Annotated[str, Field(pattern=r"^([a-z][a-z0-9_-]{0,31})?$")] = ""
    backends: Annotated[list[BackendName], Field(max_length=16)] = Field(default_factory=list)


class AgentEventIn(Strict):
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
    detail: Annotated[str, Field(max_length=2048)] = ""
    revision: StrictInt | None = None
    time: float | None = None


class AgentEventsIn(Strict):
    events: Annotated[list[AgentEventIn], Field(max_length=500)]
