"""WireGuard public keys: ``wireguard_keys`` (one per workload, unique key, endpoint, port).

The agent makes its key pair on the host and registers the public half (at enrolment and on
rotation); the compiler hands it to the peers of the workload's encrypted rules.

Revision ID: 0010_wireguard
Revises: 0009_replicas
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_wireguard"
down_revision = "0009_replicas"  # the planned chain: 0008 -> 0009_replicas -> 0010
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "wireguard_keys",
        sa.Column("workload", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(44), nullable=False, unique=True),
        sa.Column("endpoint", sa.String(45), nullable=True),
        sa.Column("port", sa.Integer, nullable=False, server_default=sa.text("51820")),
        sa.Column("agent_id", sa.String(32), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("wireguard_keys")
