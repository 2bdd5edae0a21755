"""Request ids and the access log (a plain ASGI middleware, outermost).

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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockade.logs import request_id

log = logging.getLogger("stockade.access")
_ACCEPTABLE_ID = re.compile(rb"^[A-Za-z0-9_-]{1,64}$")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        rid = given.decode() if _ACCEPTABLE_ID.match(given) else secrets.token_hex(8)
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None)
            client = scope.get("client")
            level = logging.DEBUG if route is not None and route.endswith("/wait") else logging.INFO
            log.log(level, "%s %s %s", scope.get("method", ""), scope.get("path", ""), status or 500,
                    extra={"method": scope.get("method", ""), "path": scope.get("path", ""),
                           "route": route or "unmatched", "status": status or 500,
                           "ms": round((time.perf_counter() - start) * 1000, 1),
                           "client": client[0] if client else None})
            request_id.reset(token)
