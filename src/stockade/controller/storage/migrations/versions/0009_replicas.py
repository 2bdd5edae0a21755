"""Several controller replicas on one PostgreSQL: the change log and the state they share.

* ``change_log``: one row per committed change another replica must follow (written on
  PostgreSQL only; announced with ``NOTIFY stockade_changes``); ``host_state.change_id`` names the
  row whose transaction bumped the host's revision, so a replica catching up reads exactly the
  revisions it missed.
* ``login_failures`` (per-account backoff) and ``rate_hits`` (per-client login and enrolment
  limits): shared between replicas instead of each process counting its own.
* ``workload_departures``: workloads offline past the grace period (compiled without addresses).

New tables and one nullable column: in place on SQLite and PostgreSQL alike.

Revision ID: 0009_replicas
Revises: 0008_enrolment
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_replicas"
down_revision = "0008_enrolment"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.add_column("host_state", sa.Column("change_id", sa.BigInteger, nullable=True))
    op.create_index("ix_host_state_change_id", "host_state", ["change_id"])
    op.create_table(
        "change_log",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("origin", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_table(
        "login_failures",
        sa.Column("username", sa.String(256), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure", sa.Double, nullable=False),
        sa.Column("locked_until", sa.Double, nullable=False),
    )
    op.create_table(
        "rate_hits",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.create_index("ix_rate_hits_key", "rate_hits", ["scope", "key", "at"])
    op.create_table(
        "workload_departures",
        sa.Column("workload", sa.String(64), primary_key=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workload_departures")
    op.drop_index("ix_rate_hits_key", table_name="rate_hits")
    op.drop_table("rate_hits")
    op.drop_table("login_failures")
    op.drop_table("change_log")
    op.drop_index("ix_host_state_change_id", table_name="host_state")
    op.drop_column("host_state", "change_id")
