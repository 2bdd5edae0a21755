"""Index flow summaries by hour and destination port (Explorer port filters).

Compaction never changes a summary's port (it is part of the row's key), so the index costs one
insert per new summary and nothing per update (PostgreSQL updates stay HOT).

Revision ID: 0006_flows_port_index
Revises: 0005_user_revision
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0006_flows_port_index"
down_revision = "0005_user_revision"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_flows_bucket_port", "flows", ["bucket", "port"])


def downgrade() -> None:
    op.drop_index("ix_flows_bucket_port", "flows")
