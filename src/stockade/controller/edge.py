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

The edge is the **outermost layer of every HTTP request** (:class:`stockade.controller.app.ControllerApp`
calls it first; issue 18: FastAPI's own outer layers cost a hot request more than the edge itself).
So it also does what the framework's outermost layer (Starlette's ``ServerErrorMiddleware``) did
around it: an exception nobody handled is answered by the app's 500 handler (when no answer has
started, sent as that layer sent it: around the edge, so without the edge's headers), then raised on
to the server, which logs it. The access line and the count (a 500) come first, as before.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockade.controller import access_log, headers, limits
from stockade.controller.csrf import SAFE_METHODS, OriginCheck
from stockade.controller.metrics import Metrics
from stockade.logs import request_id

# the hot routes' dispatch: True when it served the request (None: every request goes to the app)
FastDispatch = Callable[[Scope, bytes, Receive, Send], Awaitable[bool]]
# the app's answer to an exception nobody handled (its handler for ``Exception``: a 500)
ServerError = Callable[[Request, Exception], Any]  # (a Response, or an awaitable of one)


class _Answer:
    """The ``send`` the edge hands inward: completes the headers of the answer and notes its status.

    (An object, not a closure: a held long-poll keeps it for its whole hold, and a closure over five
    variables is six objects for the garbage collector to walk instead of one.)"""

    __slots__ = ("extra", "rid_header", "scope", "send", "status")

    def __init__(self, scope: Scope, send: Send, extra: headers.Headers, rid_header: tuple[bytes, bytes]) -> None:
        self.scope = scope
        self.send = send
        self.extra = extra
        self.rid_header = rid_header
        self.status = 0  # of the answer's start (0: nothing answered yet)

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            message = {**message, "headers": [*headers.complete(self.scope, message, self.extra), self.rid_header]}
        await self.send(message)


def _authorization(raw: list[tuple[bytes, bytes]]) -> bytes:
    """The first ``Authorization`` header's value, as Starlette's ``Headers.get`` finds it."""
    for name, value in raw:
        if name == b"authorization":
            return value
    return b""


class Edge:
    """ASGI middleware: request id + access log, headers, input limits, metrics, origin check."""

    def __init__(self, app: ASGIApp, metrics: Metrics, origins: OriginCheck,
                 fast: FastDispatch | None = None, server_error: ServerError | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.origins = origins
        self.fast = fast
        self.server_error = server_error  # None: an unhandled exception just propagates (a layer outside answers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        raw = scope.get("headers") or []
        given = dict(raw)  # (the access log's reading: the last X-Request-ID wins)
        rid = access_log.request_id_for(given.get(b"x-request-id", b""))
        token = request_id.set(rid)
        send_edge = _Answer(scope, send, headers.extra_headers(scope), (b"x-request-id", rid.encode()))
        counted = False
        try:
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
                if scope.get("method", "GET") not in SAFE_METHODS and not _authorization(raw):  # (the check's
                    reason = self.origins.refusal(HTTPConnection(scope))  # own first tests, without its objects)
                    if reason is not None:
                        await self.origins.refuse(send_edge, reason)
                        return
                if self.fast is None or not await self.fast(scope, body, receive, send_edge):
                    await self.app(scope, limits.replay(body, receive), send_edge)
            finally:
                if counted:
                    self.metrics.count_request(scope, send_edge.status or 500, time.perf_counter() - start)
                access_log.log_request(scope, send_edge.status, start)
                request_id.reset(token)
        except Exception as exc:
            if self.server_error is None:
                raise
            await self._answer_error(scope, receive, send, exc, started=send_edge.status != 0)
            raise

    async def _answer_error(self, scope: Scope, receive: Receive, send: Send, exc: Exception,
                            started: bool) -> None:
        """The app's 500 (Starlette's ``ServerErrorMiddleware``, which sat around the edge, did this)."""
        assert self.server_error is not None
        request = Request(scope)
        if inspect.iscoroutinefunction(self.server_error):
            answered = self.server_error(request, exc)
        else:
            answered = await run_in_threadpool(self.server_error, request, exc)
        response: Response = await answered if inspect.isawaitable(answered) else answered
        if not started:
            await response(scope, receive, send)
