"""Several controller replicas on one PostgreSQL: the change log and the state they share.

* ``change_log``: one row per committed change another replica must follow (written on
  PostgreSQL only; announced with ``NOTIFY stockade_changes``); ``host_state.change_id`` names the
  row whose transaction bumped the host's revision, so a replica catching up reads exactly the
  revisions it missed.
* ``login_failures`` (per-account backoff) and ``rate_hits`` (per-client login and enrolment
  limits): shared between replicas instead of each process counting its own.
* ``workload_departures``: workloads offline past the grace period (compiled without addresses).
* PostgreSQL only: ``flows`` and ``flow_links`` become partitioned by ``RANGE (bucket)`` with a
  ``DEFAULT`` partition holding the existing rows; the flow store carves one partition per day out
  of it as it writes, and retention drops whole days (``storage/flowparts.py``). Same names,
  columns, keys and indexes, so every query is unchanged.

New tables and one nullable column: in place on SQLite and PostgreSQL alike; the flow tables are
copied once on PostgreSQL (a short lock on a large flow store).

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
FLOW_INDEXES = {"flows": [("ix_flows_bucket_src_ip", "bucket, src_ip"), ("ix_flows_bucket_dst_ip", "bucket, dst_ip"),
                          ("ix_flows_bucket_src_ep", "bucket, src_ep"), ("ix_flows_bucket_dst_ep", "bucket, dst_ep"),
                          ("ix_flows_bucket_port_verdict", "bucket, port, verdict")],
                "flow_links": []}
FLOW_KEYS = {"flows": "bucket, h", "flow_links": "bucket, src_ep, dst_ep, proto, port"}
FLOW_PARAMS = {
    "flows": "fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02",
    "flow_links": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, "
                  "autovacuum_vacuum_cost_delay = 0",
}


def _rebuild_flow_table(table: str, partitioned: bool) -> None:
    """Copy ``table`` into a new one with the same columns, key and indexes, partitioned by bucket
    (with a default partition) or plain, and put it in the old one's place."""
    old = f"{table}_before_0009"
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {table}_pkey TO {old}_pkey")
    for name, _cols in FLOW_INDEXES[table]:
        op.execute(f"ALTER INDEX IF EXISTS {name} RENAME TO {name}_before_0009")
    tail = " PARTITION BY RANGE (bucket)" if partitioned else f" WITH ({FLOW_PARAMS[table]})"
    op.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS, PRIMARY KEY ({FLOW_KEYS[table]})){tail}")
    for name, cols in FLOW_INDEXES[table]:
        op.execute(f"CREATE INDEX {name} ON {table} ({cols})")
    if partitioned:
        op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT WITH ({FLOW_PARAMS[table]})")
    op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
    op.execute(f"DROP TABLE {old}")


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
    if op.get_bind().dialect.name == "postgresql":
        for table in ("flows", "flow_links"):
            _rebuild_flow_table(table, partitioned=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in ("flows", "flow_links"):
            _rebuild_flow_table(table, partitioned=False)  # every partition's rows, in one plain table
    op.drop_table("workload_departures")
    op.drop_index("ix_rate_hits_key", table_name="rate_hits")
    op.drop_table("rate_hits")
    op.drop_table("login_failures")
    op.drop_table("change_log")
    op.drop_index("ix_host_state_change_id", table_name="host_state")
    op.drop_column("host_state", "change_id")
