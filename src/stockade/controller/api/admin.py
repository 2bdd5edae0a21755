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

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stockade.controller.api.dto.admin import (
    ApiKeyIn,
    ApiKeyOut,
    LoginIn,
    UserIn,
    UserOut,
    UserUpdate,
    WhoAmI,
)
from stockade.controller.api.schemas import ErrorOut
from stockade.controller.context import controller_of, require
from stockade.controller.services import accounts, auth
from stockade.controller.services.auth import Permission, Principal, PrincipalKind
from stockade.controller.services.events import record_event
from stockade.controller.storage.db import ApiKeyRow, UserRow

router = APIRouter()
metrics_router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
EDIT_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 412: {"model": ErrorOut}}
IfMatch = Annotated[str | None, Header(max_length=200, description="ETag of the user as last read")]


def _user_out(u: UserRow, response: Response | None = None) -> UserOut:
    etag = accounts.user_etag(u)
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
            accounts.end_session(db, cookie)
    out = Response(status_code=204)
    out.delete_cookie(auth.SESSION_COOKIE, path="/")
    return out


@router.get("/auth/whoami", tags=["Auth"], responses=ERRORS, operation_id="whoami")
def whoami(principal: Annotated[Principal, Depends(require(Permission.READ))]) -> WhoAmI:
    return WhoAmI(name=principal.name, kind=principal.kind.value,
                  role=principal.role.value if principal.role else None, scope=[str(x) for x in principal.scope])


@router.get("/users", tags=["Users"], responses=ERRORS, operation_id="list-users")
def list_users(request: Request,
               principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> list[UserOut]:
    with controller_of(request).session() as db:
        return [_user_out(u) for u in accounts.list_users(db)]


@router.post("/users", tags=["Users"], responses=ERRORS, status_code=201, operation_id="create-user")
def create_user(request: Request, response: Response, body: UserIn,
                principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> UserOut:
    ctl = controller_of(request)
    with ctl.sessions.begin() as db:
        row = accounts.create_user(db, ctl.passwords, principal.actor, body.username, body.password, body.role,
                                   list(body.scope))
        return _user_out(row, response)


@router.get("/users/{username}", tags=["Users"], responses=ERRORS, operation_id="get-user")
def get_user(request: Request, response: Response, username: str,
             principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> UserOut:
    with controller_of(request).session() as db:
        return _user_out(accounts.get_user(db, username), response)


@router.put("/users/{username}", tags=["Users"], responses=EDIT_ERRORS, operation_id="update-user")
def update_user(request: Request, response: Response, username: str, body: UserUpdate,
                principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))],
                if_match: IfMatch = None) -> UserOut:
    ctl = controller_of(request)
    own = principal.kind is PrincipalKind.USER and principal.name == username
    with ctl.sessions.begin() as db:
        row = accounts.update_user(
            db, ctl.passwords, principal.actor, username, if_match, password=body.password, role=body.role,
            scope=list(body.scope) if body.scope is not None else None, disabled=body.disabled,
            keep_session=request.cookies.get(auth.SESSION_COOKIE) if own else None)
        return _user_out(row, response)


@router.delete("/users/{username}", tags=["Users"], responses=EDIT_ERRORS, status_code=204,
               operation_id="delete-user")
def delete_user(request: Request, username: str,
                principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))],
                if_match: IfMatch = None) -> Response:
    with controller_of(request).sessions.begin() as db:
        accounts.delete_user(db, principal.actor, username, if_match)
    return Response(status_code=204)


@router.get("/api-keys", tags=["API keys"], responses=ERRORS, operation_id="list-api-keys")
def list_api_keys(request: Request,
                  principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> list[ApiKeyOut]:
    with controller_of(request).session() as db:
        return [_key_out(k) for k in accounts.list_keys(db)]


@router.post("/api-keys", tags=["API keys"], responses=ERRORS, status_code=201, operation_id="create-api-key")
def create_api_key(request: Request, body: ApiKeyIn,
                   principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> ApiKeyOut:
    with controller_of(request).sessions.begin() as db:
        row, secret = accounts.create_key(db, principal.actor, principal.name, body.name, body.role,
                                          list(body.scope))
        return _key_out(row, secret)


@router.delete("/api-keys/{key_id}", tags=["API keys"], responses=ERRORS, status_code=204,
               operation_id="revoke-api-key")
def revoke_api_key(request: Request, key_id: str,
                   principal: Annotated[Principal, Depends(require(Permission.MANAGE_USERS))]) -> Response:
    with controller_of(request).sessions.begin() as db:
        accounts.revoke_key(db, principal.actor, key_id)
    return Response(status_code=204)


@metrics_router.get("/metrics", tags=["Metrics"], responses=ERRORS, response_class=Response,
                    operation_id="metrics")
def metrics(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))]) -> Response:
    data = generate_latest(controller_of(request).metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
