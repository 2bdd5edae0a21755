"""Workload ``backend`` becomes a controller setting: the stored old default turns into null.

Until now every stored workload body carried ``"backend": "nftables"`` (the REST schema's default)
and nothing acted on it. The field now switches the host's agent to that backend, so a stored
default would switch every agent started with another ``--backend`` to nftables at upgrade. What
the old data meant is "whatever the agent runs": null. Other names (set on purpose) are kept.
The object's revision is bumped, so an ETag read before the upgrade no longer matches.

Revision ID: 0012_workload_backend
Revises: 0010_wireguard (the coordinator re-points it at 0011 when that lands)
Create Date: 2026-12-05
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0012_workload_backend"
down_revision = "0011_pairing_profile_objects"
branch_labels = None
depends_on = None

_OBJECTS = sa.table(
    "objects",
    sa.column("id", sa.Integer),
    sa.column("kind", sa.String),
    sa.column("body", sa.JSON),
    sa.column("revision", sa.Integer),
)


def _rewrite(old: str | None, new: str | None) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(_OBJECTS.c.id, _OBJECTS.c.body, _OBJECTS.c.revision)
                        .where(_OBJECTS.c.kind == "workload")).all()
    for row_id, raw, rev in rows:
        body: Any = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(body, dict) or body.get("backend") != old:
            continue
        conn.execute(sa.update(_OBJECTS).where(_OBJECTS.c.id == row_id)
                     .values(body={**body, "backend": new}, revision=rev + 1))


def upgrade() -> None:
    _rewrite("nftables", None)


def downgrade() -> None:
    _rewrite(None, "nftables")
