"""CRUD routes for every stored kind, generated from one skeleton (NetBox style).

For each :class:`~stockade.controller.services.codec.Kind` (label keys, workloads, label groups, IP
lists, services, rulesets, deny rules, failsafe, NetworkPolicies, pairing profiles) under
``/api/v1/<path>``:

* ``GET /<path>?limit=&cursor=&name=&labels=app=shop,env=prod&version=draft|active|N`` - a page
  ordered by name; ``next_cursor`` continues it; ``labels`` filters workloads;
  ``version`` reads a provisioned version (policy kinds);
* ``POST /<path>`` - create (409 if the name exists), answers 201 with an ``ETag``;
* ``GET /<path>/{name}`` - one object with its ``ETag``;
* ``PUT /<path>/{name}`` - replace; ``If-Match`` with a stale ETag answers 412;
* ``DELETE /<path>/{name}`` - delete (409 while still referenced), ``If-Match`` honoured.

Policy kinds edit the draft. Inventory kinds (label keys, workloads) take effect at once:
workload writes run through the compiled policy service, which bumps the revisions of the
affected hosts. ``PUT /workloads/{name}/mode`` switches one workload's enforcement mode.
Rulesets are writable by ruleset-managers inside their label scope; the rest needs admin. A
label-scoped principal's write is refused when it would change the compiled policy of a workload
outside its scope (:mod:`stockade.controller.services.scope`); kinds whose effect comes later
(pairing profiles: their labels reach a workload at enrolment) refuse it outright. Pairing
profiles answer in their own flat shape (:class:`FlatView`).

No ``from __future__ import annotations`` here: FastAPI reads the generated routes' body
annotations at run time.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from stockade.controller.api.dto.objects import (
    ModeIn,
)
from stockade.controller.api.schemas import NAME_PATTERN, ErrorOut, ObjectOut, ObjectPage, PairingProfileOut
from stockade.controller.context import Controller, controller_of, require
from stockade.controller.services import enrolment, scope
from stockade.controller.services.auth import ForbiddenError, Permission, Principal
from stockade.controller.services.codec import KIND_BY_NAME, KINDS, Kind, Scope
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.storage import store
from stockade.controller.storage.store import StoredObject
from stockade.errors import Issue, ValidationError

# Filters are strict: a value that no stored object could match is refused (422), never dropped
_NAME_CHARS = r"[A-Za-z0-9_.\-]"
NAME_FILTER = rf"^{_NAME_CHARS}*$"
LABELS_FILTER = rf"^{_NAME_CHARS}+={_NAME_CHARS}+(,{_NAME_CHARS}+={_NAME_CHARS}+)*$"
VERSION_FILTER = r"^(draft|active|[1-9][0-9]{0,9})$"
CURSOR_PATTERN = r"^[A-Za-z0-9_\-]+={0,2}$"
ERRORS: dict[int | str, dict[str, Any]] = {  # 413: a body over the route's limit (stockade.controller.limits)
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 412, 413, 422, 429)
}


def object_out(obj: StoredObject) -> ObjectOut:
    return ObjectOut(
        kind=obj.kind, name=obj.name, revision=obj.revision, etag=obj.etag, updated_at=obj.updated_at, body=obj.body
    )


@dataclass(frozen=True)
class FlatView:
    """How a kind's routes answer when they kept the shape they had before joining the skeleton:
    one object is its body's fields at the top level with ``revision``, ``etag`` and read-only
    ``state`` (per name, e.g. a use counter) beside them; a list is a bare JSON array, paged by
    ``limit``/``cursor`` like every list, its next page named by a ``Link: <...>; rel="next"``
    header. Everything else (bodies, ETags, If-Match, audit, role and scope) is the skeleton's."""

    model: type[BaseModel]
    state: Callable[[Session, Sequence[str]], Mapping[str, Mapping[str, Any]]]
    default_limit: int = store.MAX_PAGE  # a client that never read the Link header still sees every page-full


def _profile_state(db: Session, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    uses = enrolment.profile_uses(db, names)
    return {n: {"uses": uses.get(n, 0)} for n in names}


FLAT_VIEWS: dict[str, FlatView] = {"pairing_profile": FlatView(PairingProfileOut, _profile_state)}


def present(db: Session, kind: Kind, objs: Sequence[StoredObject]) -> list[Any]:
    """The answers for ``objs`` in the kind's shape (:class:`ObjectOut`, or its :class:`FlatView`)."""
    view = FLAT_VIEWS.get(kind.name)
    if view is None:
        return [object_out(o) for o in objs]
    state = view.state(db, [o.name for o in objs])
    return [view.model.model_validate({**o.body, **state.get(o.name, {}), "revision": o.revision, "etag": o.etag})
            for o in objs]


async def raw_body(request: Request) -> Any:
    """The request's JSON exactly as sent (FastAPI has parsed it once already; Starlette keeps it).

    The Pydantic body model is the wire gate and the OpenAPI schema; the codec reads the raw
    JSON, so that it sees what the client sent (not a coerced, default-filled copy) and the
    API accepts exactly what a policy file accepts.
    """
    try:
        return await request.json()
    except ValueError:  # FastAPI answers malformed JSON itself; this is a safety net
        raise ValidationError([Issue("api", 0, "body", "the body must be UTF-8 JSON")]) from None


def _write_permission(kind: Kind) -> Permission:
    return Permission.WRITE_RULESETS if kind.name == "ruleset" else Permission.WRITE


def _workload_domain(obj: StoredObject) -> Any:
    """The workload the write decoded (decoded from the stored body only if the write did not)."""
    return obj.domain if obj.domain is not None else KIND_BY_NAME["workload"].decode(obj.body)


def write(
    ctl: Controller,
    kind: str,
    fn: Any,
    principal: Principal | None = None,
    name: str | None = None,
) -> Any:
    """Run a store write in the right kind of transaction (through the compiler for inventory).

    With a scoped ``principal`` the write is refused (and rolled back) when its effect reaches a
    workload outside the scope: a draft edit by compiled effect, an inventory edit (of workload
    ``name``) by the compiler's host deltas (see :mod:`stockade.controller.services.scope`).
    """
    if not KIND_BY_NAME[kind].scope_checked:
        if principal is not None and scope.is_scoped(principal):  # also refused by scope.check_route
            raise ForbiddenError(f"writing a {kind} is not available to a label-scoped principal "
                                 f"(scope {scope.scope_text(principal)}): its effect cannot be confined to the scope")
        with ctl.sessions.begin() as db:
            return fn(db, None)
    if KIND_BY_NAME[kind].scope is Scope.POLICY:
        with ctl.sessions.begin() as db:
            if principal is None:
                return fn(db, None)
            return scope.guard_draft_write(db, ctl.dist, principal, lambda: fn(db, None))
    if principal is None:
        return ctl.dist.transact(fn)

    def guarded(db: Session, txn: CompilerTxn) -> Any:
        earlier = {name: scope.labels_now(ctl.dist, name)} if name is not None and kind == "workload" else {}
        result = fn(db, txn)
        scope.check_deltas(principal, txn, earlier, f"writing {kind} {name!r}")
        return result

    return ctl.dist.transact(guarded)


def _sync_compiler(txn: CompilerTxn | None, db: Session, kind: str, name: str, after: StoredObject | None) -> None:
    if txn is None:
        return
    if kind == "workload":
        if after is None:
            txn.remove_workload(name)
        else:
            txn.upsert_workload(_workload_domain(after))
    elif kind == "label_key":
        txn.refresh_label_keys(store.draft_objects(db, ("label_key",))["label_key"])
    elif kind == "network_policy":
        np = None if after is None else (after.domain if after.domain is not None else KIND_BY_NAME[kind].decode(
            after.body))
        txn.set_network_policy(name, np)


def _answer(ctl: Controller, kind: Kind, obj: StoredObject, response: Response) -> Any:
    response.headers["ETag"] = obj.etag
    if kind.name not in FLAT_VIEWS:
        return object_out(obj)
    with ctl.session() as db:
        return present(db, kind, [obj])[0]


def _next_link(request: Request, limit: int, cursor: str) -> str:
    url = request.url.include_query_params(limit=limit, cursor=cursor)
    return f'<{url.path}?{url.query}>; rel="next"'


def _routes(r: APIRouter, kind: Kind) -> None:
    path = f"/{kind.path}"
    tag: list[str | Enum] = [kind.title]
    write_perm = _write_permission(kind)
    singular = kind.name.replace("_", "-")
    view = FLAT_VIEWS.get(kind.name)
    one_model: Any = view.model if view is not None else ObjectOut
    list_model: Any = list[view.model] if view is not None else ObjectPage  # type: ignore[name-defined]
    default_limit = view.default_limit if view is not None else 100

    def list_objects(
        request: Request,
        response: Response,
        principal: Annotated[Principal, Depends(require(Permission.READ))],
        limit: Annotated[int, Query(ge=1, le=store.MAX_PAGE)] = default_limit,
        cursor: Annotated[str | None, Query(max_length=200, pattern=CURSOR_PATTERN)] = None,
        name: Annotated[str | None, Query(max_length=63, pattern=NAME_FILTER, description="substring of the name")]
        = None,
        labels: Annotated[str | None, Query(max_length=1000, pattern=LABELS_FILTER,
                                            description="key=value,... (workloads)")] = None,
        version: Annotated[str | None, Query(max_length=20, pattern=VERSION_FILTER,
                                             description="draft (default), active or N")] = None,
    ) -> Any:
        ctl = controller_of(request)
        if cursor is not None and not re.fullmatch(NAME_PATTERN, store.decode_cursor(cursor)):
            raise ValidationError([Issue("api", 0, "cursor", "malformed cursor")])
        with ctl.session() as db:
            page = store.list_objects(
                db,
                kind.name,
                version=version,
                name=name,
                labels=store.parse_label_filter(labels),
                cursor=cursor,
                limit=limit,
            )
            items = present(db, kind, page.items)
        if view is None:
            return ObjectPage(items=items, next_cursor=page.next_cursor)
        if page.next_cursor is not None:
            response.headers["Link"] = _next_link(request, limit, page.next_cursor)
        return items

    def get_object(
        request: Request,
        response: Response,
        name: str,
        principal: Annotated[Principal, Depends(require(Permission.READ))],
        version: Annotated[str | None, Query(max_length=20, pattern=VERSION_FILTER)] = None,
    ) -> Any:
        ctl = controller_of(request)
        with ctl.session() as db:
            obj = store.get_object(db, kind.name, name, version)
            response.headers["ETag"] = obj.etag
            return present(db, kind, [obj])[0]

    def create_object(
        request: Request,
        response: Response,
        body: Any,
        raw: Annotated[Any, Depends(raw_body)],
        principal: Annotated[Principal, Depends(require(write_perm))],
    ) -> Any:
        ctl = controller_of(request)
        data = raw
        if kind.name == "ruleset":
            scope.check_ruleset_ownership(principal, [kind.canonical(data)])

        def run(db: Session, txn: CompilerTxn | None) -> StoredObject:
            obj = store.create_object(db, kind.name, data, principal.actor)
            _sync_compiler(txn, db, kind.name, obj.name, obj)
            return obj

        obj = write(ctl, kind.name, run, principal, str(data.get("name", "")))
        response.status_code = 201
        return _answer(ctl, kind, obj, response)

    def replace_object(
        request: Request,
        response: Response,
        name: str,
        body: Any,
        raw: Annotated[Any, Depends(raw_body)],
        principal: Annotated[Principal, Depends(require(write_perm))],
        if_match: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Any:
        ctl = controller_of(request)
        data = raw

        def run(db: Session, txn: CompilerTxn | None) -> StoredObject:
            if kind.name == "ruleset":
                current = store.get_object(db, kind.name, name)
                scope.check_ruleset_ownership(principal, [current.body, kind.canonical({**data, "name": name})])
            _before, after = store.replace_object(db, kind.name, name, data, principal.actor, if_match)
            _sync_compiler(txn, db, kind.name, name, after)
            return after

        obj = write(ctl, kind.name, run, principal, name)
        return _answer(ctl, kind, obj, response)

    def delete_object(
        request: Request,
        name: str,
        principal: Annotated[Principal, Depends(require(write_perm))],
        if_match: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Response:
        ctl = controller_of(request)

        def run(db: Session, txn: CompilerTxn | None) -> None:
            if kind.name == "ruleset":
                scope.check_ruleset_ownership(principal, [store.get_object(db, kind.name, name).body])
            store.delete_object(db, kind.name, name, principal.actor, if_match)
            _sync_compiler(txn, db, kind.name, name, None)

        write(ctl, kind.name, run, principal, name)
        return Response(status_code=204)

    create_object.__annotations__["body"] = kind.body
    replace_object.__annotations__["body"] = kind.body
    r.add_api_route(path, list_objects, methods=["GET"], tags=tag, responses=ERRORS, response_model=list_model,
                    operation_id=f"list-{kind.path}", summary=f"List {kind.title.lower()}")
    r.add_api_route(path, create_object, methods=["POST"], tags=tag, responses=ERRORS, status_code=201,
                    response_model=one_model, operation_id=f"create-{singular}", summary=f"Create a {singular}")
    r.add_api_route(f"{path}/{{name}}", get_object, methods=["GET"], tags=tag, responses=ERRORS,
                    response_model=one_model, operation_id=f"get-{singular}", summary=f"Get a {singular}")
    r.add_api_route(f"{path}/{{name}}", replace_object, methods=["PUT"], tags=tag, responses=ERRORS,
                    response_model=one_model, operation_id=f"replace-{singular}", summary=f"Replace a {singular}")
    r.add_api_route(f"{path}/{{name}}", delete_object, methods=["DELETE"], tags=tag, responses=ERRORS,
                    status_code=204, operation_id=f"delete-{singular}", summary=f"Delete a {singular}")


def _mode_route(r: APIRouter) -> None:
    def set_mode(
        request: Request,
        response: Response,
        name: str,
        body: ModeIn,
        principal: Annotated[Principal, Depends(require(Permission.WRITE))],
        if_match: Annotated[str | None, Header(max_length=200)] = None,
    ) -> ObjectOut:
        """Switch one workload's enforcement mode (idle, visibility, selective, full)."""
        ctl = controller_of(request)

        def run(db: Session, txn: CompilerTxn | None) -> StoredObject:
            current = store.get_object(db, "workload", name)
            data = {**current.body, "mode": body.mode.value}
            _b, after = store.replace_object(db, "workload", name, data, principal.actor, if_match)
            _sync_compiler(txn, db, "workload", name, after)
            return after

        obj = write(ctl, "workload", run, principal, name)
        response.headers["ETag"] = obj.etag
        return object_out(obj)

    r.add_api_route("/workloads/{name}/mode", set_mode, methods=["PUT"], tags=["Workloads"],
                    responses=ERRORS, operation_id="set-workload-mode", summary="Set a workload's mode")


def router() -> APIRouter:
    r = APIRouter()
    for kind in KINDS:
        _routes(r, kind)
    _mode_route(r)
    return r
