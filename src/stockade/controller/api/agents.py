"""Pairing profiles, activation codes, agent enrolment and the agent protocol.

Operator side (admin): ``/pairing-profiles`` CRUD (preset labels, enforcement mode, expiry,
maximum uses, enabled), versioned like every object: a revision bumped by each effective edit
and an ``ETag`` on GET/POST/PUT answers; ``PUT``/``DELETE`` with a stale ``If-Match`` answer
412 and change nothing. The ETag covers the operator's settings, not the use counter, so an
enrolment does not make an operator's pending edit stale.
``POST /pairing-profiles/{name}/codes`` returns an activation code once (only its SHA-256
is kept); ``DELETE /pairing-profiles/{name}/codes/{id}`` revokes it;
``GET /agents`` lists agents with convergence (desired vs applied revision, last heartbeat,
online/offline after ``offline_after`` seconds); ``POST /agents/{id}/revoke``.

Agent side, the protocol the agent (issue 5) implements::

    POST /api/v1/agents/enroll        {activation_code, hostname, interfaces, agent_version}
         -> 201 {agent_id, token, workload, revision}
         The workload named ``hostname`` is created with the profile's labels and mode (or an
         existing workload without a live agent is adopted). Refused (403) when the code is
         unknown or revoked, or the profile is disabled, expired or used up. Rate limited.
    then every call carries  Authorization: Bearer <token>   (agt_<agent-id>_<secret>)
    PUT  /api/v1/agents/{id}/interfaces  {interfaces: [{name, addresses}]}
         updates the workload's addresses, hence every peer's address sets -> {revision}
    POST /api/v1/agents/{id}/heartbeat   {}  -> {revision}  (the desired revision)
    GET  /api/v1/agents/{id}/policy/wait?after=REV&timeout=S[&include_policy=true][&applied=A]
         long-poll: answers as soon as the host's revision exceeds REV, or at the timeout,
         with {revision, changed, policy}; with include_policy=true and changed, ``policy`` is
         the answer of GET .../policy?since=REV (one round trip fewer), else null.
         ``applied=A`` acknowledges revision A like POST .../ack, so an agent that loops
         wait(include_policy, applied) -> apply needs one request per policy change
    GET  /api/v1/agents/{id}/policy[?since=REV]
         {revision, full: HostPolicy JSON (stockade.compiler.ir.host_policy_to_dict) | null,
          base, set_deltas: [{name, family, added, removed}]}; with ``since`` = an earlier
         revision whose rules equal the current ones, only set deltas are sent (full=null);
         since = current revision: nothing to do (full=null, no deltas)
    POST /api/v1/agents/{id}/ack  {revision}  -> 204   (the revision now applied)
    POST /api/v1/agents/{id}/events  {events: [{kind, detail, revision, time}]}  -> 204
         recorded as audit events ``agent.<kind>`` (kind ``agent``, name = the workload)
    POST /api/v1/agents/{id}/unenroll  -> 204   (the agent revokes itself)

Credential choice: a per-agent bearer token (256 random bits, SHA-256 at rest) rather than a
client certificate. Revocation is a flag checked on every request (no CRL distribution), the
token works through any TLS-terminating proxy and from agents on every OS, and uvicorn does
not hand the peer certificate to the application. The channel itself is TLS with the
controller's CA, which the agent pins at enrolment.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from stockade.compiler.delta import policy_update_to_dict
from stockade.controller.api.schemas import NAME_PATTERN, ErrorOut, InterfaceBody, Text
from stockade.controller.context import Controller, controller_of, require
from stockade.controller.services import auth
from stockade.controller.services.auth import ForbiddenError, Permission, Principal
from stockade.controller.services.distribution import AgentLive, CompilerTxn
from stockade.controller.services.events import record_event
from stockade.controller.storage import store
from stockade.controller.storage.db import ActivationCodeRow, AgentRow, PairingProfileRow, utcnow
from stockade.errors import ConflictError, Issue, NotFoundError, ValidationError
from stockade.model.workloads import EnforcementMode

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
EDIT_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 412: {"model": ErrorOut}}
IfMatch = Annotated[str | None, Header(max_length=200, description="ETag of the profile as last read")]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairingProfileIn(Strict):
    name: Name
    labels: dict[Name, Name] = Field(default_factory=dict)
    mode: EnforcementMode = EnforcementMode.VISIBILITY
    expires_at: dt.datetime | None = None
    max_uses: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    enabled: bool = True
    description: Text = ""


class PairingProfileOut(PairingProfileIn):
    uses: int
    revision: int
    etag: str


class CodeOut(BaseModel):
    id: str
    profile: str
    code: str = Field(description="shown once")


class EnrollIn(Strict):
    activation_code: Annotated[str, Field(min_length=8, max_length=128)]
    hostname: Name
    interfaces: list[InterfaceBody] = Field(default_factory=list)
    agent_version: Annotated[str, Field(max_length=64)] = ""


class EnrollOut(BaseModel):
    agent_id: str
    token: str
    workload: str
    revision: int


class InterfacesIn(Strict):
    interfaces: list[InterfaceBody]


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


class AckIn(Strict):
    revision: Annotated[int, Field(ge=0, le=2**31 - 1)]


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


class ConvergenceOut(BaseModel):
    agents: int
    online: int
    offline: int
    converged: int
    lagging_count: int
    lagging: list[str] = Field(description="workloads behind their desired revision (first `limit`)")


# ---- pairing profiles --------------------------------------------------------------------


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """As stored (and read back) on every backend, so an ETag is the same before and after a reload."""
    if value is None:
        return None
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _profile_settings(p: PairingProfileRow) -> PairingProfileIn:
    return PairingProfileIn(name=p.name, labels=dict(p.labels), mode=EnforcementMode(p.mode),
                            expires_at=_utc(p.expires_at), max_uses=p.max_uses, enabled=p.enabled,
                            description=p.description)


def _profile_etag(p: PairingProfileRow) -> str:
    """Revision + digest of the settings and creation time (not ``uses``, which enrolment counts)."""
    state = {**_profile_settings(p).model_dump(mode="json"), "created_at": p.created_at.astimezone(dt.UTC).isoformat()}
    return store.etag_of(p.revision, state)


def _profile_out(p: PairingProfileRow, response: Response | None = None) -> PairingProfileOut:
    etag = _profile_etag(p)
    if response is not None:
        response.headers["ETag"] = etag
    return PairingProfileOut(**_profile_settings(p).model_dump(), uses=p.uses, revision=p.revision, etag=etag)


def _check_profile_labels(db: Session, labels: dict[str, str]) -> None:
    keys = store.draft_objects(db, ("label_key",))["label_key"]
    issues = []
    for k, v in sorted(labels.items()):
        if k not in keys:
            issues.append(Issue("api", 0, f"labels.{k}", f"unknown label key {k!r}"))
        elif keys[k]["values"] and v not in keys[k]["values"]:
            issues.append(Issue("api", 0, f"labels.{k}", f"value {v!r} not allowed"))
    if issues:
        raise ValidationError(issues)


def _profile(db: Session, name: str) -> PairingProfileRow:
    row = db.get(PairingProfileRow, name)
    if row is None:
        raise NotFoundError(f"no pairing profile {name!r}")
    return row


@router.get("/pairing-profiles", tags=["Pairing profiles"], responses=ERRORS, operation_id="list-pairing-profiles")
def list_profiles(request: Request,
                  principal: Annotated[Principal, Depends(require(Permission.READ))]) -> list[PairingProfileOut]:
    with controller_of(request).session() as db:
        return [_profile_out(p) for p in db.scalars(select(PairingProfileRow).order_by(PairingProfileRow.name))]


@router.post("/pairing-profiles", tags=["Pairing profiles"], responses=ERRORS, status_code=201,
             operation_id="create-pairing-profile")
def create_profile(request: Request, response: Response, body: PairingProfileIn,
                   principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> PairingProfileOut:
    with controller_of(request).sessions.begin() as db:
        if db.get(PairingProfileRow, body.name) is not None:
            raise ConflictError(f"pairing profile {body.name!r} exists")
        _check_profile_labels(db, body.labels)
        row = PairingProfileRow(name=body.name, labels=body.labels, mode=body.mode.value,
                                expires_at=_utc(body.expires_at),
                                max_uses=body.max_uses, uses=0, enabled=body.enabled, description=body.description,
                                revision=1, created_at=utcnow())
        db.add(row)
        db.flush()
        record_event(db, principal.actor, "pairing_profile.create", "pairing_profile", body.name, None,
                     body.model_dump(mode="json"))
        return _profile_out(row, response)


@router.get("/pairing-profiles/{name}", tags=["Pairing profiles"], responses=ERRORS,
            operation_id="get-pairing-profile")
def get_profile(request: Request, response: Response, name: str,
                principal: Annotated[Principal, Depends(require(Permission.READ))]) -> PairingProfileOut:
    with controller_of(request).session() as db:
        return _profile_out(_profile(db, name), response)


@router.put("/pairing-profiles/{name}", tags=["Pairing profiles"], responses=EDIT_ERRORS,
            operation_id="replace-pairing-profile")
def replace_profile(request: Request, response: Response, name: str, body: PairingProfileIn,
                    principal: Annotated[Principal, Depends(require(Permission.WRITE))],
                    if_match: IfMatch = None) -> PairingProfileOut:
    if body.name != name:
        raise ValidationError([Issue("api", 0, "name", "body name differs from the URL")])
    with controller_of(request).sessions.begin() as db:
        row = _profile(db, name)
        store.check_if_match(if_match, _profile_etag(row))
        before = _profile_settings(row).model_dump(mode="json")
        wanted = body.model_copy(update={"expires_at": _utc(body.expires_at)})
        after = wanted.model_dump(mode="json")
        if after == before:
            return _profile_out(row, response)
        _check_profile_labels(db, body.labels)
        row.labels, row.mode, row.expires_at = body.labels, body.mode.value, wanted.expires_at
        row.max_uses, row.enabled, row.description = body.max_uses, body.enabled, body.description
        row.revision += 1
        record_event(db, principal.actor, "pairing_profile.update", "pairing_profile", name, before, after)
        return _profile_out(row, response)


@router.delete("/pairing-profiles/{name}", tags=["Pairing profiles"], responses=EDIT_ERRORS, status_code=204,
               operation_id="delete-pairing-profile")
def delete_profile(request: Request, name: str,
                   principal: Annotated[Principal, Depends(require(Permission.WRITE))],
                   if_match: IfMatch = None) -> Response:
    with controller_of(request).sessions.begin() as db:
        row = _profile(db, name)
        store.check_if_match(if_match, _profile_etag(row))
        for code in db.scalars(select(ActivationCodeRow).where(ActivationCodeRow.profile == name)):
            db.delete(code)
        db.delete(row)
        record_event(db, principal.actor, "pairing_profile.delete", "pairing_profile", name, None, None)
    return Response(status_code=204)


@router.post("/pairing-profiles/{name}/codes", tags=["Pairing profiles"], responses=ERRORS, status_code=201,
             operation_id="create-activation-code")
def create_code(request: Request, name: str,
                principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> CodeOut:
    with controller_of(request).sessions.begin() as db:
        _profile(db, name)
        code_id = secrets.token_hex(6)
        code = f"act_{secrets.token_urlsafe(24)}"
        db.add(ActivationCodeRow(id=code_id, code_hash=auth.sha256(code), profile=name, created_at=utcnow(),
                                 revoked=False))
        record_event(db, principal.actor, "activation_code.create", "pairing_profile", name, None, {"id": code_id})
    return CodeOut(id=code_id, profile=name, code=code)


@router.delete("/pairing-profiles/{name}/codes/{code_id}", tags=["Pairing profiles"], responses=ERRORS,
               status_code=204, operation_id="revoke-activation-code")
def revoke_code(request: Request, name: str, code_id: str,
                principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> Response:
    with controller_of(request).sessions.begin() as db:
        row = db.get(ActivationCodeRow, code_id)
        if row is None or row.profile != name:
            raise NotFoundError(f"no activation code {code_id!r} in profile {name!r}")
        row.revoked = True
        record_event(db, principal.actor, "activation_code.revoke", "pairing_profile", name, None, {"id": code_id})
    return Response(status_code=204)


# ---- enrolment -----------------------------------------------------------------------------


def _interfaces_json(interfaces: list[InterfaceBody]) -> list[dict[str, Any]]:
    return [i.model_dump(mode="json") for i in interfaces]


def _enroll(ctl: Controller, body: EnrollIn) -> EnrollOut:
    def run(db: Session, txn: CompilerTxn) -> EnrollOut:
        code = db.scalars(
            select(ActivationCodeRow).where(ActivationCodeRow.code_hash == auth.sha256(body.activation_code))
        ).one_or_none()
        if code is None or code.revoked:
            raise ForbiddenError("unknown or revoked activation code")
        profile = db.get(PairingProfileRow, code.profile)
        if profile is None or not profile.enabled:
            raise ForbiddenError("the pairing profile is disabled")
        if profile.expires_at is not None and profile.expires_at <= utcnow():
            raise ForbiddenError("the pairing profile has expired")
        used = db.execute(
            update(PairingProfileRow)
            .where(PairingProfileRow.name == profile.name)
            .where((PairingProfileRow.max_uses.is_(None)) | (PairingProfileRow.uses < PairingProfileRow.max_uses))
            .values(uses=PairingProfileRow.uses + 1)
        )
        if getattr(used, "rowcount", 0) != 1:
            raise ForbiddenError("the pairing profile is used up")
        name = body.hostname
        bound = [a for a in ctl.dist.agents.values() if a.workload == name]
        if bound:
            raise ConflictError(f"workload {name!r} already has an enrolled agent; revoke it first")
        actor = f"enroll:{profile.name}"
        interfaces = _interfaces_json(body.interfaces)
        try:
            current = store.get_object(db, "workload", name)
        except NotFoundError:
            data = {"name": name, "labels": profile.labels, "interfaces": interfaces, "mode": profile.mode}
            obj = store.create_object(db, "workload", data, actor)
        else:
            _b, obj = store.replace_object(db, "workload", name, {**current.body, "interfaces": interfaces}, actor)
        txn.upsert_workload(obj.domain)
        agent_id = secrets.token_hex(8)
        secret = auth.new_secret()
        token_hash = auth.sha256(secret)
        db.add(AgentRow(id=agent_id, workload=name, token_hash=token_hash, profile=profile.name,
                        hostname=body.hostname, created_at=utcnow(), applied_revision=0,
                        agent_version=body.agent_version))
        record_event(db, actor, "agent.enroll", "agent", agent_id, None,
                     {"workload": name, "profile": profile.name, "code": code.id})
        ctl.dist.agents[agent_id] = AgentLive(agent_id, name, token_hash)
        txn.undo.append(lambda: ctl.dist.agents.pop(agent_id, None))
        return EnrollOut(agent_id=agent_id, token=f"agt_{agent_id}_{secret}", workload=name, revision=0)

    out = ctl.dist.transact(run)
    return out.model_copy(update={"revision": ctl.dist.revisions.get(out.workload, 0)})


@router.post("/agents/enroll", tags=["Agent protocol"], responses=ERRORS, status_code=201, operation_id="enroll")
def enroll(request: Request, body: EnrollIn,
           principal: Annotated[Principal, Depends(require(Permission.PUBLIC))]) -> EnrollOut:
    ctl = controller_of(request)
    ctl.enroll_limiter.hit(request.client.host if request.client else "unknown")
    return _enroll(ctl, body)


def _self(principal: Principal, agent_id: str) -> str:
    if principal.agent_id != agent_id:
        raise ForbiddenError("an agent may only act for itself")
    return principal.workload


@router.put("/agents/{agent_id}/interfaces", tags=["Agent protocol"], responses=ERRORS,
            operation_id="report-interfaces")
def report_interfaces(request: Request, agent_id: str, body: InterfacesIn,
                      principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> RevisionOut:
    name = _self(principal, agent_id)
    ctl = controller_of(request)

    def run(db: Session, txn: CompilerTxn) -> None:
        current = store.get_object(db, "workload", name)
        data = {**current.body, "interfaces": _interfaces_json(body.interfaces)}
        _b, after = store.replace_object(db, "workload", name, data, principal.actor)
        if after.revision != current.revision:
            txn.upsert_workload(after.domain)

    ctl.dist.transact(run)
    return RevisionOut(revision=ctl.dist.revisions.get(name, 0))


@router.post("/agents/{agent_id}/heartbeat", tags=["Agent protocol"], responses=ERRORS, operation_id="heartbeat")
async def heartbeat(request: Request, agent_id: str,
                    principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> RevisionOut:
    name = _self(principal, agent_id)
    ctl = controller_of(request)
    ctl.dist.agent_heartbeat(agent_id)
    return RevisionOut(revision=ctl.dist.revisions.get(name, 0))


@router.get("/agents/{agent_id}/policy/wait", tags=["Agent protocol"], responses=ERRORS,
            operation_id="wait-for-policy", response_model=WaitOut)
async def wait_for_policy(
    request: Request,
    agent_id: str,
    principal: Annotated[Principal, Depends(require(Permission.AGENT))],
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    timeout: Annotated[float, Query(ge=0, le=300)] = 30.0,
    include_policy: bool = False,
    applied: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="acknowledge this revision")] = None,
) -> Response:
    name = _self(principal, agent_id)
    ctl = controller_of(request)
    if applied is not None:
        ctl.dist.agent_ack(agent_id, applied)
    if ctl.dist.loop is None:  # served without lifespan (tests on an ASGI transport)
        ctl.dist.loop = asyncio.get_running_loop()
    ctl.metrics.waiting.inc()
    try:
        rev = await ctl.dist.wait(name, after, min(timeout, ctl.settings.long_poll_max))
    finally:
        ctl.metrics.waiting.dec()
    # hot path of every agent: plain JSON, no response-model round trip (the schema is WaitOut)
    if include_policy and rev > after:
        # the answer to GET .../policy?since=after, saving the agent a round trip
        policy = await _fetch(ctl, name, after or None)
        return JSONResponse({"revision": policy["revision"], "changed": True, "policy": policy})
    return JSONResponse({"revision": rev, "changed": rev > after, "policy": None})


async def _fetch(ctl: Controller, workload: str, since: int | None) -> dict[str, Any]:
    got = ctl.dist.fetch_nowait(workload, since)
    if got is None:
        got = await run_in_threadpool(ctl.dist.fetch, workload, since)
    return policy_update_to_dict(got)


@router.get("/agents/{agent_id}/policy", tags=["Agent protocol"], responses=ERRORS, operation_id="fetch-policy",
            response_model=PolicyOut)
async def fetch_policy(
    request: Request,
    agent_id: str,
    principal: Annotated[Principal, Depends(require(Permission.AGENT))],
    since: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> Response:
    name = _self(principal, agent_id)
    return JSONResponse(await _fetch(controller_of(request), name, since))


@router.post("/agents/{agent_id}/ack", tags=["Agent protocol"], responses=ERRORS, status_code=204,
             operation_id="ack-policy")
async def ack_policy(request: Request, agent_id: str, body: AckIn,
                     principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    _self(principal, agent_id)
    controller_of(request).dist.agent_ack(agent_id, body.revision)
    return Response(status_code=204)


class AgentEventIn(Strict):
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
    detail: Annotated[str, Field(max_length=2048)] = ""
    revision: int | None = None
    time: float | None = None


class AgentEventsIn(Strict):
    events: Annotated[list[AgentEventIn], Field(max_length=500)]


@router.post("/agents/{agent_id}/events", tags=["Agent protocol"], responses=ERRORS, status_code=204,
             operation_id="report-agent-events")
def report_agent_events(request: Request, agent_id: str, body: AgentEventsIn,
                        principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """Agent events (tamper restored, policy refused, apply failed...) become audit events
    ``agent.<kind>`` on kind ``agent``, named after the agent's workload."""
    name = _self(principal, agent_id)
    with controller_of(request).sessions.begin() as db:
        for ev in body.events:
            record_event(db, principal.actor, f"agent.{ev.kind}", "agent", name, None,
                         {**ev.model_dump(mode="json"), "agent_id": agent_id})
    return Response(status_code=204)


@router.post("/agents/{agent_id}/unenroll", tags=["Agent protocol"], responses=ERRORS, status_code=204,
             operation_id="unenroll")
def unenroll(request: Request, agent_id: str,
             principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """The agent leaves (``stockade agent uninstall``): its credential stops working."""
    _self(principal, agent_id)
    ctl = controller_of(request)
    with ctl.sessions.begin() as db:
        row = db.get(AgentRow, agent_id)
        if row is not None and row.revoked_at is None:
            row.revoked_at = utcnow()
            record_event(db, principal.actor, "agent.unenroll", "agent", agent_id, None, {"workload": row.workload})
    ctl.dist.agents.pop(agent_id, None)
    return Response(status_code=204)


# ---- operator views -------------------------------------------------------------------------


def _agent_out(ctl: Controller, row: AgentRow, now: dt.datetime) -> AgentOut:
    live = ctl.dist.agents.get(row.id)
    applied = live.applied if live else row.applied_revision
    beat = live.last_heartbeat if live else row.last_heartbeat
    desired = ctl.dist.revisions.get(row.workload, 0)
    if row.revoked_at is not None:
        status = "revoked"
    elif beat is not None and (now - beat).total_seconds() < ctl.settings.offline_after:
        status = "online"
    else:
        status = "offline"
    return AgentOut(id=row.id, workload=row.workload, hostname=row.hostname, profile=row.profile,
                    created_at=row.created_at, revoked=row.revoked_at is not None, desired_revision=desired,
                    applied_revision=applied, converged=applied == desired, last_heartbeat=beat, status=status)


@router.get("/agents", tags=["Agents"], responses=ERRORS, operation_id="list-agents")
def list_agents(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
                workload: Annotated[str | None, Query(max_length=64)] = None) -> list[AgentOut]:
    ctl = controller_of(request)
    now = utcnow()
    with ctl.session() as db:
        q = select(AgentRow).order_by(AgentRow.workload, AgentRow.created_at)
        if workload:
            q = q.where(AgentRow.workload == workload)
        return [_agent_out(ctl, r, now) for r in db.scalars(q)]


@router.get("/agents/{agent_id}", tags=["Agents"], responses=ERRORS, operation_id="get-agent")
def get_agent(request: Request, agent_id: str,
              principal: Annotated[Principal, Depends(require(Permission.READ))]) -> AgentOut:
    ctl = controller_of(request)
    with ctl.session() as db:
        row = db.get(AgentRow, agent_id)
        if row is None:
            raise NotFoundError(f"no agent {agent_id!r}")
        return _agent_out(ctl, row, utcnow())


@router.post("/agents/{agent_id}/revoke", tags=["Agents"], responses=ERRORS, status_code=204,
             operation_id="revoke-agent")
def revoke_agent(request: Request, agent_id: str,
                 principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> Response:
    ctl = controller_of(request)
    with ctl.sessions.begin() as db:
        row = db.get(AgentRow, agent_id)
        if row is None:
            raise NotFoundError(f"no agent {agent_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            record_event(db, principal.actor, "agent.revoke", "agent", agent_id, None, {"workload": row.workload})
    ctl.dist.agents.pop(agent_id, None)
    return Response(status_code=204)


@router.get("/convergence", tags=["Agents"], responses=ERRORS, operation_id="convergence")
def convergence(request: Request,
                principal: Annotated[Principal, Depends(require(Permission.READ))],
                limit: Annotated[int, Query(ge=0, le=100_000)] = 100) -> ConvergenceOut:
    ctl = controller_of(request)
    now = utcnow()
    agents = list(ctl.dist.agents.values())
    online = [a for a in agents if a.last_heartbeat is not None
              and (now - a.last_heartbeat).total_seconds() < ctl.settings.offline_after]
    lagging = sorted(a.workload for a in agents if a.applied != ctl.dist.revisions.get(a.workload, 0))
    return ConvergenceOut(agents=len(agents), online=len(online), offline=len(agents) - len(online),
                          converged=len(agents) - len(lagging), lagging_count=len(lagging),
                          lagging=lagging[:limit])
