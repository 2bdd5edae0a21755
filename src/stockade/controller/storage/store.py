"""Object repository: create, read, replace, delete and list stored objects with revisions and ETags.

Every write runs in the caller's transaction (a SQLAlchemy ``Session``), checks ``If-Match``
against the current ETag (:class:`StaleRevisionError` -> HTTP 412), validates the body through
the codec and the cross-references of the whole draft (``Policy.validate``), keeps the label and
address side tables of workloads (and the use counter of pairing profiles) in step, and records
an audit event with before/after bodies.

Policy kinds are edited in the draft (the ``objects`` table); reads may also name a provisioned
version (``version=active`` or a number), which are served from the version's frozen content.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.orm import Session

from stockade.controller.services import codec
from stockade.controller.services.codec import KIND_BY_NAME, POLICY_KINDS, Objects, Scope
from stockade.controller.services.events import record_event
from stockade.controller.storage.db import (
    ObjectAddressRow,
    ObjectLabelRow,
    ObjectRow,
    PairingProfileUsesRow,
    VersionRow,
    utcnow,
)
from stockade.errors import ConflictError, Issue, NotFoundError, ValidationError
from stockade.model.labels import Label

MAX_PAGE = 500


class StaleRevisionError(ConflictError):
    """``If-Match`` named an ETag that is no longer current (HTTP 412)."""


@dataclass(frozen=True)
class StoredObject:
    kind: str
    name: str
    revision: int
    body: dict[str, Any]
    updated_at: Any = None
    domain: Any = field(default=None, compare=False, repr=False)  # the decoded object, after a write

    @property
    def etag(self) -> str:
        return etag_of(self.revision, self.body)


@dataclass(frozen=True)
class Page:
    items: tuple[StoredObject, ...]
    next_cursor: str | None


def etag_of(revision: int, body: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return f'"{revision}-{digest}"'


def check_if_match(if_match: str | None, current: str) -> None:
    """Raise :class:`StaleRevisionError` unless ``if_match`` is absent, ``*`` or names ``current``."""
    if if_match is None:
        return
    tags = [t.strip().removeprefix("W/") for t in if_match.split(",")]
    if "*" in tags or current in tags:
        return
    raise StaleRevisionError(f"stale If-Match {if_match}; current ETag is {current}")


def encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        name = base64.b64decode(padded.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValidationError([Issue("api", 0, "cursor", "malformed cursor")]) from None
    if not name or encode_cursor(name) != cursor:
        raise ValidationError([Issue("api", 0, "cursor", "malformed cursor")])
    return name


def parse_label_filter(text: str | None) -> tuple[Label, ...]:
    """``"app=shop,env=prod"`` -> labels; every one must match."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key or not value:
            raise ValidationError([Issue("api", 0, "labels", f"expected key=value, got {part!r}")])
        out.append(Label(key, value))
    return tuple(out)


def _kind(kind: str) -> codec.Kind:
    return KIND_BY_NAME[kind]


# ---- reading ----------------------------------------------------------------------


def _row(db: Session, kind: str, name: str) -> ObjectRow | None:
    return db.scalars(select(ObjectRow).where(ObjectRow.kind == kind, ObjectRow.name == name)).one_or_none()


def names_present(db: Session, kind: str, names: list[str]) -> set[str]:
    """Which of ``names`` exist as ``kind`` (chunked under SQLite's bound-parameter limit)."""
    found: set[str] = set()
    for start in range(0, len(names), 900):
        q = select(ObjectRow.name).where(ObjectRow.kind == kind, ObjectRow.name.in_(names[start : start + 900]))
        found.update(db.scalars(q))
    return found


def _stored(row: ObjectRow) -> StoredObject:
    return StoredObject(row.kind, row.name, row.revision, row.body, row.updated_at)


def active_number(db: Session) -> int:
    return int(db.scalar(select(func.max(VersionRow.number))) or 0)


def version_content(db: Session, version: str | int) -> dict[str, Any]:
    """Frozen content ``{kind: {name: {"revision", "body"}}}`` of a version (``active``: newest)."""
    number = active_number(db) if version == "active" else int(version)
    if number == 0:
        return {}
    row = db.get(VersionRow, number)
    if row is None:
        raise NotFoundError(f"no policy version {number}")
    return row.content


def is_version_number(text: str) -> bool:
    """ASCII digits of a value that fits every backend's INTEGER."""
    return 0 < len(text) <= 9 and text.isascii() and text.isdigit()


def _resolve_version(version: str | None) -> str | int | None:
    if version in (None, "", "draft"):
        return None
    if version == "active":
        return "active"
    assert version is not None
    if is_version_number(version):
        return int(version)
    raise ValidationError([Issue("api", 0, "version", "expected draft, active or a version number")])


def get_object(db: Session, kind: str, name: str, version: str | None = None) -> StoredObject:
    ver = _resolve_version(version)
    if ver is not None and _kind(kind).scope is Scope.POLICY:
        entry = version_content(db, ver).get(kind, {}).get(name)
        if entry is None:
            raise NotFoundError(f"no {kind} named {name!r} in version {ver}")
        return StoredObject(kind, name, int(entry["revision"]), entry["body"])
    row = _row(db, kind, name)
    if row is None:
        raise NotFoundError(f"no {kind} named {name!r}")
    return _stored(row)


def list_objects(
    db: Session,
    kind: str,
    *,
    version: str | None = None,
    name: str | None = None,
    labels: tuple[Label, ...] = (),
    cursor: str | None = None,
    limit: int = 100,
) -> Page:
    """One page of objects ordered by name; ``name`` filters by substring."""
    limit = max(1, min(limit, MAX_PAGE))
    after = decode_cursor(cursor) if cursor else None
    ver = _resolve_version(version)
    if ver is not None and _kind(kind).scope is Scope.POLICY:
        entries = version_content(db, ver).get(kind, {})
        names = sorted(n for n in entries if (after is None or n > after) and (not name or name in n))
        chosen = names[: limit + 1]
        items = tuple(StoredObject(kind, n, int(entries[n]["revision"]), entries[n]["body"]) for n in chosen)
    else:
        q = select(ObjectRow).where(ObjectRow.kind == kind)
        if after is not None:
            q = q.where(ObjectRow.name > after)
        if name:
            q = q.where(ObjectRow.name.contains(name, autoescape=True))
        for lab in labels:
            sub = select(ObjectLabelRow.object_id).where(
                ObjectLabelRow.key == lab.key, ObjectLabelRow.value == lab.value
            )
            q = q.where(ObjectRow.id.in_(sub))
        rows = db.scalars(q.order_by(ObjectRow.name).limit(limit + 1)).all()
        items = tuple(_stored(r) for r in rows)
    more = len(items) > limit
    items = items[:limit]
    return Page(items, encode_cursor(items[-1].name) if more and items else None)


def draft_objects(db: Session, kinds: tuple[str, ...] = POLICY_KINDS) -> Objects:
    out: Objects = {k: {} for k in kinds}
    for row in db.scalars(select(ObjectRow).where(ObjectRow.kind.in_(kinds))):
        out[row.kind][row.name] = row.body
    return out


def draft_revisions(db: Session, kinds: tuple[str, ...] = POLICY_KINDS) -> dict[str, Any]:
    """Draft content in the frozen-version shape ``{kind: {name: {"revision", "body"}}}``."""
    out: dict[str, Any] = {k: {} for k in kinds}
    for row in db.scalars(select(ObjectRow).where(ObjectRow.kind.in_(kinds))):
        out[row.kind][row.name] = {"revision": row.revision, "body": row.body}
    return out


# ---- validation -------------------------------------------------------------------


def validate_draft(db: Session, override: Mapping[str, Mapping[str, Any]] | None = None) -> list[Issue]:
    """Cross-reference issues of the draft policy (with label keys), optionally with some kinds replaced."""
    objects: dict[str, Mapping[str, Any]] = dict(draft_objects(db, (*POLICY_KINDS, "label_key")))
    for kind, bodies in (override or {}).items():
        objects[kind] = bodies
    return codec.build_policy(objects).validate("api")


def label_issues(keys: Mapping[str, Mapping[str, Any]], body: Mapping[str, Any]) -> list[Issue]:
    """Labels of a workload (or of the workloads a pairing profile creates) against the declared
    label keys ``keys`` (the stored ``label_key`` bodies): unknown keys and values not allowed."""
    issues = []
    for key, value in sorted(body.get("labels", {}).items()):
        if key not in keys:
            issues.append(Issue("api", 0, f"labels.{key}", f"unknown label key {key!r}"))
        elif keys[key]["values"] and value not in keys[key]["values"]:
            issues.append(Issue("api", 0, f"labels.{key}", f"value {value!r} not allowed for key {key!r}"))
    return issues


def _check_labels(db: Session, body: Mapping[str, Any]) -> None:
    """Labels of a workload, or of the workloads a pairing profile creates: declared keys and values."""
    issues = label_issues(draft_objects(db, ("label_key",))["label_key"], body)
    if issues:
        raise ValidationError(issues)


def _check_label_key_change(db: Session, name: str, body: Mapping[str, Any] | None) -> None:
    """A label key may not be removed, or narrowed, while workloads or the draft use it."""
    q = select(ObjectLabelRow.value, func.count()).where(ObjectLabelRow.key == name)
    in_use = {str(v): int(n) for v, n in db.execute(q.group_by(ObjectLabelRow.value)).all()}
    allowed = set(body["values"]) if body is not None else None
    if allowed is None and in_use:
        raise ConflictError(f"label key {name!r} is used by {sum(in_use.values())} workload(s)")
    if allowed:
        bad = sorted(v for v in in_use if v not in allowed)
        if bad:
            raise ConflictError(f"label key {name!r}: values in use would become invalid: {', '.join(bad)}")
    keys: dict[str, Mapping[str, Any]] = dict(draft_objects(db, ("label_key",))["label_key"])
    if body is None:
        keys.pop(name, None)
    else:
        keys[name] = dict(body)
    issues = validate_draft(db, {"label_key": keys})
    if issues:
        raise ConflictError("the draft policy would become invalid:\n" + "\n".join(str(i) for i in issues))


def _check_draft(db: Session, kind: str, name: str, body: Mapping[str, Any] | None, deleting: bool) -> None:
    bodies: dict[str, Mapping[str, Any]] = dict(draft_objects(db, (kind,))[kind])
    if body is None:
        bodies.pop(name, None)
    else:
        bodies[name] = body
    issues = validate_draft(db, {kind: bodies})
    if not issues:
        return
    if deleting:
        raise ConflictError(f"{kind} {name!r} is still referenced:\n" + "\n".join(str(i) for i in issues))
    raise ValidationError(issues)


def address_conflict(taken: list[tuple[str, str]]) -> ConflictError:
    """The refusal of a workload write whose addresses (address, owner) other workloads hold."""
    owners = ", ".join(f"{a} (workload {n})" for a, n in taken)
    return ConflictError(f"address already belongs to another workload: {owners}")


def _sync_side_tables(db: Session, row: ObjectRow) -> None:
    if row.kind == "pairing_profile" and db.get(PairingProfileUsesRow, row.id) is None:
        db.add(PairingProfileUsesRow(object_id=row.id, uses=0))  # enrolment counts here
    if row.kind != "workload":
        return
    db.execute(delete(ObjectLabelRow).where(ObjectLabelRow.object_id == row.id))
    db.execute(delete(ObjectAddressRow).where(ObjectAddressRow.object_id == row.id))
    for key, value in row.body.get("labels", {}).items():
        db.add(ObjectLabelRow(object_id=row.id, key=key, value=value))
    addresses = sorted({a for i in row.body.get("interfaces", []) for a in i["addresses"]})
    if addresses:
        taken = db.execute(
            select(ObjectAddressRow.address, ObjectRow.name)
            .join(ObjectRow, ObjectRow.id == ObjectAddressRow.object_id)
            .where(ObjectAddressRow.address.in_(addresses), ObjectAddressRow.object_id != row.id)
        ).all()
        if taken:
            raise address_conflict([(str(a), str(n)) for a, n in taken])
    for a in addresses:
        db.add(ObjectAddressRow(object_id=row.id, address=a))


# ---- writing ----------------------------------------------------------------------


def _validate_write(db: Session, kind: str, name: str, body: dict[str, Any]) -> None:
    if kind in ("workload", "pairing_profile"):
        _check_labels(db, body)
    elif kind == "label_key":
        if _row(db, kind, name) is not None:
            _check_label_key_change(db, name, body)
    else:
        _check_draft(db, kind, name, body, deleting=False)


def create_object(db: Session, kind: str, data: Mapping[str, Any], actor: str) -> StoredObject:
    k = _kind(kind)
    obj = k.decode(data)  # the one conversion of this body
    body = k.encode(obj)
    name = body["name"]
    if _row(db, kind, name) is not None:
        raise ConflictError(f"{kind} {name!r} already exists")
    _validate_write(db, kind, name, body)
    now = utcnow()
    row = ObjectRow(kind=kind, name=name, body=body, revision=1, created_at=now, updated_at=now)
    db.add(row)
    db.flush()
    _sync_side_tables(db, row)
    record_event(db, actor, f"{kind}.create", kind, name, None, body)
    return StoredObject(row.kind, row.name, row.revision, row.body, row.updated_at, obj)


_OBJECTS = cast(Table, ObjectRow.__table__)
_LABEL_KEYS = select(_OBJECTS.c.name, _OBJECTS.c.body).where(_OBJECTS.c.kind == "label_key")
_INSERT_OBJECT = insert(_OBJECTS).returning(_OBJECTS.c.id)
_INSERT_LABELS = insert(cast(Table, ObjectLabelRow.__table__))
_INSERT_ADDRESSES = insert(cast(Table, ObjectAddressRow.__table__))


def insert_workload(db: Session, data: Mapping[str, Any]) -> tuple[StoredObject, tuple[str, str, str, Any, Any]]:
    """Write a NEW workload with set-based Core statements (one ``INSERT ... RETURNING``, one for
    its labels, one for its addresses; no unit-of-work flush), for a caller that has already, in
    this transaction and under the change lock, found the name free and kept only addresses no
    other workload holds (enrolment). The labels are checked here as :func:`create_object` does;
    the unique ``(kind, name)`` and address keys still refuse a caller that did not. Returns the
    stored object and its audit entry for :func:`events.record_events` (the caller's batch)."""
    k = _kind("workload")
    obj = k.decode(data)  # the one conversion of this body
    body = k.encode(obj)
    name = body["name"]
    keys = {str(n): b for n, b in db.execute(_LABEL_KEYS)}
    issues = label_issues(keys, body)
    if issues:
        raise ValidationError(issues)
    now = utcnow()
    row_id = db.execute(_INSERT_OBJECT, {"kind": "workload", "name": name, "body": body, "revision": 1,
                                         "created_at": now, "updated_at": now}).scalar_one()
    labels = [{"object_id": row_id, "key": key, "value": value} for key, value in body.get("labels", {}).items()]
    if labels:
        db.execute(_INSERT_LABELS, labels)
    addresses = sorted({a for i in body.get("interfaces", []) for a in i["addresses"]})
    if addresses:
        db.execute(_INSERT_ADDRESSES, [{"address": a, "object_id": row_id} for a in addresses])
    return StoredObject("workload", name, 1, body, now, obj), ("workload.create", "workload", name, None, body)


def replace_object(
    db: Session, kind: str, name: str, data: Mapping[str, Any], actor: str, if_match: str | None = None
) -> tuple[StoredObject, StoredObject]:
    """Replace ``name``'s body; returns (before, after)."""
    k = _kind(kind)
    payload = dict(data)
    payload.setdefault("name", name)
    obj = k.decode(payload)  # the one conversion of this body
    body = k.encode(obj)
    if body["name"] != name:
        raise ValidationError([Issue("api", 0, "name", f"body name {body['name']!r} differs from the URL {name!r}")])
    row = _row(db, kind, name)
    if row is None:
        raise NotFoundError(f"no {kind} named {name!r}")
    before = _stored(row)
    check_if_match(if_match, before.etag)
    if body == row.body:
        return before, StoredObject(before.kind, before.name, before.revision, before.body, before.updated_at, obj)
    _validate_write(db, kind, name, body)
    row.body = body
    row.revision += 1
    row.updated_at = utcnow()
    db.flush()
    _sync_side_tables(db, row)
    record_event(db, actor, f"{kind}.update", kind, name, before.body, body)
    return before, StoredObject(row.kind, row.name, row.revision, row.body, row.updated_at, obj)


def delete_object(db: Session, kind: str, name: str, actor: str, if_match: str | None = None) -> StoredObject:
    row = _row(db, kind, name)
    if row is None:
        raise NotFoundError(f"no {kind} named {name!r}")
    before = _stored(row)
    check_if_match(if_match, before.etag)
    if kind == "label_key":
        _check_label_key_change(db, name, None)
    elif _kind(kind).scope is Scope.POLICY:
        _check_draft(db, kind, name, None, deleting=True)
    db.delete(row)
    db.flush()
    record_event(db, actor, f"{kind}.delete", kind, name, before.body, None)
    return before


def put_objects(db: Session, kind: str, bodies: Mapping[str, dict[str, Any]], actor: str, prune: bool) -> list[str]:
    """Bulk upsert canonical ``bodies`` of one kind (no cross-reference check: the caller validates).

    With ``prune`` objects of the kind absent from ``bodies`` are deleted. Returns the names changed.
    """
    rows = {r.name: r for r in db.scalars(select(ObjectRow).where(ObjectRow.kind == kind))}
    changed: list[str] = []
    now = utcnow()
    for name in sorted(bodies):
        body = bodies[name]
        row = rows.get(name)
        if row is None:
            row = ObjectRow(kind=kind, name=name, body=body, revision=1, created_at=now, updated_at=now)
            db.add(row)
            record_event(db, actor, f"{kind}.create", kind, name, None, body)
        elif row.body != body:
            record_event(db, actor, f"{kind}.update", kind, name, row.body, body)
            row.body = body
            row.revision += 1
            row.updated_at = now
        else:
            continue
        db.flush()
        _sync_side_tables(db, row)
        changed.append(name)
    if prune:
        for name in sorted(set(rows) - set(bodies)):
            record_event(db, actor, f"{kind}.delete", kind, name, rows[name].body, None)
            db.delete(rows[name])
            changed.append(name)
        db.flush()
    return changed
