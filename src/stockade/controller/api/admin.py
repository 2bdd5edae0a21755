"""Routes for people and keys: login/logout, users, API keys; and Prometheus ``/metrics``.

* ``POST /auth/login {username, password}`` sets the session cookie (rate limited per client
  address, ``X-Forwarded-For`` believed only from trusted proxies; and backed off per account
  after repeated failures). Every failed attempt is an ``auth.login_failed`` audit event.
  ``POST /auth/logout``; ``GET /auth/whoami`` (for an API key: its effective role and scope).
* ``/users`` and ``/api-keys`` are for owners. An API key's secret is in the creation answer
  only (``stk_<id>_<secret>``); afterwards only its id and metadata are shown. ``DELETE``
  revokes a key. The last enabled owner cannot be removed, demoted or disabled. A password
  change ends the user's other sessions (the session making the change, if it is the user's
  own, stays); deleting a user ends its sessions and revokes its keys.
  Users are versioned like every object: a revision (bumped by each effective edit, a
  password change included) and an ``ETag`` on GET/POST/PUT answers; ``PUT`` and ``DELETE``
  with a stale ``If-Match`` answer 412 and change nothing.
* ``GET /metrics`` (outside ``/api/v1``, any authenticated role): Prometheus text format.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stockade.controller.api.schemas import MAX_LABELS, NAME_PATTERN, ErrorOut
from stockade.controller.context import controller_of, require
from stockade.controller.services import auth
from stockade.controller.services.auth import Permission, Principal, PrincipalKind, Role
from stockade.controller.services.events import record_event
from stockade.controller.storage import store
from stockade.controller.storage.db import ApiKeyRow, SessionRow, UserRow, utcnow
from stockade.errors import ConflictError, NotFoundError

router = APIRouter()
metrics_router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
EDIT_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 412: {"model": ErrorOut}}
IfMatch = Annotated[str | None, Header(max_length=200, description="ETag of the user as last read")]
ScopeLabel = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}=[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(Strict):
    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class WhoAmI(BaseModel):
    name: str
    kind: str
    role: str | None
    scope: list[str]


class UserIn(Strict):
    username: Annotated[str, Field(pattern=NAME_PATTERN)]
    password: Annotated[str, Field(min_length=12, max_length=1024)]
    role: Role
    scope: list[ScopeLabel] = Field(default_factory=list, max_length=MAX_LABELS, description="labels (ruleset-manager)")


class UserUpdate(Strict):
    password: Annotated[str, Field(min_length=12, max_length=1024)] | None = None
    role: Role | None = None
    scope: Annotated[list[ScopeLabel], Field(max_length=MAX_LABELS)] | None = None
    disabled: bool | None = None


class UserOut(BaseModel):
    username: str
    role: str
    scope: list[str]
    disabled: bool
    created_at: dt.datetime
    revision: int
    etag: str


class ApiKeyIn(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    role: Role
    scope: list[ScopeLabel] = Field(default_factory=list, max_length=MAX_LABELS)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    owner: str
    role: str
    scope: list[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None
    key: str | None = Field(None, description="the secret, present only in the creation answer")


def _user_state(u: UserRow) -> dict[str, Any]:
    """What a user's ETag covers (with the revision): everything shown but the revision itself."""
    return {"username": u.username, "role": u.role, "scope": list(u.scope), "disabled": u.disabled,
            "created_at": u.created_at.isoformat()}


def _user_etag(u: UserRow) -> str:
    return store.etag_of(u.revision, _user_state(u))


def _user_out(u: UserRow, response: Response | None = None) -> UserOut:
    etag = _user_etag(u)
    if response is not None:
        response.headers["ETag"] = etag
    return UserOut(username=u.username, role=u.role, scope=list(u.scope), disabled=u.disabled,
                   created_at=u.created_at, revision=u.revision, etag=etag)


def _key_out(k: ApiKeyRow, secret: str | None = None) -> ApiKeyOut:
    return ApiKeyOut(id=k.id, name=k.name, owner=k.owner, role=k.role, scope=list(k.scope),
                     created_at=k.created_at, revoked_at=k.revoked_at, key=secret)


def _record_failed_login(request: Request, username: str, reason: str, failures: int, locked: float) -> None:
    ctl = controller_of(request)
    with ctl.sessions.begin() as db:
        record_event(db, "anonymous", "auth.login_failed", "user", username, None,
                     {"client": ctl.client_host(request), "reason": reason, "failures_in_a_row": failures,
                      "locked_seconds": round(locked, 1)})


@router.post("/auth/login", tags=["Auth"], responses=ERRORS, operation_id="login")
def login(request: Request, response: Response, body: LoginIn,
          principal: Annotated[Principal, Depends(require(Permission.PUBLIC))]) -> WhoAmI:
    ctl = controller_of(request)
    ctl.login_limiter.hit(ctl.client_host(request))
    try:
        ctl.login_throttle.check(body.username)
    except auth.RateLimitedError:
        _record_failed_login(request, body.username, "account locked", 0, 0.0)
        raise
    try:
        with ctl.sessions.begin() as db:
            user, secret = auth.login(db, ctl.passwords, body.username, body.password)
            record_event(db, user.username, "auth.login", "user", user.username, None,
                         {"client": ctl.client_host(request)})
    except auth.NotAuthenticatedError:
        failures, locked = ctl.login_throttle.failed(body.username)
        _record_failed_login(request, body.username, "wrong username or password", failures, locked)
        raise
    ctl.login_throttle.succeeded(body.username)
    response.set_cookie(auth.SESSION_COOKIE, secret, httponly=True, samesite="strict",
                        secure=ctl.settings.secure_cookies, max_age=auth.SESSION_HOURS * 3600, path="/")
    return WhoAmI(name=user.username, kind="user", role=user.role, scope=list(user.scope))


@router.post("/auth/logout", tags=["Auth"], responses=ERRORS, status_code=204, operation_id="logout")
def logout(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))]) -> Response:
    cookie = request.cookies.get(auth.SESSION_COOKIE)
    if cookie:
        with controller_of(request).sessions.begin() as db:
            row = db.get(SessionRow, auth.sha256(cookie))
            if row is not None:
                db.delete(row)
    out = Response(status_code=204)
    out.delete_cookie(auth.SESSION_COOKIE, path="/")
    return out


@router.get("/auth/whoami", tags=["Auth"], responses=ERRORS, operation_id="whoami")
def whoami(principal: Annotated[Principal, Depends(require(Permission.READ))]) -> WhoAmI:
    return WhoAmI(name=principal.name, kind=principal.kind.value,
                  role=principal.role.value if principal.role else None, scope=[str(x) for x in principal.scope])


def _owners_left(db: Session, excluding: str) -> int:
    q = select(func.count()).select_from(UserRow).where(
        UserRow.role == Role.OWNER.value, UserRow.disabled.is_(False), UserRow.username != excluding
    )
    return int(db.scalar(q) or 0)


def _user(db: Session, username: str) -> UserRow:
    row = db.get(UserRow, username)
    if row is None:
        raise NotFoundError(f"no user {username!r}")
    return row


@router.get("/users", tags=["Users"], responses=ERRORS, operation_id="list-users")
def list_users(request: Request,
               principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> list[UserOut]:
    with controller_of(request).session() as db:
        return [_user_out(u) for u in db.scalars(select(UserRow).order_by(UserRow.username))]


@router.post("/users", tags=["Users"], responses=ERRORS, status_code=201, operation_id="create-user")
def create_user(request: Request, response: Response, body: UserIn,
                principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> UserOut:
    ctl = controller_of(request)
    with ctl.sessions.begin() as db:
        if db.get(UserRow, body.username) is not None:
            raise ConflictError(f"user {body.username!r} exists")
        row = auth.create_user(db, ctl.passwords, body.username, body.password, body.role, list(body.scope))
        db.flush()
        record_event(db, principal.actor, "user.create", "user", body.username, None,
                     {"role": body.role.value, "scope": list(body.scope)})
        return _user_out(row, response)


@router.get("/users/{username}", tags=["Users"], responses=ERRORS, operation_id="get-user")
def get_user(request: Request, response: Response, username: str,
             principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> UserOut:
    with controller_of(request).session() as db:
        return _user_out(_user(db, username), response)


@router.put("/users/{username}", tags=["Users"], responses=EDIT_ERRORS, operation_id="update-user")
def update_user(request: Request, response: Response, username: str, body: UserUpdate,
                principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))],
                if_match: IfMatch = None) -> UserOut:
    ctl = controller_of(request)
    with ctl.sessions.begin() as db:
        row = _user(db, username)
        store.check_if_match(if_match, _user_etag(row))
        before = {"role": row.role, "scope": list(row.scope), "disabled": row.disabled}
        losing_owner = row.role == Role.OWNER.value and (
            (body.role is not None and body.role is not Role.OWNER) or body.disabled
        )
        if losing_owner and _owners_left(db, username) == 0:
            raise ConflictError("the last enabled owner cannot be demoted or disabled")
        ended = 0
        if body.password is not None:
            row.password_hash = ctl.passwords.hash(body.password)
            own = principal.kind is PrincipalKind.USER and principal.name == username
            ended = auth.end_sessions(db, username, keep=request.cookies.get(auth.SESSION_COOKIE) if own else None)
        if body.role is not None:
            row.role = body.role.value
        if body.scope is not None:
            row.scope = list(body.scope)
        if body.disabled is not None:
            row.disabled = body.disabled
        after: dict[str, Any] = {"role": row.role, "scope": list(row.scope), "disabled": row.disabled}
        if after != before or body.password is not None:
            if body.password is not None:
                after["password"] = "changed"
                after["sessions_ended"] = ended
            row.revision += 1
            record_event(db, principal.actor, "user.update", "user", username, before, after)
        return _user_out(row, response)


@router.delete("/users/{username}", tags=["Users"], responses=EDIT_ERRORS, status_code=204,
               operation_id="delete-user")
def delete_user(request: Request, username: str,
                principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))],
                if_match: IfMatch = None) -> Response:
    with controller_of(request).sessions.begin() as db:
        row = _user(db, username)
        store.check_if_match(if_match, _user_etag(row))
        if row.role == Role.OWNER.value and _owners_left(db, username) == 0:
            raise ConflictError("the last enabled owner cannot be deleted")
        auth.end_sessions(db, username)
        revoked = auth.revoke_keys_of(db, username)  # a later user of the same name must not inherit them
        db.delete(row)
        record_event(db, principal.actor, "user.delete", "user", username, {"role": row.role},
                     {"api_keys_revoked": revoked} if revoked else None)
    return Response(status_code=204)


@router.get("/api-keys", tags=["API keys"], responses=ERRORS, operation_id="list-api-keys")
def list_api_keys(request: Request,
                  principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> list[ApiKeyOut]:
    with controller_of(request).session() as db:
        return [_key_out(k) for k in db.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]


@router.post("/api-keys", tags=["API keys"], responses=ERRORS, status_code=201, operation_id="create-api-key")
def create_api_key(request: Request, body: ApiKeyIn,
                   principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> ApiKeyOut:
    owner = principal.name
    with controller_of(request).sessions.begin() as db:
        if db.get(UserRow, owner) is None:  # a key creating keys: owned by the key's owner
            key = db.get(ApiKeyRow, owner.removeprefix("key:"))
            owner = key.owner if key is not None else owner
        row, secret = auth.create_api_key(db, body.name, owner, body.role, list(body.scope))
        db.flush()
        record_event(db, principal.actor, "api_key.create", "api_key", row.id, None,
                     {"name": body.name, "role": body.role.value})
        return _key_out(row, secret)


@router.delete("/api-keys/{key_id}", tags=["API keys"], responses=ERRORS, status_code=204,
               operation_id="revoke-api-key")
def revoke_api_key(request: Request, key_id: str,
                   principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> Response:
    with controller_of(request).sessions.begin() as db:
        row = db.get(ApiKeyRow, key_id)
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            record_event(db, principal.actor, "api_key.revoke", "api_key", key_id, None, None)
    return Response(status_code=204)


@metrics_router.get("/metrics", tags=["Metrics"], responses=ERRORS, response_class=Response,
                    operation_id="metrics")
def metrics(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))]) -> Response:
    data = generate_latest(controller_of(request).metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
