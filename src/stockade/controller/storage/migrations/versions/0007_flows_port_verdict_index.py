"""Extend the flows port index with the verdict (Explorer "port + verdict" filters).

A busy port's summaries of the current hour are many; with the verdict in the index a query for
the blocked ones does not have to read every one of them. The verdict, like the port, is part of
a summary's key, so compaction's updates never touch the index.

Revision ID: 0007_flows_port_verdict_index
Revises: 0006_flows_port_index
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007_flows_port_verdict_index"
down_revision = "0006_flows_port_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_flows_bucket_port", "flows")
    op.create_index("ix_flows_bucket_port_verdict", "flows", ["bucket", "port", "verdict"])


def downgrade() -> None:
    op.drop_index("ix_flows_bucket_port_verdict", "flows")
    op.create_index("ix_flows_bucket_port", "flows", ["bucket", "port"])
