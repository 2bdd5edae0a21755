"""Alembic migrations of the controller schema (run by ``stockade.controller.db.migrate``)."""
