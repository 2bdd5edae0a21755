"""Enrolment and agent identity: pairing profiles, activation codes, enrolment, keys, quarantine.

The rules (issue 12, items 2 and 9), all enforced here and nowhere else:

* **Codes.** A code is single use and expires one day after it is issued unless its profile
  says otherwise (``code_max_uses``, ``code_ttl_seconds``, set explicitly by an admin); a code
  may ask for fewer uses or a shorter life than the profile allows, never more. The profile's
  own ``max_uses``/``expires_at``/``enabled`` still bound all its codes together.
* **No take-over.** A profile code only *creates* workloads: enrolling under the name of an
  existing workload (with or without an agent, revoked or not) is refused (409). Taking over an
  existing workload needs an *adoption code*: a code an admin issued for that one workload
  name. It enrols as that workload (whatever hostname the host reports), keeps the labels and
  mode the admin gave the workload, and is refused while the workload still has a live agent.
* **Labels** of a created workload come from the pairing profile, never from a name match.
* **Addresses** an enrolment or interface report claims that already belong to another workload
  are not taken: the report is held back, the agent is quarantined and an ``agent.quarantine``
  event names both sides. The answer to the agent does not say which workload owns them.
* **Quarantine** (also raised when two processes use one agent credential, see
  :mod:`agent_keys`): the agent keeps its credential and policy, but its interface reports no
  longer change the inventory; an admin clears it (``agent.quarantine_clear``), which applies the
  last held-back report. A new agent process's address changes wait out a probation
  (``agent.report_held`` / ``agent.report_released``) so a copy is caught before it moves them.
* **Keys.** An agent sends an Ed25519 public key at enrolment; from then on every request must
  be signed with it. ``rotate_key`` replaces it (the request is signed with the old key, the new
  key signs a proof). An agent enrolled before keys existed binds its first key with its token.

Routes (:mod:`stockade.controller.api.agents`) parse, authorise and shape answers; the SQL and
the decisions live here.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from stockade import agent_signature as sig
from stockade.controller.services import auth, codec, replicas
from stockade.controller.services.agent_keys import AgentKeyRing
from stockade.controller.services.auth import ForbiddenError
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.distribution import AgentLive, PolicyDistributor
from stockade.controller.services.events import record_event, record_events
from stockade.controller.storage import store
from stockade.controller.storage.db import (
    ActivationCodeRow,
    AgentRow,
    ObjectAddressRow,
    ObjectRow,
    PairingProfileUsesRow,
    utcnow,
)
from stockade.errors import ConflictError, Issue, NotFoundError, ValidationError
from stockade.model.pairing import DEFAULT_CODE_TTL, MAX_CODE_TTL, PairingProfile

__all__ = ["DEFAULT_CODE_TTL", "MAX_CODE_TTL"]  # the bounds of a code, re-exported for the request bodies


# ---- pairing profiles --------------------------------------------------------------------
# A pairing profile is an object of kind ``pairing_profile`` (created, edited, listed and audited
# through the generic object skeleton, :mod:`stockade.controller.api.objects`); enrolment keeps
# its use counter (``pairing_profile_uses``) and its activation codes, which go with the object.

PROFILE_KIND = codec.KIND_BY_NAME["pairing_profile"]


def _profile(db: Session, name: str) -> tuple[ObjectRow, PairingProfile]:
    row = db.scalars(select(ObjectRow).where(ObjectRow.kind == PROFILE_KIND.name, ObjectRow.name == name)
                     ).one_or_none()
    if row is None:
        raise NotFoundError(f"no pairing profile {name!r}")
    return row, PROFILE_KIND.decode(row.body)


def profile_uses(db: Session, names: Sequence[str]) -> dict[str, int]:
    """Enrolments counted so far, per pairing profile name (for the profiles' answers)."""
    if not names:
        return {}
    q = (select(ObjectRow.name, PairingProfileUsesRow.uses)
         .join(PairingProfileUsesRow, PairingProfileUsesRow.object_id == ObjectRow.id)
         .where(ObjectRow.kind == PROFILE_KIND.name, ObjectRow.name.in_(sorted(set(names)))))
    return {str(n): int(u) for n, u in db.execute(q)}


# ---- activation codes --------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCode:
    id: str
    profile: str
    code: str  # shown once
    max_uses: int
    expires_at: dt.datetime
    workload: str | None


def issue_code(db: Session, profile: str, actor: str, *, max_uses: int | None = None,
               ttl_seconds: int | None = None, workload: str | None = None) -> IssuedCode:
    """A new code of ``profile``; ``workload`` makes it an adoption code for that one workload."""
    row, p = _profile(db, profile)
    uses = p.code_max_uses if max_uses is None else max_uses
    ttl = p.code_ttl_seconds if ttl_seconds is None else ttl_seconds
    issues = []
    if uses > p.code_max_uses:
        issues.append(Issue("api", 0, "max_uses", f"profile {profile!r} allows at most {p.code_max_uses} "
                                                  "use(s) per code (raise its code_max_uses first)"))
    if ttl > p.code_ttl_seconds:
        issues.append(Issue("api", 0, "ttl_seconds", f"profile {profile!r} allows codes of at most "
                                                     f"{p.code_ttl_seconds} s (raise its code_ttl_seconds first)"))
    if workload is not None and uses != 1:
        issues.append(Issue("api", 0, "max_uses", "an adoption code is single use"))
    if issues:
        raise ValidationError(issues)
    code_id = secrets.token_hex(6)
    code = f"act_{secrets.token_urlsafe(24)}"
    expires = utcnow() + dt.timedelta(seconds=ttl)
    db.add(ActivationCodeRow(id=code_id, code_hash=auth.sha256(code), profile_id=row.id, created_at=utcnow(),
                             revoked=False, max_uses=uses, uses=0, expires_at=expires, workload=workload))
    record_event(db, actor, "activation_code.create", "pairing_profile", profile, None,
                 {"id": code_id, "max_uses": uses, "expires_at": expires.isoformat(), "workload": workload})
    return IssuedCode(code_id, profile, code, uses, expires, workload)


def list_codes(db: Session, profile: str) -> list[ActivationCodeRow]:
    row, _p = _profile(db, profile)
    q = select(ActivationCodeRow).where(ActivationCodeRow.profile_id == row.id).order_by(ActivationCodeRow.created_at)
    return list(db.scalars(q))


def revoke_code(db: Session, profile: str, code_id: str, actor: str) -> None:
    owner, _p = _profile(db, profile)
    row = db.get(ActivationCodeRow, code_id)
    if row is None or row.profile_id != owner.id:
        raise NotFoundError(f"no activation code {code_id!r} in profile {profile!r}")
    row.revoked = True
    record_event(db, actor, "activation_code.revoke", "pairing_profile", profile, None, {"id": code_id})


# The statements of an enrolment, built once: inside the change lock a statement costs its round
# trip and nothing else (no per-call construction or cache key, no ORM unit of work).
_CODES = cast(Table, ActivationCodeRow.__table__)
_OBJECTS = cast(Table, ObjectRow.__table__)
_USES = cast(Table, PairingProfileUsesRow.__table__)
_AGENTS = cast(Table, AgentRow.__table__)
_ADDRESSES = cast(Table, ObjectAddressRow.__table__)
_READ_CODE = (select(_CODES.c.id, _CODES.c.revoked, _CODES.c.expires_at, _CODES.c.workload, _OBJECTS.c.id,
                     _OBJECTS.c.kind, _OBJECTS.c.body)
              .select_from(_CODES.outerjoin(_OBJECTS, _OBJECTS.c.id == _CODES.c.profile_id))
              .where(_CODES.c.code_hash == bindparam("b_hash")))
_COUNT_CODE = (update(_CODES).where(_CODES.c.id == bindparam("b_id"))
               .where(_CODES.c.max_uses.is_(None) | (_CODES.c.uses < _CODES.c.max_uses))
               .values(uses=_CODES.c.uses + 1))
_COUNT_PROFILE = update(_USES).where(_USES.c.object_id == bindparam("b_id")).values(uses=_USES.c.uses + 1)
_COUNT_PROFILE_BOUNDED = _COUNT_PROFILE.where(_USES.c.uses < bindparam("b_max"))
_NAME_TAKEN = select(
    select(_AGENTS.c.id).where(_AGENTS.c.workload == bindparam("b_name"), _AGENTS.c.revoked_at.is_(None)).limit(1)
    .scalar_subquery(),
    select(_OBJECTS.c.id).where(_OBJECTS.c.kind == "workload", _OBJECTS.c.name == bindparam("b_name"))
    .scalar_subquery())
_OWNERS = (select(_ADDRESSES.c.address, _OBJECTS.c.name).join(_OBJECTS, _OBJECTS.c.id == _ADDRESSES.c.object_id)
           .where(_ADDRESSES.c.address.in_(bindparam("b_addresses", expanding=True)),
                  _OBJECTS.c.name != bindparam("b_name")))
_INSERT_AGENT = insert(_AGENTS)


@dataclass(frozen=True)
class _Code:
    id: str
    workload: str | None  # an adoption code's workload


def _use_code(db: Session, code_hash: str) -> tuple[_Code, PairingProfile]:
    """Count one use of a code (by its hash) and of its profile, or refuse (403) saying why."""
    found = db.execute(_READ_CODE, {"b_hash": code_hash}).one_or_none()
    if found is None or found[1]:
        raise ForbiddenError("unknown or revoked activation code")
    code_id, _revoked, expires_at, workload, profile_id, kind, body = found
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise ForbiddenError("the activation code has expired")
    if profile_id is None or kind != PROFILE_KIND.name:
        raise ForbiddenError("the pairing profile is disabled")
    profile: PairingProfile = PROFILE_KIND.decode(body)
    if not profile.enabled:
        raise ForbiddenError("the pairing profile is disabled")
    if profile.expired(now):
        raise ForbiddenError("the pairing profile has expired")
    if getattr(db.execute(_COUNT_CODE, {"b_id": code_id}), "rowcount", 0) != 1:
        raise ForbiddenError("the activation code is used up")
    if profile.max_uses is None:
        used = db.execute(_COUNT_PROFILE, {"b_id": profile_id})
    else:
        used = db.execute(_COUNT_PROFILE_BOUNDED, {"b_id": profile_id, "b_max": profile.max_uses})
    if getattr(used, "rowcount", 0) != 1:
        raise ForbiddenError("the pairing profile is used up")
    return _Code(str(code_id), workload), profile


# ---- enrolment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolRequest:
    activation_code: str
    hostname: str
    interfaces: tuple[dict[str, Any], ...]
    agent_version: str
    public_key: str | None


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    token: str
    workload: str
    adopted: bool
    quarantined: bool


QUARANTINE_ADDRESSES = "reported addresses that belong to another workload"


def _addresses(interfaces: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(a) for i in interfaces for a in i.get("addresses", [])})


def _owned_elsewhere(db: Session, workload: str, interfaces: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Addresses in ``interfaces`` that another workload holds: address -> owner."""
    wanted = _addresses(interfaces)
    if not wanted:
        return {}
    db.flush()  # a Core read does not autoflush: ORM writes pending in this transaction count (no SQL if none)
    return {str(a): str(n) for a, n in db.execute(_OWNERS, {"b_addresses": wanted, "b_name": workload})}


def _without(interfaces: Sequence[Mapping[str, Any]], taken: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{**i, "addresses": [a for a in i.get("addresses", []) if str(a) not in taken]} for i in interfaces]


def _quarantine(db: Session, row: AgentRow, reason: str, detail: Mapping[str, Any], actor: str) -> None:
    if row.quarantined_at is None:
        row.quarantined_at = utcnow()
        row.quarantine_reason = reason
    record_event(db, actor, "agent.quarantine", "agent", row.id, None,
                 {"workload": row.workload, "reason": reason, **detail})


def _name_taken(db: Session, name: str) -> tuple[bool, bool]:
    """(a live agent is enrolled as ``name``, a workload ``name`` exists): ONE round trip."""
    db.flush()  # as in _owned_elsewhere
    enrolled, existing = db.execute(_NAME_TAKEN, {"b_name": name}).one()
    return enrolled is not None, existing is not None


def enrol(dist: PolicyDistributor, keys: AgentKeyRing, req: EnrolRequest) -> Enrolled:
    """Trade an activation code for an agent identity, by the rules in the module docstring.

    What needs no database state (the key check, the code's hash, the new credential and its
    hash) is done before the change lock; inside it a new workload costs a fixed handful of
    statements (the code and its profile in one read, the two use counters, one read of the
    name, one of the addresses' owners, one of the label keys, set-based inserts, one audit
    ``INSERT``) and no unit-of-work flush."""
    if req.public_key is not None:
        try:
            sig.parse_public_key(req.public_key)
        except sig.SignatureError as exc:
            raise ValidationError([Issue("api", 0, "public_key", str(exc))]) from None
    code_hash = auth.sha256(req.activation_code)
    agent_id = secrets.token_hex(8)
    secret = auth.new_secret()
    token_hash = auth.sha256(secret)
    reported = [dict(i) for i in req.interfaces]

    def run(db: Session, txn: CompilerTxn) -> Enrolled:
        code, profile = _use_code(db, code_hash)
        name = code.workload or req.hostname
        # the database, not this process's map: an agent enrolled through another replica counts too
        # (writes are serialised by the change lock, so two replicas cannot both pass this check), and
        # one enrolled earlier in this same batched transaction (its rows are already inserted); no
        # scan of every agent in memory per enrolment (quadratic in a fleet's enrolment)
        enrolled, exists = _name_taken(db, name)
        if enrolled:
            raise ConflictError(f"workload {name!r} already has an enrolled agent; revoke it first")
        if exists and code.workload is None:
            raise ConflictError(f"workload {name!r} already exists: enrolling as an existing workload needs an "
                                "adoption code an admin issued for it")
        actor = f"enroll:{profile.name}"
        taken = _owned_elsewhere(db, name, reported)
        interfaces = _without(reported, taken)
        audit: list[tuple[str, str, str, Any, Any]] = []
        if not exists:
            data = {"name": name, "labels": profile.label_map(), "interfaces": interfaces, "mode": profile.mode.value}
            obj, created = store.insert_workload(db, data)
            audit.append(created)
        else:  # adoption (rare): the generic replace keeps the admin's labels and mode
            current = store.get_object(db, "workload", name)
            _b, obj = store.replace_object(db, "workload", name, {**current.body, "interfaces": interfaces}, actor)
            db.flush()  # its audit row before the agent's
        txn.upsert_workload(obj.domain)
        now = utcnow()
        agent: dict[str, Any] = {
            "id": agent_id, "workload": name, "token_hash": token_hash, "profile": profile.name,
            "hostname": req.hostname, "created_at": now, "applied_revision": 0, "agent_version": req.agent_version,
            "public_key": req.public_key}
        if taken:  # absent otherwise: SQL NULL (a JSON column would store None as JSON null)
            agent.update(quarantined_at=now, quarantine_reason=QUARANTINE_ADDRESSES, held_interfaces=reported)
        db.execute(_INSERT_AGENT, agent)
        audit.append(("agent.enroll", "agent", agent_id, None,
                      {"workload": name, "profile": profile.name, "code": code.id, "adopted": exists,
                       "key_bound": req.public_key is not None}))
        record_events(db, actor, audit)
        if taken:
            record_event(db, actor, "agent.quarantine", "agent", agent_id, None,
                         {"workload": name, "reason": QUARANTINE_ADDRESSES, "addresses": sorted(taken),
                          "owners": sorted(set(taken.values()))})
        dist.agents[agent_id] = AgentLive(agent_id, name, token_hash)
        txn.agents.add(agent_id)
        keys.set_key(agent_id, req.public_key)
        txn.undo.append(lambda: dist.agents.pop(agent_id, None))
        txn.undo.append(lambda: keys.forget(agent_id))
        return Enrolled(agent_id, f"agt_{agent_id}_{secret}", name, exists, bool(taken))

    # concurrent enrolments share one transaction (one change lock and catch-up, one commit)
    return dist.transact_batched(run)


# ---- the agent's own reports ---------------------------------------------------------------


class ReportOutcome(Enum):
    APPLIED = "applied"
    HELD = "held"  # a new agent process on probation changed addresses: applied when it ends
    QUARANTINED = "quarantined"


def report_interfaces(dist: PolicyDistributor, agent_id: str, workload: str,
                      interfaces: Sequence[Mapping[str, Any]], actor: str, *,
                      hold_changes: bool = False) -> ReportOutcome:
    """Apply an agent's interface report, or hold it back (quarantine, or ``hold_changes``: the
    sending process is on probation and the report would change the workload's addresses)."""
    reported = [dict(i) for i in interfaces]

    def run(db: Session, txn: CompilerTxn) -> ReportOutcome:
        row = db.get(AgentRow, agent_id)
        if row is None:
            raise NotFoundError(f"no agent {agent_id!r}")
        if row.quarantined_at is not None:
            row.held_interfaces = reported
            return ReportOutcome.QUARANTINED
        taken = _owned_elsewhere(db, workload, interfaces)
        if taken:
            row.held_interfaces = reported
            _quarantine(db, row, QUARANTINE_ADDRESSES,
                        {"addresses": sorted(taken), "owners": sorted(set(taken.values()))}, actor)
            return ReportOutcome.QUARANTINED
        current = store.get_object(db, "workload", workload)
        if hold_changes and _addresses(current.body.get("interfaces", [])) != _addresses(reported):
            row.held_interfaces = reported
            record_event(db, actor, "agent.report_held", "agent", agent_id, None,
                         {"workload": workload, "addresses": _addresses(reported),
                          "reason": "a new agent process changed the addresses; applied once it has "
                                    "spoken alone for the probation period"})
            return ReportOutcome.HELD
        row.held_interfaces = None
        data = {**current.body, "interfaces": reported}
        _b, after = store.replace_object(db, "workload", workload, data, actor)
        if after.revision != current.revision:
            txn.upsert_workload(after.domain)
        return ReportOutcome.APPLIED

    return dist.transact(run)


def release_held(dist: PolicyDistributor, agent_id: str) -> None:
    """A new agent process's probation ended with no other process heard: apply its held report."""
    with dist.sessions() as db:
        row = db.get(AgentRow, agent_id)
        if row is None or row.revoked_at is not None or row.quarantined_at is not None or row.held_interfaces is None:
            return
        workload, held = row.workload, list(row.held_interfaces)
    if report_interfaces(dist, agent_id, workload, held, "controller") is ReportOutcome.APPLIED:
        with dist.sessions.begin() as db:
            record_event(db, "controller", "agent.report_released", "agent", agent_id, None,
                         {"workload": workload, "addresses": _addresses(held)})


def record_agent_events(db: Session, agent_id: str, workload: str, actor: str,
                        events: Sequence[Mapping[str, Any]]) -> None:
    for ev in events:
        record_event(db, actor, f"agent.{ev['kind']}", "agent", workload, None, {**ev, "agent_id": agent_id})


def record_refused_signature(dist: PolicyDistributor, agent_id: str, reason: str, client: str) -> None:
    """The agent's token came without a valid signature (``AgentKeyRing.on_refused``)."""
    with dist.sessions.begin() as db:
        row = db.get(AgentRow, agent_id)
        record_event(db, "controller", "agent.signature_refused", "agent", agent_id, None,
                     {"workload": row.workload if row else None, "reason": reason, "client": client})


def quarantine_clone(dist: PolicyDistributor, agent_id: str, old_instance: str, new_instance: str) -> None:
    """Two processes speak with one credential (``AgentKeyRing.on_clone``): quarantine the agent."""
    with dist.sessions.begin() as db:
        row = db.get(AgentRow, agent_id)
        if row is not None:
            _quarantine(db, row, "two agent processes use this agent's credential",
                        {"instances": sorted((old_instance, new_instance))}, "controller")


def clear_quarantine(dist: PolicyDistributor, keys: AgentKeyRing, agent_id: str, actor: str) -> None:
    """Admin: lift the quarantine and apply the last held-back interface report (409 if it still
    claims another workload's addresses; the quarantine then stays)."""

    def run(db: Session, txn: CompilerTxn) -> None:
        row = get_agent(db, agent_id)
        if row.quarantined_at is None:
            return
        held = row.held_interfaces
        if held is not None and row.revoked_at is None:
            taken = _owned_elsewhere(db, row.workload, held)
            if taken:
                owners = ", ".join(f"{a} (workload {n})" for a, n in sorted(taken.items()))
                raise ConflictError(f"the agent's report still claims addresses of other workloads: {owners}")
            current = store.get_object(db, "workload", row.workload)
            _b, after = store.replace_object(db, "workload", row.workload, {**current.body, "interfaces": held},
                                             actor)
            if after.revision != current.revision:
                txn.upsert_workload(after.domain)
        record_event(db, actor, "agent.quarantine_clear", "agent", agent_id, None,
                     {"workload": row.workload, "reason": row.quarantine_reason,
                      "applied_held_report": held is not None})
        row.quarantined_at, row.quarantine_reason, row.held_interfaces = None, None, None

    dist.transact(run)
    keys.clear_clone(agent_id)


def rotate_key(dist: PolicyDistributor, keys: AgentKeyRing, agent_id: str, public_key: str, proof: str,
               actor: str) -> bool:
    """Replace the agent's key (the request carrying this was signed with the old one, if any).
    Returns True if the key changed; the same key again is a no-op (a retried rotation)."""
    try:
        sig.verify_rotation(agent_id, public_key, proof)
    except sig.SignatureError as exc:
        raise ValidationError([Issue("api", 0, "proof" if "proof" in str(exc) else "public_key", str(exc))]) from None
    with dist.sessions.begin() as db:
        row = get_agent(db, agent_id)
        if row.public_key == public_key:
            return False
        action = "agent.key_rotate" if row.public_key else "agent.key_bind"
        record_event(db, actor, action, "agent", agent_id, None, {"workload": row.workload})
        row.public_key = public_key
        replicas.announce_agents(dist, db, [agent_id])
    keys.set_key(agent_id, public_key)
    return True


def end_agent(dist: PolicyDistributor, keys: AgentKeyRing, agent_id: str, actor: str, action: str) -> None:
    """Revoke (admin) or unenrol (the agent itself): the credential stops working at once."""
    with dist.sessions.begin() as db:
        row = get_agent(db, agent_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            record_event(db, actor, action, "agent", agent_id, None, {"workload": row.workload})
            replicas.announce_agents(dist, db, [agent_id])
    dist.agents.pop(agent_id, None)
    keys.forget(agent_id)


def attach(keys: AgentKeyRing, dist: PolicyDistributor) -> None:
    """Let the key ring's findings act: quarantine clones, release held reports, audit refusals."""
    keys.on_clone = lambda agent_id, old, new: quarantine_clone(dist, agent_id, old, new)
    keys.on_release = lambda agent_id: release_held(dist, agent_id)
    keys.on_refused = lambda agent_id, reason, client: record_refused_signature(dist, agent_id, reason, client)


# ---- operator views -----------------------------------------------------------------------


def list_agents(db: Session, workload: str | None) -> list[AgentRow]:
    q = select(AgentRow).order_by(AgentRow.workload, AgentRow.created_at)
    if workload:
        q = q.where(AgentRow.workload == workload)
    return list(db.scalars(q))


def get_agent(db: Session, agent_id: str) -> AgentRow:
    row = db.get(AgentRow, agent_id)
    if row is None:
        raise NotFoundError(f"no agent {agent_id!r}")
    return row
