"""Login backoff and per-client rate limits kept in PostgreSQL, shared by every controller replica.

The in-memory :class:`~stockade.controller.services.auth.LoginThrottle` and
:class:`~stockade.controller.services.auth.RateLimiter` count per process: behind a load balancer
an attacker spreading guesses over three replicas would get three times the attempts, and a lock
hit on one replica would not hold on the next. These two classes have the same methods and the
same policy but count in tables (``login_failures``, ``rate_hits``, migration 0009) with wall-clock
seconds, so a limit hit on replica A holds on replica B. Used when the database is PostgreSQL;
SQLite (single process) keeps the in-memory ones.

Each update is one short transaction; concurrent attempts on one account or client are serialised
by the row lock of an upsert (login) or a transaction-scoped advisory lock on the key (rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import Table, case, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import sessionmaker

from stockade.controller.services.auth import LockoutPolicy, RateLimitedError
from stockade.controller.storage.db import LoginFailureRow, RateHitRow


class SharedLoginThrottle:
    """:class:`~stockade.controller.services.auth.LoginThrottle` with its counters in the database."""

    def __init__(self, sessions: sessionmaker[Any], policy: LockoutPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.policy = policy or LockoutPolicy()
        self.clock = clock

    def check(self, username: str) -> None:
        now = self.clock()
        with self.sessions() as db:
            until = db.scalar(select(LoginFailureRow.locked_until).where(LoginFailureRow.username == username))
        if until is not None and until > now:
            raise RateLimitedError(f"too many failed logins for this account; retry in {int(until - now) + 1} s")

    def failed(self, username: str) -> tuple[int, float]:
        now = self.clock()
        table = cast(Table, LoginFailureRow.__table__)
        with self.sessions.begin() as db:
            base = insert(table).values(username=username, failures=1, last_failure=now, locked_until=now)
            forgotten = func.greatest(table.c.last_failure + self.policy.forget_seconds, table.c.locked_until) < now
            stmt = base.on_conflict_do_update(
                index_elements=[table.c.username],
                set_={"failures": case((forgotten, 1), else_=table.c.failures + 1), "last_failure": now},
            ).returning(table.c.failures)
            failures = int(db.execute(stmt).scalar_one())
            lock = self.policy.lock_for(failures)
            db.execute(table.update().where(table.c.username == username).values(locked_until=now + lock))
        return failures, lock

    def succeeded(self, username: str) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(LoginFailureRow).where(LoginFailureRow.username == username))

    def prune(self) -> int:
        """Forget accounts past their forget time (the leader calls this now and then)."""
        now = self.clock()
        with self.sessions.begin() as db:
            res = db.execute(delete(LoginFailureRow).where(
                func.greatest(LoginFailureRow.last_failure + self.policy.forget_seconds,
                              LoginFailureRow.locked_until) < now))
            return int(getattr(res, "rowcount", 0) or 0)


class SharedRateLimiter:
    """:class:`~stockade.controller.services.auth.RateLimiter` (sliding window of ``limit`` calls per
    ``window`` seconds per key) counting in the database; ``scope`` names the limit (login, enrol)."""

    def __init__(self, sessions: sessionmaker[Any], scope: str, limit: int, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.scope = scope
        self.limit = limit
        self.window = window
        self.clock = clock

    def hit(self, key: str) -> None:
        now = self.clock()
        key = key[:128]
        with self.sessions.begin() as db:
            db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"rate:{self.scope}:{key}"})
            mine = (RateHitRow.scope == self.scope) & (RateHitRow.key == key)
            db.execute(delete(RateHitRow).where(mine, RateHitRow.at <= now - self.window))
            count, first = db.execute(select(func.count(), func.min(RateHitRow.at)).where(mine)).one()
            if count >= self.limit:
                raise RateLimitedError(f"too many attempts; retry in {int(first + self.window - now) + 1} s")
            db.add(RateHitRow(scope=self.scope, key=key, at=now))

    def prune(self) -> int:
        with self.sessions.begin() as db:
            res = db.execute(delete(RateHitRow).where(RateHitRow.scope == self.scope,
                                                      RateHitRow.at <= self.clock() - self.window))
            return int(getattr(res, "rowcount", 0) or 0)
