"""Alembic migrations of the controller schema (run by ``stockade.controller.storage.db.migrate``)."""
