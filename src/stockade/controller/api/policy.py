"""Policy-wide routes: YAML import/export of the draft, diff, provision, rollback, versions, events.

* ``GET /policy/draft`` - the draft (with the live inventory) as the YAML documents of
  :mod:`stockade.policyfile`; ``?version=active|N`` exports a provisioned version instead.
* ``PUT /policy/draft`` (``Content-Type: application/yaml``) - replace every policy object of
  the draft with the documents' (objects absent from the YAML are removed from the draft) and
  create or update their label keys and workloads in the inventory (never deleting others).
  ``?dry_run=true`` only reports the changes (``stockade policy diff -f DIR``).
* ``GET /policy/diff?base=active&target=draft`` - structured object-level diff.
* ``POST /policy/provision {message}`` - freeze the draft as version N+1 (409 if unchanged).
* ``POST /policy/rollback {version, message}`` - provision version K's content as N+1.
* ``GET /policy/versions`` (cursor = number), ``GET /policy/versions/{n}`` and ``.../content``.
* ``GET /events?kind=&name=&action=&actor=`` - audit events, newest first.
* ``GET /workloads/{name}/host-policy`` - the compiled HostPolicy of one workload now.
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from stockade.compiler import host_policy_to_dict
from stockade.controller.api import flows_policy as flows_policy_api
from stockade.controller.api.schemas import (
    ChangeOut,
    DiffOut,
    ErrorOut,
    EventOut,
    EventPage,
    ImportResult,
    ProvisionIn,
    RollbackIn,
    VersionOut,
    VersionPage,
)
from stockade.controller.context import controller_of, require
from stockade.controller.limits import nul_fields
from stockade.controller.services import codec, scope, versions
from stockade.controller.services.auth import Permission, Principal
from stockade.controller.services.codec import INVENTORY_KINDS, POLICY_KINDS
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.events import query_events
from stockade.controller.services.versions import Change, diff_content
from stockade.controller.storage import store
from stockade.controller.storage.db import VersionRow
from stockade.errors import Issue, ValidationError
from stockade.model.policy import Policy
from stockade.policyfile import dump_policy, load_documents

router = APIRouter()
MAX_INT = 2**31 - 1
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 412, 422)}
YAML_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/yaml": {"schema": {"type": "string"}}},
    }
}


def _change_out(c: Change) -> ChangeOut:
    return ChangeOut(kind=c.kind, name=c.name, change=c.change, fields=list(c.fields), before=c.before, after=c.after)


def version_out(row: VersionRow) -> VersionOut:
    return VersionOut(
        number=row.number,
        created_at=row.created_at,
        author=row.author,
        message=row.message,
        rollback_of=row.rollback_of,
        diff=[ChangeOut(**c) for c in row.diff],
        affected_workloads=list(row.affected),
    )


def _wrap(bodies: dict[str, dict[str, Any]], kinds: tuple[str, ...]) -> dict[str, Any]:
    return {k: {n: {"revision": 0, "body": b} for n, b in bodies.get(k, {}).items()} for k in kinds}


@router.get("/policy/draft", tags=["Policy"], responses={200: {"content": {"application/yaml": {}}}, **ERRORS},
            operation_id="export-policy", response_class=Response)
def export_policy(
    request: Request,
    principal: Annotated[Principal, Depends(require(Permission.READ))],
    version: Annotated[str, Query(max_length=20, description="draft, active or N")] = "draft",
) -> Response:
    ctl = controller_of(request)
    with ctl.session() as db:
        content = versions.content_of(db, version)
        objects = {k: {n: e["body"] for n, e in content.get(k, {}).items()} for k in POLICY_KINDS}
        objects.update(store.draft_objects(db, INVENTORY_KINDS))
    text = dump_policy(codec.build_policy(objects))
    return Response(text, media_type="application/yaml")


EMPTY_IMPORT = (
    "the YAML holds no policy objects: importing it would delete every policy object of the draft; "
    "send ?allow_empty=true to confirm"
)


def _load_yaml(raw: bytes) -> Policy:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError([Issue("api", 0, "body", "the policy must be UTF-8 YAML")]) from None
    try:
        policy = load_documents(text, "api")
    except yaml.YAMLError as exc:  # the loader reports its own; this is a safety net
        raise ValidationError([Issue("api", 0, "body", f"not YAML: {exc}")]) from None
    return policy


def _refuse_nul(objects: dict[str, dict[str, Any]]) -> None:
    """``"\\0"`` in a double-quoted YAML string makes a NUL, which PostgreSQL cannot store: a 422."""
    nul = [Issue("api", 0, f, "contains a NUL character") for f in nul_fields(objects, "")]
    if nul:
        raise ValidationError(nul)


@router.put("/policy/draft", tags=["Policy"], responses=ERRORS, operation_id="import-policy",
            openapi_extra=YAML_BODY)
async def import_policy(
    request: Request,
    principal: Annotated[Principal, Depends(require(Permission.WRITE))],
    dry_run: bool = False,
    allow_empty: Annotated[bool, Query(description="confirm an import with no policy objects: it empties the "
                                                   "draft policy (refused otherwise)")] = False,
) -> ImportResult:
    ctl = controller_of(request)
    raw = await request.body()
    policy = _load_yaml(raw)
    objects = codec.objects_of_policy(policy)
    _refuse_nul(objects)
    workloads = policy.workload_map()
    policy_bodies = {k: objects.get(k, {}) for k in POLICY_KINDS}
    empty = not any(policy_bodies.values())
    if empty and not allow_empty and not raw.strip():
        raise ValidationError([Issue("api", 0, "body", EMPTY_IMPORT)])

    def run(db: Session, txn: CompilerTxn) -> ImportResult:
        draft = store.draft_revisions(db)
        if empty and not allow_empty and any(draft.get(k) for k in POLICY_KINDS):
            raise ValidationError([Issue("api", 0, "body", EMPTY_IMPORT)])
        inv = store.draft_revisions(db, INVENTORY_KINDS)
        draft_changes = diff_content(draft, _wrap(policy_bodies, POLICY_KINDS))
        wanted_inv = {k: {**{n: e["body"] for n, e in inv[k].items()}, **objects.get(k, {})} for k in INVENTORY_KINDS}
        inv_changes = diff_content(inv, _wrap(wanted_inv, INVENTORY_KINDS), INVENTORY_KINDS)
        result = ImportResult(
            draft_changes=[_change_out(c) for c in draft_changes],
            inventory_changes=[_change_out(c) for c in inv_changes],
        )
        if dry_run:
            return result
        issues = store.validate_draft(db, {**policy_bodies, "label_key": wanted_inv["label_key"]})
        if issues:
            raise ValidationError(issues)
        draft_before = scope.draft_snapshot(db) if scope.is_scoped(principal) else {}
        store.put_objects(db, "label_key", wanted_inv["label_key"], principal.actor, prune=False)
        for kind in POLICY_KINDS:
            store.put_objects(db, kind, policy_bodies[kind], principal.actor, prune=True)
        changed = store.put_objects(db, "workload", objects.get("workload", {}), principal.actor, prune=False)
        earlier = {name: scope.labels_now(ctl.dist, name) for name in changed}
        txn.refresh_label_keys(wanted_inv["label_key"])
        for name in changed:
            txn.upsert_workload(workloads[name])
        if scope.is_scoped(principal):  # refused inside the transaction: draft and inventory unchanged
            scope.check_deltas(principal, txn, earlier, "importing the policy")
            scope.check_policy_change(principal, ctl.dist, draft_before, scope.draft_snapshot(db))
        return result

    return await run_in_threadpool(ctl.dist.transact, run)


@router.get("/policy/diff", tags=["Policy"], responses=ERRORS, operation_id="diff-policy")
def diff_policy(
    request: Request,
    principal: Annotated[Principal, Depends(require(Permission.READ))],
    base: Annotated[str, Query(max_length=20)] = "active",
    target: Annotated[str, Query(max_length=20)] = "draft",
) -> DiffOut:
    ctl = controller_of(request)
    with ctl.session() as db:
        changes = diff_content(versions.content_of(db, base), versions.content_of(db, target))
    return DiffOut(base=base, target=target, changes=[_change_out(c) for c in changes])


@router.post("/policy/provision", tags=["Policy"], responses=ERRORS, status_code=201, operation_id="provision")
def provision(
    request: Request,
    body: ProvisionIn,
    principal: Annotated[Principal, Depends(require(Permission.WRITE))],
    proceed: Annotated[bool, Query(description="confirm: provision even if the draft newly blocks recorded flows, "
                                               "newly allows them or widens a rule (otherwise 409)")] = False,
) -> VersionOut:
    impact = flows_policy_api.provision_guard(request, proceed)  # 409 when it blocks or widens, unconfirmed
    guard = scope.version_guard(principal, "provisioning the draft")
    row = versions.provision(controller_of(request).dist, principal.actor, body.message, guard)
    return version_out(row).model_copy(update={"impact": impact})


@router.post("/policy/rollback", tags=["Policy"], responses=ERRORS, status_code=201, operation_id="rollback")
def rollback(
    request: Request,
    body: RollbackIn,
    principal: Annotated[Principal, Depends(require(Permission.WRITE))],
) -> VersionOut:
    guard = scope.version_guard(principal, f"rolling back to version {body.version}")
    row = versions.rollback(controller_of(request).dist, principal.actor, body.version, body.message, guard)
    return version_out(row)


@router.get("/policy/versions", tags=["Policy"], responses=ERRORS, operation_id="list-versions")
def list_versions(
    request: Request,
    principal: Annotated[Principal, Depends(require(Permission.READ))],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
) -> VersionPage:
    with controller_of(request).session() as db:
        rows = versions.list_versions(db, cursor, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return VersionPage(items=[version_out(r) for r in rows], next_cursor=str(rows[-1].number) if more else None)


def _version_row(db: Session, number: int) -> VersionRow:
    return versions.get_version(db, number)


@router.get("/policy/versions/{number}", tags=["Policy"], responses=ERRORS, operation_id="get-version")
def get_version(
    request: Request,
    number: Annotated[int, Path(ge=1, le=MAX_INT)],
    principal: Annotated[Principal, Depends(require(Permission.READ))],
) -> VersionOut:
    with controller_of(request).session() as db:
        return version_out(_version_row(db, number))


@router.get("/policy/versions/{number}/content", tags=["Policy"], responses=ERRORS,
            operation_id="get-version-content")
def get_version_content(
    request: Request,
    number: Annotated[int, Path(ge=1, le=MAX_INT)],
    principal: Annotated[Principal, Depends(require(Permission.READ))],
) -> dict[str, Any]:
    with controller_of(request).session() as db:
        return _version_row(db, number).content


@router.get("/events", tags=["Events"], responses=ERRORS, operation_id="list-events")
def list_events(
    request: Request,
    principal: Annotated[Principal, Depends(require(Permission.READ))],
    kind: Annotated[str | None, Query(max_length=32)] = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    cursor: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventPage:
    with controller_of(request).session() as db:
        rows = query_events(db, kind=kind, name=name, action=action, actor=actor, after_id=cursor, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            EventOut(id=r.id, time=r.time, actor=r.actor, action=r.action, kind=r.kind, name=r.name,
                     before=r.before, after=r.after)
            for r in rows
        ]
    return EventPage(items=items, next_cursor=str(rows[-1].id) if more else None)


@router.get("/workloads/{name}/host-policy", tags=["Workloads"], responses=ERRORS, operation_id="get-host-policy")
def get_host_policy(
    request: Request, name: str, principal: Annotated[Principal, Depends(require(Permission.READ))]
) -> dict[str, Any]:
    revision, hp = controller_of(request).dist.current(name)
    return {"revision": revision, "policy": host_policy_to_dict(hp)}
