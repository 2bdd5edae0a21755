"""Response headers every controller answer carries, and a complete ``Allow`` on every 405.

:class:`stockade.controller.edge.Edge` adds them to every answer, its own refusals included
(413, 422 from :mod:`stockade.controller.limits`, 403 from :mod:`stockade.controller.csrf`):

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
from starlette.types import Message, Scope

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


Headers = tuple[tuple[bytes, bytes], ...]


def _extra(api: bool, tls: bool) -> Headers:
    return (*ALWAYS, *([(b"cache-control", b"no-store")] if api else []),
            *([(b"strict-transport-security", HSTS)] if tls else []))


_EXTRA = {(api, tls): _extra(api, tls) for api in (False, True) for tls in (False, True)}  # made once


def extra_headers(scope: Scope) -> Headers:
    """The headers every answer to ``scope`` carries unless the route set its own."""
    return _EXTRA[str(scope.get("path", "")).startswith(API_PREFIXES), scope.get("scheme") == "https"]


def complete(scope: Scope, start: Message, extra: Headers) -> list[tuple[bytes, bytes]]:
    """The headers of the ``http.response.start`` message ``start``, completed as above."""
    out = list(start.get("headers", []))
    present = {k.lower() for k, _ in out}
    out += [(k, v) for k, v in extra if k not in present]
    if start["status"] == 405:
        methods = allowed_methods(scope.get("app"), scope)
        if methods:
            out = [(k, v) for k, v in out if k.lower() != b"allow"]
            out.append((b"allow", ", ".join(methods).encode()))
    return out
