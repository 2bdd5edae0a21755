"""Audit events: recorded in the same transaction as the change, forwarded to syslog after commit.

Every API change and every agent state change calls :func:`record_event` (who, what, which
object, before/after). Rows become visible atomically with the change. When a
:class:`SyslogForwarder` is configured, events committed by a session are sent over UDP as
RFC 5424 lines whose message is either JSON or ArcSight CEF.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stockade import __version__
from stockade.controller.storage.db import EventRow, utcnow

PENDING = "stockade_pending_events"


def record_event(db: Session, actor: str, action: str, kind: str, name: str, before: Any, after: Any) -> None:
    row = EventRow(time=utcnow(), actor=actor, action=action, kind=kind, name=name, before=before, after=after)
    db.add(row)
    db.info.setdefault(PENDING, []).append(row)


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


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int
    fmt: SyslogFormat = SyslogFormat.JSON


class SyslogForwarder:
    """Sends committed events to a syslog receiver over UDP (RFC 5424, facility local0)."""

    def __init__(self, target: SyslogTarget) -> None:
        self.target = target
        self._sock = socket.socket(socket.AF_INET6 if ":" in target.host else socket.AF_INET, socket.SOCK_DGRAM)
        self._hostname = socket.gethostname()

    def send(self, row: EventRow) -> None:
        pri = 16 * 8 + 5  # local0.notice
        message = format_event(row, self.target.fmt)
        line = f"<{pri}>1 {row.time.isoformat()} {self._hostname} stockade - audit - {message}"
        with contextlib.suppress(OSError):  # best effort: the event is already stored
            self._sock.sendto(line.encode(), (self.target.host, self.target.port))

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
        self._sock.close()
