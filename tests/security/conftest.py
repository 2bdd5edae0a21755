"""The security layer reuses the API layer's fixtures: the real app on SQLite and PostgreSQL."""

from tests.api.conftest import api, database_url, pg_cluster, sqlite_api  # noqa: F401 (fixtures)
