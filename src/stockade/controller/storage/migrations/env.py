"""Alembic environment: runs migrations on the connection handed in by ``db.migrate``."""

from __future__ import annotations

from alembic import context

from stockade.controller.storage.db import Base

target_metadata = Base.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("stockade migrations run through stockade.controller.storage.db.migrate()")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
