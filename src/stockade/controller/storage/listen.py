"""PostgreSQL plumbing for several controller replicas: LISTEN/NOTIFY and advisory-lock leadership.

* :class:`ChangeListener` - a thread holding one connection with ``LISTEN stockade_changes``. It
  calls ``on_change`` when a notification arrives, after every (re)connection (notifications sent
  while it was away are lost, so it catches up from the stored change log) and every
  ``poll`` seconds besides, so a lost notification costs at most ``poll`` seconds.
* :class:`Leadership` - a session-level ``pg_try_advisory_lock`` on its own connection. The replica
  holding it runs the singleton jobs (liveness, retention); when its process or connection dies,
  PostgreSQL releases the lock and the next replica to ask takes over.

Connections are opened with libpq, so a multi-host URL with ``target_session_attrs=read-write``
follows a promoted standby like the engine does. Nothing here knows about policy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine

log = logging.getLogger("stockade.controller")

CHANNEL = "stockade_changes"
CHANGE_LOCK = 0x53_74_6B_01  # pg_advisory_xact_lock: compiled changes, one writer at a time
LEADER_LOCK = 0x53_74_6B_02  # pg_try_advisory_lock: the replica that runs the singleton jobs


def libpq_url(engine: Engine) -> str:
    """The engine's connection as a libpq conninfo string (what the engine's driver is given,
    so a multi-host URL with ``target_session_attrs`` keeps every host)."""
    _args, kwargs = engine.dialect.create_connect_args(engine.url)
    return make_conninfo("", **{k: v for k, v in kwargs.items() if isinstance(v, (str, int))})


class ChangeListener:
    """Calls ``on_change(newest)`` on notifications on :data:`CHANNEL` (``newest``: the highest
    change id announced), and ``on_change(None)`` on (re)connection and every ``poll`` seconds,
    from one daemon thread, until :meth:`stop`."""

    def __init__(self, url: str, on_change: Callable[[int | None], object], *, poll: float = 1.0,
                 retry: float = 0.5) -> None:
        self.url = url
        self.on_change = on_change
        self.poll = poll
        self.retry = retry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stockade-listen", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll + 2)

    def _call(self, newest: int | None = None) -> None:
        try:
            self.on_change(newest)
        except Exception:  # the database may be away; the next round tries again
            log.exception("following changes failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    self._call()
                    while not self._stop.is_set():
                        newest: int | None = None
                        for n in conn.notifies(timeout=self.poll, stop_after=1):
                            newest = max(newest or 0, int(n.payload) if n.payload.isdigit() else 0)
                        self._call(newest)
            except psycopg.Error as exc:
                self.connected.clear()
                log.warning("change listener lost the database (%s); reconnecting", exc)
                self._call()
                self._stop.wait(self.retry)


class Leadership:
    """Whether this replica holds :data:`LEADER_LOCK` (asks again when it does not)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()
        self._held = False

    def holds(self) -> bool:
        """True while this process holds the lock (a session lock lives as long as its connection:
        once held, a round trip proves it still is)."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._held = False
                    self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                    self._conn.execute("SET application_name = 'stockade-leader'")
                if self._held:
                    self._conn.execute("SELECT 1")
                    return True
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
                self._held = bool(row and row[0])
                return self._held
            except psycopg.Error as exc:
                log.warning("leadership check failed (%s)", exc)
                self._close()
                return False

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        self._held = False

    def close(self) -> None:
        with self._lock:
            self._close()
