"""PostgreSQL storage parameters for the flow tables (no-op on SQLite).

Compaction updates the same summary and link rows again and again (counts, last seen). With
free room on each page (``fillfactor``) those updates stay HOT (no index change, dead versions
pruned on the page), and a low vacuum threshold keeps the tables from bloating between the
default autovacuum rounds.

Revision ID: 0004_flow_storage_params
Revises: 0003_flow_links
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004_flow_storage_params"
down_revision = "0003_flow_links"
branch_labels = None
depends_on = None

PARAMS = {
    "flows": "fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02",
    "flow_links": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, "
                  "autovacuum_vacuum_cost_delay = 0",
    "flow_ingest": "autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 100000",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, params in PARAMS.items():
        op.execute(f"ALTER TABLE {table} SET ({params})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, params in PARAMS.items():
        names = ", ".join(p.split("=")[0].strip() for p in params.split(","))
        op.execute(f"ALTER TABLE {table} RESET ({names})")
