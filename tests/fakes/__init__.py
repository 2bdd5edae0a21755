"""Fakes of external services, for tests only (each module says what it fakes)."""
