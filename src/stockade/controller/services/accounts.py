"""Users, sessions and API keys as stored: every query and change the ``/users``, ``/api-keys`` and
``/auth`` routes make, with its audit event, inside the caller's transaction.

Rules kept here (not in the routes): the last enabled owner cannot be demoted, disabled or deleted;
a password change ends the user's other sessions; deleting a user ends its sessions and revokes its
keys (a later user of the same name must not inherit them); a key created by a key belongs to that
key's user. ETags cover everything shown of a user but the revision.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stockade.controller.services import auth
from stockade.controller.services.auth import Passwords, Role
from stockade.controller.services.events import record_event
from stockade.controller.storage import store
from stockade.controller.storage.db import ApiKeyRow, SessionRow, UserRow, utcnow
from stockade.errors import ConflictError, NotFoundError


def user_state(u: UserRow) -> dict[str, Any]:
    """What a user's ETag covers (with the revision): everything shown but the revision itself."""
    return {"username": u.username, "role": u.role, "scope": list(u.scope), "disabled": u.disabled,
            "created_at": u.created_at.isoformat()}


def user_etag(u: UserRow) -> str:
    return store.etag_of(u.revision, user_state(u))


def end_session(db: Session, cookie: str) -> None:
    row = db.get(SessionRow, auth.sha256(cookie))
    if row is not None:
        db.delete(row)


def _owners_left(db: Session, excluding: str) -> int:
    q = select(func.count()).select_from(UserRow).where(
        UserRow.role == Role.OWNER.value, UserRow.disabled.is_(False), UserRow.username != excluding
    )
    return int(db.scalar(q) or 0)


def get_user(db: Session, username: str) -> UserRow:
    row = db.get(UserRow, username)
    if row is None:
        raise NotFoundError(f"no user {username!r}")
    return row


def list_users(db: Session) -> list[UserRow]:
    return list(db.scalars(select(UserRow).order_by(UserRow.username)))


def create_user(db: Session, passwords: Passwords, actor: str, username: str, password: str, role: Role,
                scope: list[str]) -> UserRow:
    if db.get(UserRow, username) is not None:
        raise ConflictError(f"user {username!r} exists")
    row = auth.create_user(db, passwords, username, password, role, scope)
    db.flush()
    record_event(db, actor, "user.create", "user", username, None, {"role": role.value, "scope": scope})
    return row


def update_user(db: Session, passwords: Passwords, actor: str, username: str, if_match: str | None, *,
                password: str | None, role: Role | None, scope: list[str] | None, disabled: bool | None,
                keep_session: str | None) -> UserRow:
    """Apply the given changes; ``keep_session`` is the cookie of a user changing their own password."""
    row = get_user(db, username)
    store.check_if_match(if_match, user_etag(row))
    before = {"role": row.role, "scope": list(row.scope), "disabled": row.disabled}
    losing_owner = row.role == Role.OWNER.value and ((role is not None and role is not Role.OWNER) or disabled)
    if losing_owner and _owners_left(db, username) == 0:
        raise ConflictError("the last enabled owner cannot be demoted or disabled")
    ended = 0
    if password is not None:
        row.password_hash = passwords.hash(password)
        ended = auth.end_sessions(db, username, keep=keep_session)
    if role is not None:
        row.role = role.value
    if scope is not None:
        row.scope = list(scope)
    if disabled is not None:
        row.disabled = disabled
    after: dict[str, Any] = {"role": row.role, "scope": list(row.scope), "disabled": row.disabled}
    if after != before or password is not None:
        if password is not None:
            after["password"] = "changed"
            after["sessions_ended"] = ended
        row.revision += 1
        record_event(db, actor, "user.update", "user", username, before, after)
    return row


def delete_user(db: Session, actor: str, username: str, if_match: str | None) -> None:
    row = get_user(db, username)
    store.check_if_match(if_match, user_etag(row))
    if row.role == Role.OWNER.value and _owners_left(db, username) == 0:
        raise ConflictError("the last enabled owner cannot be deleted")
    auth.end_sessions(db, username)
    revoked = auth.revoke_keys_of(db, username)
    db.delete(row)
    record_event(db, actor, "user.delete", "user", username, {"role": row.role},
                 {"api_keys_revoked": revoked} if revoked else None)


def list_keys(db: Session) -> list[ApiKeyRow]:
    return list(db.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))


def create_key(db: Session, actor: str, creator: str, name: str, role: Role,
               scope: list[str]) -> tuple[ApiKeyRow, str]:
    """A new key; ``creator`` is the principal's name (a key creating keys: owned by that key's user)."""
    owner = creator
    if db.get(UserRow, owner) is None:
        key = db.get(ApiKeyRow, owner.removeprefix("key:"))
        owner = key.owner if key is not None else owner
    row, secret = auth.create_api_key(db, name, owner, role, scope)
    db.flush()
    record_event(db, actor, "api_key.create", "api_key", row.id, None, {"name": name, "role": role.value})
    return row, secret


def revoke_key(db: Session, actor: str, key_id: str) -> None:
    row = db.get(ApiKeyRow, key_id)
    if row is None:
        raise NotFoundError(f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_event(db, actor, "api_key.revoke", "api_key", key_id, None, None)
