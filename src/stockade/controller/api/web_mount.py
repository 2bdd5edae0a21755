"""Serves the web console (the static files of :mod:`stockade.web`) at ``/``.

The console is plain ES modules, HTML and CSS with no build step, so the controller serves it
as it is, offline. It is installed as the router's fallback rather than as a ``Mount`` at
``/``: a route added after this call (another router, a later ``include_router``) still wins,
and only paths that no route claims reach the static files. Unknown paths under ``/api/`` and
``/metrics`` keep the API's own 404, never the console's.

Every console response carries a strict Content-Security-Policy (scripts, styles and
connections to this origin only; no inline script), ``nosniff``, no referrer and no framing.
Files are revalidated on each load (``no-cache`` with the ETag ``StaticFiles`` sends), so an
upgraded controller never serves a stale console.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import stockade.web

WEB_DIR = Path(stockade.web.__file__).parent
API_PREFIXES = ("/api/", "/metrics")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),
)


class ConsoleFallback:
    """ASGI app: the static console for unclaimed paths, the previous fallback for API paths."""

    def __init__(self, static: ASGIApp, api_fallback: ASGIApp) -> None:
        self.static = static
        self.api_fallback = api_fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path.startswith(API_PREFIXES) or path == "/api":
            await self.api_fallback(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *SECURITY_HEADERS]}
            await send(message)

        await self.static(scope, receive, send_with_headers)


def mount_console(app: FastAPI, directory: Path = WEB_DIR) -> None:
    """Serve ``directory`` (``index.html`` at ``/``) for every path no route claims."""
    static = StaticFiles(directory=directory, html=True)
    app.router.default = ConsoleFallback(static, app.router.default)
