"""Request ids and the access log (done first and last by :class:`stockade.controller.edge.Edge`).

Each HTTP request gets an id: the client's ``X-Request-ID`` when it is a short token of letters,
digits, ``-`` and ``_`` (so a proxy's id carries through), otherwise 16 random hex digits. The id is
answered in ``X-Request-ID``, put in :data:`stockade.logs.request_id` for every log line written
while serving the request, and logged by ``stockade.access`` with method, route, path, status,
duration and client address once the response is complete. Agent long-polls (``.../wait``) log
at debug level: thousands of agents hold one open all the time.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.types import Scope

log = logging.getLogger("stockade.access")
_ACCEPTABLE_ID = re.compile(rb"^[A-Za-z0-9_-]{1,64}$")


class _FreshIds:
    """Random request ids (16 hex digits, 64 bits from ``os.urandom`` as ``secrets.token_hex(8)``),
    drawn :data:`POOL` at a time: one system call per request was ~5 % of a hot agent request.
    ``list.pop`` is atomic, so threads never share an id; a forked child starts a pool of its own."""

    POOL = 256

    def __init__(self) -> None:
        self.ids: list[str] = []
        os.register_at_fork(after_in_child=self.ids.clear)

    def __call__(self) -> str:
        try:
            return self.ids.pop()
        except IndexError:
            text = os.urandom(8 * self.POOL).hex()
            self.ids.extend(text[i:i + 16] for i in range(16, len(text), 16))
            return text[:16]


fresh_id = _FreshIds()


def request_id_for(given: bytes) -> str:
    """The client's ``X-Request-ID`` when it is an acceptable token, else 16 random hex digits."""
    return given.decode() if _ACCEPTABLE_ID.match(given) else fresh_id()


def log_request(scope: Scope, status: int, start: float) -> None:
    """The access-log line of a finished request (status 0: nothing was answered, logged as 500)."""
    route = getattr(scope.get("route"), "path", None)
    level = logging.DEBUG if route is not None and route.endswith("/wait") else logging.INFO
    if not log.isEnabledFor(level):  # (a held long-poll's line is at debug: most requests' line is dropped)
        return
    client = scope.get("client")
    log.log(level, "%s %s %s", scope.get("method", ""), scope.get("path", ""), status or 500,
            extra={"method": scope.get("method", ""), "path": scope.get("path", ""),
                   "route": route or "unmatched", "status": status or 500,
                   "ms": round((time.perf_counter() - start) * 1000, 1),
                   "client": client[0] if client else None})
