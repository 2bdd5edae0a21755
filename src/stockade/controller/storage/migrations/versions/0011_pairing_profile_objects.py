"""Pairing profiles become generic objects (kind ``pairing_profile`` in ``objects``).

* Every ``pairing_profiles`` row becomes an ``objects`` row with its canonical body (the one
  :mod:`stockade.codec.pairing_body` writes: sorted labels, explicit defaults, the expiry in UTC),
  keeping its revision and creation time; its ETag changes (it is now the body's, like every
  object's), so a client holding an old ETag reads the profile again.
* The use counter moves to ``pairing_profile_uses`` (one row per profile object).
* ``activation_codes.profile`` (a name, foreign key to ``pairing_profiles``) becomes
  ``profile_id``, a foreign key to the profile's object, ``ON DELETE CASCADE``: deleting a
  profile deletes its codes and its counter, and a profile created again under the same name has
  none of the old codes. Codes keep their id, hash, uses, expiry, revocation and adoption
  binding. The table is copied into its new shape and renamed (SQLite cannot alter a foreign
  key in place); the same steps run on PostgreSQL.
* ``pairing_profiles`` is dropped. The downgrade rebuilds it (and the old codes table) from the
  objects, and deletes them.

Revision ID: 0011_pairing_profile_objects
Revises: 0010_wireguard
Create Date: 2026-12-05
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0011_pairing_profile_objects"
down_revision = "0010_wireguard"
branch_labels = None
depends_on = None

KIND = "pairing_profile"
TS = sa.DateTime(timezone=True)

objects = sa.table("objects", sa.column("id", sa.Integer), sa.column("kind", sa.String), sa.column("name", sa.String),
                   sa.column("body", sa.JSON), sa.column("revision", sa.Integer), sa.column("created_at", TS),
                   sa.column("updated_at", TS))
profiles = sa.table("pairing_profiles", *(sa.column(c) for c in (
    "name", "mode", "max_uses", "uses", "enabled", "description", "revision", "code_max_uses", "code_ttl_seconds")),
    sa.column("labels", sa.JSON), sa.column("expires_at", TS), sa.column("created_at", TS))
uses = sa.table("pairing_profile_uses", sa.column("object_id", sa.Integer), sa.column("uses", sa.Integer))
CODE_COLUMNS = ("id", "code_hash", "created_at", "revoked", "max_uses", "uses", "expires_at", "workload")


def _utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    when = dt.datetime.fromisoformat(value) if isinstance(value, str) else value  # str: SQLite, untyped
    assert isinstance(when, dt.datetime)
    return when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _body(row: Any) -> dict[str, Any]:
    """The canonical body, as ``stockade.codec.pairing_body.encode`` writes it (spelled out: a
    migration must not change when the codec does)."""
    labels = row.labels if isinstance(row.labels, dict) else {}
    expires = _utc(row.expires_at)
    return {
        "name": row.name,
        "labels": {k: labels[k] for k in sorted(labels)},
        "mode": row.mode,
        "expires_at": expires.isoformat() if expires else None,
        "max_uses": row.max_uses,
        "enabled": bool(row.enabled),
        "description": row.description or "",
        "code_max_uses": int(row.code_max_uses),
        "code_ttl_seconds": int(row.code_ttl_seconds),
    }


def _code_columns(profile: sa.Column) -> list[Any]:  # type: ignore[type-arg]
    return [
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("code_hash", sa.String(64), nullable=False, unique=True),
        profile,
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("max_uses", sa.Integer, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("workload", sa.String(64), nullable=True),
    ]


def _copy_codes(new_table: str, profile_column: str, profile_value: Mapping[Any, Any]) -> None:
    """Copy ``activation_codes`` into ``new_table`` (mapping each code's profile), then swap them."""
    conn = op.get_bind()
    old_key = "profile_id" if profile_column == "profile" else "profile"
    old = sa.table("activation_codes", *(sa.column(c) for c in (*CODE_COLUMNS, old_key)))
    new = sa.table(new_table, *(sa.column(c) for c in (*CODE_COLUMNS, profile_column)))
    rows = [{**{c: getattr(r, c) for c in CODE_COLUMNS}, profile_column: profile_value[getattr(r, old_key)]}
            for r in conn.execute(sa.select(old)) if getattr(r, old_key) in profile_value]
    if rows:
        conn.execute(new.insert(), rows)
    op.drop_table("activation_codes")
    op.rename_table(new_table, "activation_codes")


def upgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "pairing_profile_uses",
        sa.Column("object_id", sa.Integer, sa.ForeignKey("objects.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("uses", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    ids: dict[str, int] = {}
    for row in conn.execute(sa.select(profiles).order_by(profiles.c.name)).all():
        created = _utc(row.created_at) or dt.datetime.now(dt.UTC)
        conn.execute(objects.insert().values(kind=KIND, name=row.name, body=_body(row), revision=int(row.revision),
                                             created_at=created, updated_at=created))
        object_id = conn.execute(sa.select(objects.c.id).where(objects.c.kind == KIND, objects.c.name == row.name)
                                 ).scalar_one()
        conn.execute(uses.insert().values(object_id=object_id, uses=int(row.uses or 0)))
        ids[row.name] = object_id
    op.create_table("activation_codes_0011", *_code_columns(
        sa.Column("profile_id", sa.Integer, sa.ForeignKey("objects.id", ondelete="CASCADE"), nullable=False)))
    _copy_codes("activation_codes_0011", "profile_id", ids)
    op.create_index("ix_activation_codes_profile_id", "activation_codes", ["profile_id"])
    op.drop_table("pairing_profiles")


def downgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "pairing_profiles",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("max_uses", sa.Integer, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("code_max_uses", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("code_ttl_seconds", sa.Integer, nullable=False, server_default=sa.text("86400")),
    )
    names: dict[int, str] = {}
    q = sa.select(objects, uses.c.uses).select_from(objects.outerjoin(uses, uses.c.object_id == objects.c.id))
    for row in conn.execute(q.where(objects.c.kind == KIND)).all():
        body = row.body
        expires = body.get("expires_at")
        conn.execute(profiles.insert().values(
            name=row.name, labels=body.get("labels", {}), mode=body.get("mode", "visibility"),
            expires_at=dt.datetime.fromisoformat(expires) if expires else None, max_uses=body.get("max_uses"),
            uses=int(row.uses or 0), enabled=bool(body.get("enabled", True)), description=body.get("description", ""),
            revision=int(row.revision), created_at=_utc(row.created_at) or dt.datetime.now(dt.UTC),
            code_max_uses=int(body.get("code_max_uses", 1)), code_ttl_seconds=int(body.get("code_ttl_seconds", 86400))))
        names[int(row.id)] = row.name
    op.drop_index("ix_activation_codes_profile_id", "activation_codes")
    op.create_table("activation_codes_0010", *_code_columns(
        sa.Column("profile", sa.String(64), sa.ForeignKey("pairing_profiles.name", ondelete="CASCADE"))))
    _copy_codes("activation_codes_0010", "profile", names)
    op.drop_table("pairing_profile_uses")
    conn.execute(objects.delete().where(objects.c.kind == KIND))
