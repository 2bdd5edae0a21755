"""Counting the SQL a piece of controller code sends (the cost tests: batch writes, fan-out, enrolment)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from tests.api.conftest import Api

LISTENER = "SELECT change_log.id, change_log.body"  # PostgreSQL's listener thread, not the code measured


class Statements:
    """The statements the engine sends while open, but the listener's and any containing one of ``ignore``:
    ``seen`` their normalised text, ``calls`` (text, executemany, parameter sets) each."""

    def __init__(self, api: Api, ignore: tuple[str, ...] = ()) -> None:
        self.engine = api.ctl.sessions.kw["bind"]
        self.ignore = ignore
        self.calls: list[tuple[str, bool, int]] = []

    @property
    def seen(self) -> list[str]:
        return [text for text, _many, _n in self.calls]

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        text = " ".join(sql.split())
        if text.startswith(LISTENER) or any(m in text for m in self.ignore):
            return
        self.calls.append((text, many, len(params) if many else 1))

    def updates(self, table: str) -> list[tuple[str, bool, int]]:
        return [c for c in self.calls if c[0].upper().startswith(f"UPDATE {table.upper()} ")]
