"""The replica layer reuses the API layer's throwaway PostgreSQL cluster."""

from tests.api.conftest import pg_cluster  # noqa: F401 (fixture)
