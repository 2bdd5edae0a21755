"""Activation codes, agent enrolment and the agent protocol (routes only).

The rules and the SQL live in :mod:`stockade.controller.services.enrolment`; the request-signature
check in :mod:`stockade.controller.services.agent_keys`. Here: parsing, authorisation, answers.

Operator side (admin): ``/pairing-profiles`` CRUD (preset labels, enforcement mode, expiry,
maximum uses, enabled, and what each code allows: ``code_max_uses`` default 1,
``code_ttl_seconds`` default one day) is the generic object skeleton of
:mod:`stockade.controller.api.objects` (kind ``pairing_profile``: revision, ``ETag``,
``If-Match``, cursor pages, audit, role and scope), answering in the profiles' own flat shape
with the use counter beside the body. The ETag covers the operator's settings, not the use
counter, so an enrolment does not make an operator's pending edit stale.
``POST /pairing-profiles/{name}/codes`` ``{max_uses?, ttl_seconds?, workload?}`` returns a code
once (only its SHA-256 is kept); with ``workload`` it is an *adoption code*, the only kind that
may enrol as an existing workload; ``GET .../codes`` lists codes (never the code itself);
``DELETE /pairing-profiles/{name}/codes/{id}`` revokes one. ``GET /agents`` lists agents with
convergence, key binding and quarantine; ``POST /agents/{id}/revoke``;
``POST /agents/{id}/quarantine/clear``.

Agent side, the protocol :mod:`stockade.agent.http_client` implements::

    POST /api/v1/agents/enroll   {activation_code, hostname, interfaces, agent_version, public_key}
         -> 201 {agent_id, token, workload, revision, key_bound, quarantined}
         Refused (403) when the code is unknown, revoked, expired or used up, or the profile is
         disabled, expired or used up; 409 when the name is an existing workload and the code is
         not an adoption code for it, or the workload still has a live agent. Rate limited.
    then every call carries  Authorization: Bearer <token>   (agt_<agent-id>_<secret>)
         and, for an agent enrolled with a public key, the signature headers of
         :mod:`stockade.agent_signature` (401 without them, when stale, replayed or wrong)
    PUT  /api/v1/agents/{id}/interfaces  {interfaces: [{name, addresses}]}
         updates the workload's addresses -> {revision, held, quarantined}; held back while
         quarantined, and for a new agent process's first address change until its probation ends
    POST /api/v1/agents/{id}/heartbeat   {}  -> {revision}  (the desired revision)
    GET  /api/v1/agents/{id}/policy/wait?after=REV&timeout=S[&include_policy=true][&applied=A]
         long-poll: answers as soon as the host's revision exceeds REV, or at the timeout,
         with {revision, changed, policy}; with include_policy=true and changed, ``policy`` is
         the answer of GET .../policy?since=REV (one round trip fewer), else null.
         ``applied=A`` acknowledges revision A like POST .../ack; a long-poll counts as the agent's
         heartbeat on arrival and on answer, and while it is held the agent is present (online,
         however long the hold: services/presence.py), so ``heartbeat: true`` in the answer says an
         agent that long-polls needs POST .../heartbeat only to report its state. ``hold`` (seconds)
         is the hold the controller advertises: the agent's next poll asks for it (jittered, up to
         the agent's own cap). A poll whose agent closed the connection stops counting as presence
         at the next presence heartbeat (its last heartbeat is no newer than its leaving).
    GET  /api/v1/agents/{id}/policy[?since=REV]
         {revision, full: HostPolicy JSON | null, base, set_deltas: [{name, family, added, removed}]}
    POST /api/v1/agents/{id}/ack  {revision}  -> 204   (the revision now applied)
    POST /api/v1/agents/{id}/events  {events: [{kind, detail, revision, time}]}  -> 204
         recorded as audit events ``agent.<kind>`` (kind ``agent``, name = the workload)
    POST /api/v1/agents/{id}/key  {public_key, proof}  -> 204   (rotate; the first key of an
         agent enrolled before keys existed is bound this way with the token alone)
    POST /api/v1/agents/{id}/unenroll  -> 204   (the agent revokes itself)
    POST /api/v1/agents/{id}/session  {public_key}  -> {session, public_key, expires_in}
         Ed25519-signed only: later requests may carry a session MAC instead of a signature
         (:mod:`stockade.agent_session`); 401 ``UnknownSessionError`` when this replica does not
         hold the session (the agent signs its retry and opens a new one)

Credential choice: a per-agent bearer token (256 random bits, SHA-256 at rest) names the agent;
an Ed25519 key generated on the host proves every request comes from there. Not a TLS client
certificate: uvicorn does not hand the peer certificate to the application, a TLS-terminating
proxy would drop it, and a signature also binds the request body and time (no replay).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import heapq
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from stockade.agent_signature import INSTANCE_HEADER
from stockade.compiler.delta import PolicyUpdate, policy_update_to_dict
from stockade.controller.api.dto.agents import (
    AckIn,
    AgentEventsIn,
    AgentOut,
    CodeIn,
    CodeInfoOut,
    CodeOut,
    ConvergenceOut,
    EnrollIn,
    EnrollOut,
    HeartbeatIn,
    InterfacesIn,
    KeyIn,
    PolicyOut,
    ReportOut,
    RevisionOut,
    SessionIn,
    SessionOut,
    WaitOut,
    WireGuardKeyIn,
)
from stockade.controller.api.schemas import (
    ErrorOut,
)
from stockade.controller.context import Controller, controller_of, require
from stockade.controller.services import enrolment, wireguard_keys
from stockade.controller.services.agent_keys import SignatureRequiredError
from stockade.controller.services.auth import ForbiddenError, Permission, Principal
from stockade.controller.services.distribution import AgentLive
from stockade.controller.services.node_distribution import update_json
from stockade.controller.storage.db import AgentRow, utcnow
from stockade.errors import NotFoundError

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
PROOF_EVENTS = {"proven": "proven", "proof-differs": "differs", "proof-failed": "failed"}


def _enforcement(live: AgentLive | None, applied: int) -> tuple[str, str | None]:
    """Per-host state from the last proof event the agent reported (this controller process)."""
    if applied == 0:
        return "pending", None
    if live is None or not live.proof or live.proof_revision != applied:
        return "applied", None
    if live.proof == "proven":
        return "proven", live.proof_detail
    if live.proof == "differs":
        return "differs", live.proof_detail
    return "applied", live.proof_detail


# ---- activation codes (the pairing profiles themselves are generic objects: api/objects.py) ---------------


@router.post("/pairing-profiles/{name}/codes", tags=["Pairing profiles"], responses=ERRORS, status_code=201,
             operation_id="create-activation-code")
def create_code(request: Request, name: str,
                principal: Annotated[Principal, Depends(require(Permission.WRITE))],
                body: CodeIn | None = None) -> CodeOut:
    wanted = body or CodeIn()
    with controller_of(request).sessions.begin() as db:
        issued = enrolment.issue_code(db, name, principal.actor, max_uses=wanted.max_uses,
                                      ttl_seconds=wanted.ttl_seconds, workload=wanted.workload)
    return CodeOut(id=issued.id, profile=issued.profile, code=issued.code, max_uses=issued.max_uses,
                   expires_at=issued.expires_at, workload=issued.workload)


@router.get("/pairing-profiles/{name}/codes", tags=["Pairing profiles"], responses=ERRORS,
            operation_id="list-activation-codes")
def list_codes(request: Request, name: str,
               principal: Annotated[Principal, Depends(require(Permission.READ))]) -> list[CodeInfoOut]:
    with controller_of(request).session() as db:
        return [CodeInfoOut(id=c.id, profile=name, created_at=c.created_at, max_uses=c.max_uses, uses=c.uses,
                            expires_at=c.expires_at, workload=c.workload, revoked=c.revoked)
                for c in enrolment.list_codes(db, name)]


@router.delete("/pairing-profiles/{name}/codes/{code_id}", tags=["Pairing profiles"], responses=ERRORS,
               status_code=204, operation_id="revoke-activation-code")
def revoke_code(request: Request, name: str, code_id: str,
                principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> Response:
    with controller_of(request).sessions.begin() as db:
        enrolment.revoke_code(db, name, code_id, principal.actor)
    return Response(status_code=204)


# ---- enrolment and the agent's reports ---------------------------------------------------------


@router.post("/agents/enroll", tags=["Agent protocol"], responses=ERRORS, status_code=201, operation_id="enroll")
def enroll(request: Request, body: EnrollIn,
           principal: Annotated[Principal, Depends(require(Permission.PUBLIC))]) -> EnrollOut:
    ctl = controller_of(request)
    ctl.enroll_limiter.hit(ctl.client_host(request))
    req = enrolment.EnrolRequest(body.activation_code, body.hostname,
                                 tuple(i.model_dump(mode="json") for i in body.interfaces),
                                 body.agent_version, body.public_key)
    out = enrolment.enrol(ctl.dist, ctl.agent_keys, req)
    return EnrollOut(agent_id=out.agent_id, token=out.token, workload=out.workload,
                     revision=ctl.dist.revisions.get(out.workload, 0), key_bound=body.public_key is not None,
                     quarantined=out.quarantined)


def _self(principal: Principal, agent_id: str) -> str:
    if principal.agent_id != agent_id:
        raise ForbiddenError("an agent may only act for itself")
    return principal.workload


@router.put("/agents/{agent_id}/interfaces", tags=["Agent protocol"], responses=ERRORS,
            operation_id="report-interfaces")
def report_interfaces(request: Request, agent_id: str, body: InterfacesIn,
                      principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> ReportOut:
    name = _self(principal, agent_id)
    ctl = controller_of(request)
    instance = request.headers.get(INSTANCE_HEADER, "")
    on_probation = ctl.agent_keys.on_probation(agent_id, instance)
    outcome = enrolment.report_interfaces(ctl.dist, agent_id, name,
                                          [i.model_dump(mode="json") for i in body.interfaces], principal.actor,
                                          hold_changes=on_probation)
    if outcome is enrolment.ReportOutcome.HELD:
        ctl.agent_keys.hold(agent_id, instance)
    elif outcome is enrolment.ReportOutcome.QUARANTINED:
        ctl.agent_keys.drop_sessions(agent_id)  # a quarantined agent proves each request with its key again
    return ReportOut(revision=ctl.dist.revisions.get(name, 0), held=outcome is enrolment.ReportOutcome.HELD,
                     quarantined=outcome is enrolment.ReportOutcome.QUARANTINED)


@router.post("/agents/{agent_id}/heartbeat", tags=["Agent protocol"], responses=ERRORS, operation_id="heartbeat")
async def heartbeat(request: Request, agent_id: str,
                    principal: Annotated[Principal, Depends(require(Permission.AGENT))],
                    body: HeartbeatIn | None = None) -> RevisionOut:
    name = _self(principal, agent_id)
    ctl = controller_of(request)
    ctl.dist.agent_heartbeat(agent_id)
    live = ctl.dist.agents.get(agent_id)
    if live is not None and body is not None and body.backend:
        live.backend, live.backends = body.backend, tuple(sorted(set(body.backends)))
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
    ctl.dist.agent_heartbeat(agent_id)  # a long-poll is a heartbeat: one request per agent where there were two
    if ctl.dist.loop is None:  # served without lifespan (tests on an ASGI transport)
        ctl.dist.loop = asyncio.get_running_loop()
    held = min(timeout, ctl.settings.long_poll_max)
    ctl.metrics.waiting.inc()
    probe = request.is_disconnected  # asked at each presence heartbeat (services/presence.py)
    ctl.presence.enter(agent_id, probe)  # held: present, whatever the hold's length
    try:
        rev = await ctl.dist.wait(name, after, held)
    finally:
        connected = ctl.presence.leave(agent_id, probe)
        ctl.metrics.waiting.dec()
    if not connected:  # found gone by a presence heartbeat: no heartbeat now, and nobody reads an answer
        return Response(status_code=204)
    ctl.dist.agent_heartbeat(agent_id)
    # hot path of every agent: plain JSON, no response-model round trip (the schema is WaitOut);
    # ``hold``: how long the agent's next poll should ask to be held (it adds jitter, up to its cap)
    hold = ctl.settings.long_poll_hold
    if include_policy and rev > after:
        # the answer to GET .../policy?since=after, saving the agent a round trip; written as text around
        # the update's, whose set deltas are encoded once per process (a global change: 25,000 answers
        # sharing a label set's deltas), not a dict per answer through JSONResponse
        update = await _update(ctl, name, after or None)
        body = (f'{{"revision":{update.revision:d},"changed":true,"policy":{update_json(update)},'
                f'"heartbeat":true,"hold":{_json_number(hold)}}}')
        return Response(body.encode(), media_type="application/json")
    # (the bytes JSONResponse renders for {"revision", "changed", "policy": None, "heartbeat": True, "hold"},
    # written directly: every held poll of every agent ends here; tests/api/test_wait_answer.py compares)
    body = (f'{{"revision":{rev:d},"changed":{"true" if rev > after else "false"},"policy":null,'
            f'"heartbeat":true,"hold":{_json_number(hold)}}}')
    return Response(body.encode(), media_type="application/json")


@functools.lru_cache(maxsize=64, typed=True)
def _json_number(value: float) -> str:
    """``json.dumps(value)``, once per value (the advertised hold: the same setting in every answer)."""
    return json.dumps(value)


async def _update(ctl: Controller, workload: str, since: int | None) -> PolicyUpdate:
    if since is not None and since > ctl.dist.revisions.get(workload, 0) and ctl.dist.shared:
        # the agent heard of a revision on another replica that this one has not followed yet
        await run_in_threadpool(ctl.dist.follow_changes)
    got = ctl.dist.fetch_nowait(workload, since)
    if got is None:  # its history is not built yet (a follower's pending steps): under the lock
        got = await run_in_threadpool(ctl.dist.fetch, workload, since)
    return got


async def _fetch(ctl: Controller, workload: str, since: int | None) -> dict[str, Any]:
    return policy_update_to_dict(await _update(ctl, workload, since))


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


@router.post("/agents/{agent_id}/events", tags=["Agent protocol"], responses=ERRORS, status_code=204,
             operation_id="report-agent-events")
def report_agent_events(request: Request, agent_id: str, body: AgentEventsIn,
                        principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """Agent events (tamper restored, policy refused, apply failed...) become audit events
    ``agent.<kind>`` on kind ``agent``, named after the agent's workload."""
    name = _self(principal, agent_id)
    with controller_of(request).sessions.begin() as db:
        enrolment.record_agent_events(db, agent_id, name, principal.actor,
                                      [ev.model_dump(mode="json") for ev in body.events])
    live = controller_of(request).dist.agents.get(agent_id)
    for ev in body.events:
        if live is not None and ev.kind in PROOF_EVENTS and ev.revision is not None:
            live.proof, live.proof_revision, live.proof_detail = PROOF_EVENTS[ev.kind], ev.revision, ev.detail
    return Response(status_code=204)


@router.post("/agents/{agent_id}/key", tags=["Agent protocol"], responses=ERRORS, status_code=204,
             operation_id="rotate-agent-key")
def rotate_key(request: Request, agent_id: str, body: KeyIn,
               principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """Replace the agent's key: this request is signed with the old key, ``proof`` with the new one."""
    _self(principal, agent_id)
    if getattr(request.state, "agent_proof", None) == "session":
        raise SignatureRequiredError("a key rotation is Ed25519-signed, not made on a session")
    ctl = controller_of(request)
    enrolment.rotate_key(ctl.dist, ctl.agent_keys, agent_id, body.public_key, body.proof, principal.actor)
    return Response(status_code=204)


@router.post("/agents/{agent_id}/session", tags=["Agent protocol"], responses=ERRORS, operation_id="open-session")
async def open_session(request: Request, agent_id: str, body: SessionIn,
                       principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> SessionOut:
    """A request session bound to the agent's key (this request is Ed25519-signed): later requests
    carry an HMAC with the session's key instead of a signature."""
    _self(principal, agent_id)
    opened = await controller_of(request).agent_keys.open_session(request, agent_id, body.public_key)
    return SessionOut(session=opened.session, public_key=opened.public_key, expires_in=opened.expires_in)


@router.put("/agents/{agent_id}/wireguard-key", tags=["Agent protocol"], responses=ERRORS, status_code=204,
            operation_id="register-wireguard-key")
def register_wireguard_key(request: Request, agent_id: str, body: WireGuardKeyIn,
                           principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """Register (or rotate) the workload's WireGuard public key; the private key stays on the host."""
    name = _self(principal, agent_id)
    wireguard_keys.register_key(controller_of(request).dist, agent_id, name, body.public_key, body.endpoint,
                                body.port, principal.actor)
    return Response(status_code=204)


@router.delete("/workloads/{name}/wireguard-key", tags=["Agents"], responses=ERRORS, status_code=204,
               operation_id="revoke-wireguard-key")
def revoke_wireguard_key(request: Request, name: str,
                         principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> Response:
    """Revoke a workload's WireGuard key: every peer drops it with its next revision."""
    if not wireguard_keys.revoke_key(controller_of(request).dist, name, principal.actor):
        raise NotFoundError(f"workload {name!r} has no WireGuard key")
    return Response(status_code=204)


@router.post("/agents/{agent_id}/unenroll", tags=["Agent protocol"], responses=ERRORS, status_code=204,
             operation_id="unenroll")
def unenroll(request: Request, agent_id: str,
             principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> Response:
    """The agent leaves (``stockade agent uninstall``): its credential stops working."""
    _self(principal, agent_id)
    ctl = controller_of(request)
    enrolment.end_agent(ctl.dist, ctl.agent_keys, agent_id, principal.actor, "agent.unenroll")
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
    enforcement, proof_detail = _enforcement(live, applied)
    return AgentOut(id=row.id, workload=row.workload, hostname=row.hostname, profile=row.profile,
                    created_at=row.created_at, revoked=row.revoked_at is not None, desired_revision=desired,
                    applied_revision=applied, converged=applied == desired, last_heartbeat=beat, status=status,
                    key_bound=row.public_key is not None, quarantined=row.quarantined_at is not None,
                    quarantine_reason=row.quarantine_reason, enforcement=enforcement, proof_detail=proof_detail,
                    backend=live.backend or None if live else None, backends=list(live.backends) if live else [])


@router.get("/agents", tags=["Agents"], responses=ERRORS, operation_id="list-agents")
def list_agents(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
                workload: Annotated[str | None, Query(max_length=64)] = None) -> list[AgentOut]:
    ctl = controller_of(request)
    now = utcnow()
    with ctl.session() as db:
        return [_agent_out(ctl, r, now) for r in enrolment.list_agents(db, workload)]


@router.get("/agents/{agent_id}", tags=["Agents"], responses=ERRORS, operation_id="get-agent")
def get_agent(request: Request, agent_id: str,
              principal: Annotated[Principal, Depends(require(Permission.READ))]) -> AgentOut:
    ctl = controller_of(request)
    with ctl.session() as db:
        return _agent_out(ctl, enrolment.get_agent(db, agent_id), utcnow())


@router.post("/agents/{agent_id}/revoke", tags=["Agents"], responses=ERRORS, status_code=204,
             operation_id="revoke-agent")
def revoke_agent(request: Request, agent_id: str,
                 principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> Response:
    ctl = controller_of(request)
    enrolment.end_agent(ctl.dist, ctl.agent_keys, agent_id, principal.actor, "agent.revoke")
    return Response(status_code=204)


@router.post("/agents/{agent_id}/quarantine/clear", tags=["Agents"], responses=ERRORS, status_code=204,
             operation_id="clear-agent-quarantine")
def clear_quarantine(request: Request, agent_id: str,
                     principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> Response:
    """Lift the quarantine and apply the agent's last held-back interface report."""
    ctl = controller_of(request)
    enrolment.clear_quarantine(ctl.dist, ctl.agent_keys, agent_id, principal.actor)
    return Response(status_code=204)


@router.get("/convergence", tags=["Agents"], responses=ERRORS, operation_id="convergence")
def convergence(request: Request,
                principal: Annotated[Principal, Depends(require(Permission.READ))],
                limit: Annotated[int, Query(ge=0, le=100_000)] = 100) -> ConvergenceOut:
    ctl = controller_of(request)
    fresh = utcnow() - dt.timedelta(seconds=ctl.settings.offline_after)  # online: heard from after this
    agents = list(ctl.dist.agents.values())  # (a walk of every agent: comparisons only, as check_liveness)
    online = sum(1 for a in agents if a.last_heartbeat is not None and a.last_heartbeat > fresh)
    revisions = ctl.dist.revisions
    lagging = [a.workload for a in agents if a.applied != revisions.get(a.workload, 0)]
    return ConvergenceOut(agents=len(agents), online=online, offline=len(agents) - online,
                          converged=len(agents) - len(lagging), lagging_count=len(lagging),
                          lagging=heapq.nsmallest(limit, lagging))  # the first names, not all 25,000 sorted
