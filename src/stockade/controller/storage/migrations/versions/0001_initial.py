"""Initial controller schema, with the default label keys seeded.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

DEFAULT_KEYS = ("app", "env", "loc", "role")


def ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    objects = op.create_table(
        "objects",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        ts("created_at"),
        ts("updated_at"),
        sa.UniqueConstraint("kind", "name", name="uq_objects_kind_name"),
    )
    op.create_table(
        "object_labels",
        sa.Column("object_id", sa.Integer, sa.ForeignKey("objects.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(64), nullable=False),
    )
    op.create_index("ix_object_labels_kv", "object_labels", ["key", "value"])
    op.create_table(
        "object_addresses",
        sa.Column("address", sa.String(64), primary_key=True),
        sa.Column("object_id", sa.Integer, sa.ForeignKey("objects.id", ondelete="CASCADE"), nullable=False),
    )
    op.create_index("ix_object_addresses_object_id", "object_addresses", ["object_id"])
    op.create_table(
        "policy_versions",
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
        ts("created_at"),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("content", sa.JSON, nullable=False),
        sa.Column("diff", sa.JSON, nullable=False),
        sa.Column("affected", sa.JSON, nullable=False),
        sa.Column("rollback_of", sa.Integer, nullable=True),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        ts("time"),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("before", sa.JSON, nullable=True),
        sa.Column("after", sa.JSON, nullable=True),
    )
    op.create_index("ix_events_kind_name", "events", ["kind", "name"])
    op.create_table(
        "users",
        sa.Column("username", sa.String(64), primary_key=True),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope", sa.JSON, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        ts("created_at"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope", sa.JSON, nullable=False),
        ts("created_at"),
        ts("revoked_at", nullable=True),
    )
    op.create_table(
        "sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(64), sa.ForeignKey("users.username", ondelete="CASCADE")),
        ts("created_at"),
        ts("expires_at"),
    )
    op.create_table(
        "pairing_profiles",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        ts("expires_at", nullable=True),
        sa.Column("max_uses", sa.Integer, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        ts("created_at"),
    )
    op.create_table(
        "activation_codes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("code_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("profile", sa.String(64), sa.ForeignKey("pairing_profiles.name", ondelete="CASCADE")),
        ts("created_at"),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("workload", sa.String(64), nullable=False, index=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        ts("created_at"),
        ts("revoked_at", nullable=True),
        ts("last_heartbeat", nullable=True),
        sa.Column("applied_revision", sa.Integer, nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
    )
    op.create_table(
        "host_state",
        sa.Column("workload", sa.String(64), primary_key=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("policy_hash", sa.String(64), nullable=False),
        ts("updated_at"),
    )
    now = dt.datetime.now(dt.UTC)
    op.bulk_insert(
        objects,
        [
            {"kind": "label_key", "name": k, "body": {"name": k, "values": []}, "revision": 1,
             "created_at": now, "updated_at": now}
            for k in DEFAULT_KEYS
        ],
    )


def downgrade() -> None:
    for table in ("host_state", "agents", "activation_codes", "pairing_profiles", "sessions", "api_keys",
                  "users", "events", "policy_versions", "object_addresses", "object_labels", "objects"):
        op.drop_table(table)
