"""Flow links: per hour, per endpoint pair and service, the worst verdict and both sides' counts.

The application map reads this rollup (filled by the flow store's compaction) instead of every
flow summary, so its cost follows how many endpoint pairs talk, not how many addresses.

Revision ID: 0003_flow_links
Revises: 0002_flows
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_flow_links"
down_revision = "0002_flows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flow_links",
        sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("src_ep", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("dst_ep", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("proto", sa.String(8), primary_key=True),
        sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),  # -1: none
        sa.Column("verdict", sa.SmallInteger, nullable=False),
        sa.Column("count_out", sa.BigInteger, nullable=False),
        sa.Column("count_in", sa.BigInteger, nullable=False),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("flow_links")
