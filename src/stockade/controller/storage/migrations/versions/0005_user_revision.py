"""A revision for users, so user edits carry an ETag and honour If-Match like every object.

Existing users start at revision 1. A plain ``ADD COLUMN`` with a constant default works in
place on SQLite and PostgreSQL alike; no batch table copy, which on SQLite would drop and
recreate ``users`` and with foreign keys on cascade-delete every session.

Revision ID: 0005_user_revision
Revises: 0004_flow_storage_params
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_user_revision"
down_revision = "0004_flow_storage_params"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("revision", sa.Integer, nullable=False, server_default=sa.text("1")))


def downgrade() -> None:
    op.drop_column("users", "revision")  # native DROP COLUMN (SQLite >= 3.35)
