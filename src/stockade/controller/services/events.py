"""Audit events: recorded in the same transaction as the change, forwarded to syslog after commit.

Every API change and every agent state change calls :func:`record_event` (who, what, which
object, before/after). Rows become visible atomically with the change. When a
:class:`SyslogForwarder` is configured, events committed by a session are sent over UDP as
RFC 5424 lines whose message is either JSON or ArcSight CEF, over UDP, TCP or TLS.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from stockade import __version__
from stockade.controller.storage.db import EventRow, utcnow

PENDING = "stockade_pending_events"


def record_event(db: Session, actor: str, action: str, kind: str, name: str, before: Any, after: Any) -> None:
    row = EventRow(time=utcnow(), actor=actor, action=action, kind=kind, name=name, before=before, after=after)
    db.add(row)
    db.info.setdefault(PENDING, []).append(row)


def record_events(db: Session, actor: str, changes: list[tuple[str, str, str, Any, Any]]) -> None:
    """:func:`record_event` for many objects of one change (``(action, kind, name, before, after)``,
    each (kind, name) at most once): one batched ``INSERT ... RETURNING`` (the ORM inserts one row
    per statement on SQLite, which cannot return an executemany's ids in order; the ids are
    matched back by (kind, name) instead). The rows are forwarded after commit like single ones."""
    if len({(kind, name) for _a, kind, name, _b, _c in changes}) != len(changes):
        for action, kind, name, before, after in changes:
            record_event(db, actor, action, kind, name, before, after)
        return
    now = utcnow()
    rows = [EventRow(time=now, actor=actor, action=a, kind=k, name=n, before=b, after=c) for a, k, n, b, c in changes]
    if not rows:
        return
    table = cast(Table, EventRow.__table__)
    ids = {(str(k), str(n)): int(i) for i, k, n in db.execute(
        insert(table).returning(table.c.id, table.c.kind, table.c.name),
        [{"time": r.time, "actor": r.actor, "action": r.action, "kind": r.kind, "name": r.name, "before": r.before,
          "after": r.after} for r in rows])}
    for r in rows:
        r.id = ids[(r.kind, r.name)]  # transient rows: what the forwarder formats
    db.info.setdefault(PENDING, []).extend(rows)


def query_events(
    db: Session,
    *,
    kind: str | None = None,
    name: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> list[EventRow]:
    """Events newest first; ``after_id`` continues below that id (cursor)."""
    q = select(EventRow)
    if kind:
        q = q.where(EventRow.kind == kind)
    if name:
        q = q.where(EventRow.name == name)
    if action:
        q = q.where(EventRow.action == action)
    if actor:
        q = q.where(EventRow.actor == actor)
    if after_id is not None:
        q = q.where(EventRow.id < after_id)
    return list(db.scalars(q.order_by(EventRow.id.desc()).limit(limit)))


class SyslogFormat(Enum):
    JSON = "json"
    CEF = "cef"


def event_dict(row: EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "time": row.time.isoformat(),
        "actor": row.actor,
        "action": row.action,
        "kind": row.kind,
        "name": row.name,
        "before": row.before,
        "after": row.after,
    }


def _cef_escape(text: str, header: bool) -> str:
    text = text.replace("\\", "\\\\")
    if header:
        return text.replace("|", "\\|")
    return text.replace("=", "\\=").replace("\n", "\\n").replace("\r", "\\r")


def format_event(row: EventRow, fmt: SyslogFormat) -> str:
    """The message part of one syslog line."""
    if fmt is SyslogFormat.JSON:
        return json.dumps(event_dict(row), sort_keys=True, default=str)
    ext = {
        "rt": str(int(row.time.timestamp() * 1000)),
        "suser": row.actor,
        "act": row.action,
        "cs1Label": "kind",
        "cs1": row.kind,
        "cs2Label": "name",
        "cs2": row.name,
        "externalId": str(row.id),
    }
    extension = " ".join(f"{k}={_cef_escape(v, header=False)}" for k, v in ext.items())
    head = ["CEF:0", "Stockade", "Stockade", __version__, row.action, row.action, "3"]
    return "|".join(_cef_escape(h, header=True) if i else h for i, h in enumerate(head)) + "|" + extension


class SyslogTransport(Enum):
    UDP = "udp"
    TCP = "tcp"  # RFC 6587 octet counting
    TLS = "tls"  # RFC 5425


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int
    fmt: SyslogFormat = SyslogFormat.JSON
    transport: SyslogTransport = SyslogTransport.UDP
    ca_file: str | None = None  # TLS: the receiver's CA (default: the system's)


class SyslogForwarder:
    """Sends committed events to a syslog receiver (RFC 5424, facility local0) over UDP, TCP or TLS.

    UDP datagrams are sent inline (never blocks). TCP and TLS go through a bounded queue drained by
    one background thread that connects lazily and reconnects with backoff, so a slow or absent
    receiver never holds up a database commit; when the queue is full the oldest line is dropped
    and counted (``dropped``). Events are stored in the database before they are forwarded.
    """

    QUEUE = 10_000

    def __init__(self, target: SyslogTarget) -> None:
        self.target = target
        self._hostname = socket.gethostname()
        self.dropped = 0
        self.sent = 0
        self._sock: socket.socket | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE)
        self._thread: threading.Thread | None = None
        if target.transport is SyslogTransport.UDP:
            family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
        else:
            self._thread = threading.Thread(target=self._drain, name="syslog-forwarder", daemon=True)
            self._thread.start()

    def line(self, row: EventRow) -> bytes:
        pri = 16 * 8 + 5  # local0.notice
        message = format_event(row, self.target.fmt)
        return f"<{pri}>1 {row.time.isoformat()} {self._hostname} stockade - audit - {message}".encode()

    def send(self, row: EventRow) -> None:
        data = self.line(row)
        if self._sock is not None:
            with contextlib.suppress(OSError):  # best effort: the event is already stored
                self._sock.sendto(data, (self.target.host, self.target.port))
                self.sent += 1
            return
        framed = str(len(data)).encode() + b" " + data
        while True:
            try:
                self._queue.put_nowait(framed)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self.dropped += 1

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.target.host, self.target.port), timeout=10)
        if self.target.transport is SyslogTransport.TLS:
            ctx = ssl.create_default_context(cafile=self.target.ca_file)
            return ctx.wrap_socket(raw, server_hostname=self.target.host)
        return raw

    def _drain(self) -> None:
        conn: socket.socket | None = None
        delay = 0.5
        pending: bytes | None = None
        while True:
            if pending is None:
                pending = self._queue.get()
                if pending is None:
                    break
            try:
                if conn is None:
                    conn = self._connect()
                    delay = 0.5
                conn.sendall(pending)
                self.sent += 1
                pending = None
            except OSError:
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.close()
                conn = None
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line went out (tests, shutdown); True when the queue is empty."""
        deadline = time.monotonic() + timeout
        while self._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.qsize()

    def attach(self, factory: sessionmaker[Any]) -> None:
        """Forward every event committed through sessions of ``factory``."""

        def after_commit(db: Session) -> None:
            for row in db.info.pop(PENDING, []):
                self.send(row)

        def after_rollback(db: Session) -> None:
            db.info.pop(PENDING, None)

        sa_event.listen(factory, "after_commit", after_commit)
        sa_event.listen(factory, "after_soft_rollback", lambda db, _tx: after_rollback(db))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self.flush(2.0)
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(2.0)
