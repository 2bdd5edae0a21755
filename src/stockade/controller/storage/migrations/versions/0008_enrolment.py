"""Enrolment hardening: codes with uses and expiry, adoption codes, agent keys, quarantine.

* ``pairing_profiles.code_max_uses`` (default 1) and ``code_ttl_seconds`` (default one day):
  what a new activation code of the profile allows.
* ``activation_codes.max_uses``, ``uses``, ``expires_at``, ``workload`` (an adoption code is
  bound to one workload name). Codes issued before this migration were unlimited; they keep
  ``max_uses`` NULL (bounded only by the profile's own limit) but now expire seven days after the
  upgrade, so no code lives for ever.
* ``agents.public_key`` (Ed25519, base64url; NULL for agents enrolled before: bound at their
  first start after the upgrade), ``quarantined_at``, ``quarantine_reason``, ``held_interfaces``.

Plain ``ADD COLUMN`` with constant defaults: in place on SQLite and PostgreSQL alike.

Revision ID: 0008_enrolment
Revises: 0007_flows_port_verdict_index
Create Date: 2026-12-05
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0008_enrolment"
down_revision = "0007_flows_port_verdict_index"
branch_labels = None
depends_on = None

LEGACY_CODE_DAYS = 7


def upgrade() -> None:
    op.add_column("pairing_profiles",
                  sa.Column("code_max_uses", sa.Integer, nullable=False, server_default=sa.text("1")))
    op.add_column("pairing_profiles",
                  sa.Column("code_ttl_seconds", sa.Integer, nullable=False, server_default=sa.text("86400")))
    op.add_column("activation_codes", sa.Column("max_uses", sa.Integer, nullable=True))
    op.add_column("activation_codes", sa.Column("uses", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.add_column("activation_codes", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("activation_codes", sa.Column("workload", sa.String(64), nullable=True))
    op.add_column("agents", sa.Column("public_key", sa.String(64), nullable=True))
    op.add_column("agents", sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("agents", sa.Column("quarantine_reason", sa.Text, nullable=True))
    op.add_column("agents", sa.Column("held_interfaces", sa.JSON, nullable=True))
    codes = sa.table("activation_codes", sa.column("expires_at", sa.DateTime(timezone=True)))
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(days=LEGACY_CODE_DAYS)
    op.execute(codes.update().values(expires_at=deadline))


def downgrade() -> None:
    for table, column in (("agents", "held_interfaces"), ("agents", "quarantine_reason"),
                          ("agents", "quarantined_at"), ("agents", "public_key"),
                          ("activation_codes", "workload"), ("activation_codes", "expires_at"),
                          ("activation_codes", "uses"), ("activation_codes", "max_uses"),
                          ("pairing_profiles", "code_ttl_seconds"), ("pairing_profiles", "code_max_uses")):
        op.drop_column(table, column)
