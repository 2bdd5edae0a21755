"""Response headers every controller answer carries, and a complete ``Allow`` on every 405.

:class:`ResponseHeaders` is the outermost middleware, so it also covers answers made by other
middleware (413, 422 from :mod:`stockade.controller.limits`):

* on every response, unless the route set its own: ``Content-Security-Policy`` (the API's is
  ``default-src 'none'``: a JSON answer never runs or loads anything; the console sets a
  stricter-than-default one of its own in :mod:`stockade.controller.api.web_mount`),
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
  ``X-Frame-Options: DENY``, ``Cross-Origin-Resource-Policy: same-origin``;
* on API responses, ``Cache-Control: no-store`` (policy and credentials never sit in a cache);
* on responses sent over TLS, ``Strict-Transport-Security`` (two years): a browser that once
  reached the console over HTTPS never falls back to plain HTTP. Never over plain HTTP, where
  it would mean nothing (RFC 6797 section 7.2);
* on a 405, ``Allow`` lists every method the path answers. Starlette lists only the methods
  of the first route matching the path, and each method is its own route here.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
HSTS = b"max-age=63072000"
ALWAYS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", API_CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
API_PREFIXES = ("/api/", "/metrics")


def allowed_methods(app: Any, scope: Scope) -> list[str]:
    """Every method some route of ``app`` answers at ``scope``'s path (HEAD with GET)."""
    methods: set[str] = set()
    for route in getattr(getattr(app, "router", None), "routes", []):
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            match, _ = route.matches({**scope, "method": method})
            if match is Match.FULL:
                methods.add(method)
    return sorted(methods)


class ResponseHeaders:
    """ASGI middleware adding the headers above to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        extra = list(ALWAYS)
        if path.startswith(API_PREFIXES):
            extra.append((b"cache-control", b"no-store"))
        if scope.get("scheme") == "https":
            extra.append((b"strict-transport-security", HSTS))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in present]
                if message["status"] == 405:
                    methods = allowed_methods(scope.get("app"), scope)
                    if methods:
                        headers = [(k, v) for k, v in headers if k.lower() != b"allow"]
                        headers.append((b"allow", ", ".join(methods).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
