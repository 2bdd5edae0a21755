"""Flow storage: per-hour flow summaries, the ingest log, resolved endpoints, per-agent upload counters.

Revision ID: 0002_flows
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_flows"
down_revision = "0001"
branch_labels = None
depends_on = None


def _flow_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("first_seen", sa.BigInteger, nullable=False),
        sa.Column("last_seen", sa.BigInteger, nullable=False),
        sa.Column("src_ip", sa.String(45), nullable=False),
        sa.Column("dst_ip", sa.String(45), nullable=False),
        sa.Column("proto", sa.String(8), nullable=False),
        sa.Column("port", sa.Integer, nullable=True),
        sa.Column("side", sa.SmallInteger, nullable=False),
        sa.Column("verdict", sa.SmallInteger, nullable=False),
        sa.Column("rule_id", sa.String(128), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("reporter", sa.String(64), nullable=False),
        sa.Column("src_ep", sa.Integer, nullable=False),
        sa.Column("dst_ep", sa.Integer, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "flows",
        sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("h", sa.BigInteger, primary_key=True, autoincrement=False),
        *_flow_columns(),
        sqlite_with_rowid=False,
    )
    for col in ("src_ip", "dst_ip", "src_ep", "dst_ep"):
        op.create_index(f"ix_flows_bucket_{col}", "flows", ["bucket", col])
    op.create_table(
        "flow_ingest",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("bucket", sa.Integer, nullable=False),
        sa.Column("h", sa.BigInteger, nullable=False),
        *_flow_columns(),
    )
    op.create_table(
        "flow_endpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("workload", sa.String(64), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.UniqueConstraint("workload", "labels", name="uq_flow_endpoints_workload_labels"),
    )
    op.create_table(
        "flow_agents",
        sa.Column("agent_id", sa.String(32), primary_key=True),
        sa.Column("workload", sa.String(64), nullable=False),
        sa.Column("records", sa.BigInteger, nullable=False),
        sa.Column("batches", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.BigInteger, nullable=False),
        sa.Column("last_upload", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "flow_meta",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("compactions", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(sa.table("flow_meta", sa.column("id", sa.Integer), sa.column("compactions", sa.BigInteger)),
                   [{"id": 1, "compactions": 0}])


def downgrade() -> None:
    for table in ("flow_meta", "flow_agents", "flow_endpoints", "flow_ingest", "flows"):
        op.drop_table(table)
