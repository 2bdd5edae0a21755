"""Authentication (API keys, sessions, agent tokens), RBAC and rate limiting.

Credentials, checked in this order on every request:

* ``Authorization: Bearer stk_<id>_<secret>`` - an API key. Only SHA-256(secret) is stored
  (the secret is 256 random bits, so a slow hash adds nothing); the key is shown once.
* ``Authorization: Bearer agt_<agent-id>_<secret>`` - an agent token (see ``agents_api``).
* cookie ``stockade_session`` - a web console session made by ``POST /api/v1/auth/login``
  (argon2id password check; the table stores SHA-256 of the cookie; HttpOnly, SameSite=Strict).

Roles (``Role``), from most to least powerful: owner (everything, including users and API
keys), admin (all policy, inventory, provisioning, agents), ruleset-manager (reads everything,
writes rulesets whose every scope lies inside its label scope), read-only (reads). Agents are
a separate principal kind that may only use the agent endpoints for themselves. Every route
declares one :class:`Permission` through :func:`require`; the allow table is
:data:`ALLOWED`. Login and enrolment are rate limited per client address.

An API key is worth at most what its user is worth *now*: on every request its role is the
lesser of the key's role and the owner's current role (:func:`lesser_role`), and its label scope
the narrower of the two (:func:`narrower_scope`: the union of required labels, so the key
reaches only workloads both scopes reach). A disabled or deleted user's keys stop working.

Failed logins back off per account (:class:`LoginThrottle`): after a few failures in a row the
account refuses every attempt for a while, doubling up to a cap. On SQLite the counters and the
per-client rate limit live in the controller process's memory (a restart forgets them); on
PostgreSQL, where several replicas may share the database, the same policy counts in tables
(:mod:`stockade.controller.services.shared_limits`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from stockade.controller.storage.db import ApiKeyRow, SessionRow, UserRow, utcnow
from stockade.errors import AuthError
from stockade.model.labels import Label

SESSION_COOKIE = "stockade_session"
SESSION_HOURS = 12


class RateLimitedError(AuthError):
    """Too many attempts from one client (HTTP 429)."""


class NotAuthenticatedError(AuthError):
    """No valid credential (HTTP 401)."""


class ForbiddenError(AuthError):
    """Authenticated, but not allowed (HTTP 403)."""


class Role(Enum):
    OWNER = "owner"
    ADMIN = "admin"
    RULESET_MANAGER = "ruleset-manager"
    READ_ONLY = "read-only"


class Permission(Enum):
    PUBLIC = "public"  # no credential (login, enrolment with a code)
    READ = "read"
    WRITE_RULESETS = "write-rulesets"
    WRITE = "write"
    MANAGE_USERS = "manage-users"
    AGENT = "agent"


ALLOWED: dict[Permission, frozenset[Role]] = {
    Permission.READ: frozenset(Role),
    Permission.WRITE_RULESETS: frozenset({Role.OWNER, Role.ADMIN, Role.RULESET_MANAGER}),
    Permission.WRITE: frozenset({Role.OWNER, Role.ADMIN}),
    Permission.MANAGE_USERS: frozenset({Role.OWNER}),
    Permission.AGENT: frozenset(),
}


ROLE_ORDER: tuple[Role, ...] = (Role.OWNER, Role.ADMIN, Role.RULESET_MANAGER, Role.READ_ONLY)  # strongest first


def lesser_role(a: Role, b: Role) -> Role:
    """The less powerful of two roles."""
    return a if ROLE_ORDER.index(a) >= ROLE_ORDER.index(b) else b


def narrower_scope(a: tuple[Label, ...], b: tuple[Label, ...]) -> tuple[Label, ...]:
    """Both label scopes at once: a scope is a set of required labels, so requiring both sets
    reaches only what each reaches (an empty scope adds no requirement)."""
    return tuple(sorted(set(a) | set(b)))


class PrincipalKind(Enum):
    USER = "user"
    API_KEY = "api-key"
    AGENT = "agent"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    name: str  # username, "key:<id>" or "agent:<id>"
    role: Role | None
    scope: tuple[Label, ...] = ()
    agent_id: str = ""
    workload: str = ""

    @property
    def actor(self) -> str:
        return self.name


ANONYMOUS = Principal(PrincipalKind.ANONYMOUS, "anonymous", None)

@dataclass(frozen=True)
class Argon2Params:
    """argon2id cost; the default is RFC 9106's second recommendation (64 MiB, 3 passes)."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


class Passwords:
    """Hashes and verifies passwords with argon2id (the parameters travel inside each hash)."""

    def __init__(self, params: Argon2Params = Argon2Params()) -> None:
        self._hasher = PasswordHasher(
            time_cost=params.time_cost, memory_cost=params.memory_kib, parallelism=params.parallelism
        )
        self._dummy: str | None = None

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def burn(self, password: str) -> None:
        """Spend the time of one verification (unknown user: no timing oracle)."""
        if self._dummy is None:
            self._dummy = self.hash("stockade-dummy-password")
        self.verify(self._dummy, password)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def scope_labels(texts: list[Any]) -> tuple[Label, ...]:
    out = []
    for t in texts:
        key, _, value = str(t).partition("=")
        out.append(Label(key, value))
    return tuple(sorted(out))


# ---- users, keys, sessions ---------------------------------------------------------


def create_user(
    db: Session, passwords: Passwords, username: str, password: str, role: Role, scope: list[str]
) -> UserRow:
    row = UserRow(
        username=username, password_hash=passwords.hash(password), role=role.value, scope=scope, disabled=False
    )
    db.add(row)
    return row


def bootstrap_owner(db: Session, passwords: Passwords) -> tuple[str, str] | None:
    """On first run (no users), create ``admin`` as owner; returns (username, password) once."""
    if db.scalars(select(UserRow).limit(1)).first() is not None:
        return None
    password = secrets.token_urlsafe(18)
    create_user(db, passwords, "admin", password, Role.OWNER, [])
    return "admin", password


def create_api_key(db: Session, name: str, owner: str, role: Role, scope: list[str]) -> tuple[ApiKeyRow, str]:
    key_id = secrets.token_hex(8)
    secret = new_secret()
    row = ApiKeyRow(id=key_id, secret_hash=sha256(secret), name=name, owner=owner, role=role.value, scope=scope)
    db.add(row)
    return row, f"stk_{key_id}_{secret}"


def login(db: Session, passwords: Passwords, username: str, password: str) -> tuple[UserRow, str]:
    user = db.get(UserRow, username)
    if user is None or user.disabled:
        passwords.burn(password)  # same work whether or not the user exists
        raise NotAuthenticatedError("wrong username or password")
    if not passwords.verify(user.password_hash, password):
        raise NotAuthenticatedError("wrong username or password")
    secret = new_secret()
    now = utcnow()
    db.add(SessionRow(id_hash=sha256(secret), username=username, created_at=now,
                      expires_at=now + dt.timedelta(hours=SESSION_HOURS)))
    return user, secret


def end_sessions(db: Session, username: str, keep: str | None = None) -> int:
    """Log ``username`` out everywhere except the session whose cookie is ``keep``; returns how many ended."""
    q = select(SessionRow).where(SessionRow.username == username)
    ended = 0
    for row in db.scalars(q):
        if keep is not None and secrets.compare_digest(row.id_hash, sha256(keep)):
            continue
        db.delete(row)
        ended += 1
    return ended


def revoke_keys_of(db: Session, username: str) -> list[str]:
    """Revoke every live API key owned by ``username``; returns their ids."""
    now = utcnow()
    ids = []
    for row in db.scalars(select(ApiKeyRow).where(ApiKeyRow.owner == username, ApiKeyRow.revoked_at.is_(None))):
        row.revoked_at = now
        ids.append(row.id)
    return ids


# ---- request authentication ---------------------------------------------------------

AgentLookup = Callable[[str, str], Principal | None]  # (agent id, secret) -> principal


def authenticate(request: Request, db: Session, agent_lookup: AgentLookup) -> Principal:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise NotAuthenticatedError("expected 'Authorization: Bearer <token>'")
        token = token.strip()
        if token.startswith("stk_"):
            return _api_key_principal(db, token)
        if token.startswith("agt_"):
            agent_id, _, secret = token[4:].partition("_")
            found = agent_lookup(agent_id, secret)
            if found is None:
                raise NotAuthenticatedError("unknown or revoked agent token")
            return found
        raise NotAuthenticatedError("unrecognised bearer token")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        sess = db.get(SessionRow, sha256(cookie))
        if sess is None or sess.expires_at < utcnow():
            raise NotAuthenticatedError("session expired; log in again")
        user = db.get(UserRow, sess.username)
        if user is None or user.disabled:
            raise NotAuthenticatedError("user disabled")
        return Principal(PrincipalKind.USER, user.username, Role(user.role), scope_labels(user.scope))
    raise NotAuthenticatedError("authentication required")


def _api_key_principal(db: Session, token: str) -> Principal:
    key_id, _, secret = token[4:].partition("_")
    row = db.get(ApiKeyRow, key_id) if key_id else None
    if row is None or row.revoked_at is not None or not secrets.compare_digest(row.secret_hash, sha256(secret)):
        raise NotAuthenticatedError("unknown or revoked API key")
    owner = db.get(UserRow, row.owner)
    if owner is None or owner.disabled:
        raise NotAuthenticatedError("the key's owner is disabled or deleted")
    role = lesser_role(Role(row.role), Role(owner.role))  # the owner's role as of now, every request
    scope = narrower_scope(scope_labels(row.scope), scope_labels(owner.scope))
    return Principal(PrincipalKind.API_KEY, f"key:{row.id}", role, scope)


def authorize(principal: Principal, permission: Permission) -> None:
    if permission is Permission.PUBLIC:
        return
    if permission is Permission.AGENT:
        if principal.kind is not PrincipalKind.AGENT:
            raise ForbiddenError("only agents may use this endpoint")
        return
    if principal.role is None or principal.role not in ALLOWED[permission]:
        raise ForbiddenError(f"role {principal.role.value if principal.role else principal.kind.value} "
                             f"may not {permission.value}")


# ---- rate limiting -------------------------------------------------------------------


class RateLimiter:
    """Sliding-window limit of ``limit`` calls per ``window`` seconds per key."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._hits[key]
            while q and q[0] <= now - self.window:
                q.popleft()
            if len(q) >= self.limit:
                raise RateLimitedError(f"too many attempts; retry in {int(q[0] + self.window - now) + 1} s")
            q.append(now)


@dataclass(frozen=True)
class LockoutPolicy:
    """Per-account backoff: ``free_failures`` failed logins in a row are free; each further one
    locks the account for ``base_seconds`` doubled per extra failure, at most ``max_seconds``.
    A success resets the count; so does ``forget_seconds`` without a failure."""

    free_failures: int = 5
    base_seconds: float = 30.0
    max_seconds: float = 900.0
    forget_seconds: float = 3600.0
    max_tracked: int = 100_000  # accounts remembered at once (oldest dropped): bounded memory

    def lock_for(self, failures: int) -> float:
        extra = failures - self.free_failures
        if extra < 0:
            return 0.0
        return float(min(self.max_seconds, self.base_seconds * (2 ** min(extra, 32))))


@dataclass
class _Account:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Counts consecutive failed logins per username (existing or not, so the answer reveals
    nothing about which accounts exist) and refuses attempts while an account is locked.

    In memory, per controller process (SQLite, one process): enough to turn an online password
    guess into hours per handful of tries. Replicas on PostgreSQL use ``SharedLoginThrottle``.
    """

    def __init__(self, policy: LockoutPolicy = LockoutPolicy(), clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()

    def _get(self, username: str, now: float) -> _Account | None:
        acc = self._accounts.get(username)
        if acc is not None and now > max(acc.last_failure + self.policy.forget_seconds, acc.locked_until):
            del self._accounts[username]
            return None
        return acc

    def check(self, username: str) -> None:
        """Raise :class:`RateLimitedError` while ``username`` is locked."""
        now = self.clock()
        with self._lock:
            acc = self._get(username, now)
            if acc is not None and acc.locked_until > now:
                raise RateLimitedError(f"too many failed logins for this account; retry in "
                                       f"{int(acc.locked_until - now) + 1} s")

    def failed(self, username: str) -> tuple[int, float]:
        """Record a failure; returns (failures in a row, seconds the account is now locked)."""
        now = self.clock()
        with self._lock:
            acc = self._get(username, now)
            if acc is None:
                if len(self._accounts) >= self.policy.max_tracked:
                    self._accounts.pop(next(iter(self._accounts)))
                acc = self._accounts[username] = _Account()
            acc.failures += 1
            acc.last_failure = now
            lock = self.policy.lock_for(acc.failures)
            acc.locked_until = now + lock
            return acc.failures, lock

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._accounts.pop(username, None)
