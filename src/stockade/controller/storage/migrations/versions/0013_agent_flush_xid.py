"""``agents.flushed_xid``: which transaction last flushed an agent's ack or heartbeat (PostgreSQL).

A replica reads the acks and heartbeats the other replicas flushed. It used to re-read every
agent lagging in its view each round (every agent, all through a fleet's enrolment or a global
fan-out: rows x rounds x replicas). The flush now stamps each row it writes with its own 64-bit
transaction id (``pg_current_xact_id()``), and a reader asks only for rows stamped at or after the
oldest transaction that was still running when it last read (``pg_snapshot_xmin``): every flush
committed since, none missed, whatever order the flushes commit in. Indexed for that read; null on
SQLite (one process: nobody else flushes).

Revision ID: 0013_agent_flush_xid
Revises: 0012_workload_backend
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_agent_flush_xid"
down_revision = "0012_workload_backend"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("flushed_xid", sa.BigInteger(), nullable=True))
        batch.create_index("ix_agents_flushed_xid", ["flushed_xid"])


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_index("ix_agents_flushed_xid")
        batch.drop_column("flushed_xid")
