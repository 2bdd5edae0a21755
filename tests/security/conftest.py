"""The security tests run against the same real app as tests/api: SQLite, and PostgreSQL started by the setup."""

from tests.api.conftest import api, database_url, pg_cluster, sqlite_api

__all__ = ["api", "database_url", "pg_cluster", "sqlite_api"]
