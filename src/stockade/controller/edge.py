"""The controller's HTTP edge: every guarantee the middlewares gave, in one ASGI layer and one pass.

Five plain ASGI middlewares used to wrap every request, each with its own ``send`` wrapper and
frame (profiling a replica serving 10,000 agents found the HTTP stack at 58 % of its samples).
:class:`Edge` does their work in the same order, with the same functions, once:

1. request id and access log (:mod:`stockade.controller.access_log`): outermost, every answer;
2. security headers and a complete ``Allow`` on a 405 (:mod:`stockade.controller.headers`),
   refusals below included;
3. input limits (:mod:`stockade.controller.limits`): NUL in the target, the body read with the
   route's cap, UTF-8 and NUL in a JSON body; its refusals are not counted in the metrics (as
   before: that layer sat outside the metrics one);
4. request metrics (:mod:`stockade.controller.metrics`), counted by route template and status;
5. the CSRF origin check (:mod:`stockade.controller.csrf`): its 403s are counted.

Then the request goes to the hot agent routes' fast dispatch (:mod:`stockade.controller.api.hot`,
which runs the same authentication, authorisation and handlers without the framework's routing
and dependency machinery, and hands anything it is not sure of to the framework), or to the app.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockade.controller import access_log, headers, limits
from stockade.controller.csrf import OriginCheck
from stockade.controller.metrics import Metrics
from stockade.logs import request_id

# the hot routes' dispatch: True when it served the request (None: every request goes to the app)
FastDispatch = Callable[[Scope, bytes, Receive, Send], Awaitable[bool]]


class Edge:
    """ASGI middleware: request id + access log, headers, input limits, metrics, origin check."""

    def __init__(self, app: ASGIApp, metrics: Metrics, origins: OriginCheck,
                 fast: FastDispatch | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.origins = origins
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        raw = scope.get("headers") or []
        given = dict(raw)  # (the access log's reading: the last X-Request-ID wins)
        rid = access_log.request_id_for(given.get(b"x-request-id", b""))
        token = request_id.set(rid)
        extra = headers.extra_headers(scope)
        status = 0
        counted = False

        async def send_edge(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*headers.complete(scope, message, extra),
                                                  (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            try:
                limits.check_target(scope)
                lowered = {k.lower(): v for k, v in raw}
                body = await limits.read_body(scope, lowered, receive)
                limits.check_json_body(body, lowered.get(b"content-type", b"").decode("latin-1"))
            except limits.Refused as refused:
                await limits.refuse(send_edge, refused)
                return
            counted = True
            reason = self.origins.refusal(HTTPConnection(scope))
            if reason is not None:
                await self.origins.refuse(send_edge, reason)
                return
            if self.fast is None or not await self.fast(scope, body, receive, send_edge):
                await self.app(scope, limits.replay(body, receive), send_edge)
        finally:
            if counted:
                self.metrics.count_request(scope, status or 500, time.perf_counter() - start)
            access_log.log_request(scope, status, start)
            request_id.reset(token)
