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
import re
import secrets
import time

from starlette.types import Scope

log = logging.getLogger("stockade.access")
_ACCEPTABLE_ID = re.compile(rb"^[A-Za-z0-9_-]{1,64}$")


def request_id_for(given: bytes) -> str:
    """The client's ``X-Request-ID`` when it is an acceptable token, else 16 random hex digits."""
    return given.decode() if _ACCEPTABLE_ID.match(given) else secrets.token_hex(8)


def log_request(scope: Scope, status: int, start: float) -> None:
    """The access-log line of a finished request (status 0: nothing was answered, logged as 500)."""
    route = getattr(scope.get("route"), "path", None)
    client = scope.get("client")
    level = logging.DEBUG if route is not None and route.endswith("/wait") else logging.INFO
    log.log(level, "%s %s %s", scope.get("method", ""), scope.get("path", ""), status or 500,
            extra={"method": scope.get("method", ""), "path": scope.get("path", ""),
                   "route": route or "unmatched", "status": status or 500,
                   "ms": round((time.perf_counter() - start) * 1000, 1),
                   "client": client[0] if client else None})
