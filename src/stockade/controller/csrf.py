"""Cross-site request forgery defence: state-changing browser requests must come from our own origin.

A browser attaches the console's session cookie to every request to the controller's host, also
when a page from another origin sends it (``SameSite=Strict`` does not help against a page on
another *port* of the same host: same site, different origin). So every POST, PUT, PATCH and
DELETE that the session cookie would authenticate must say where it comes from, and that must
be the controller itself:

* the ``Origin`` header (or, only when it is absent, the origin part of ``Referer``) must equal
  the origin the client reached: scheme + host + port of this request (``X-Forwarded-Proto`` /
  ``X-Forwarded-Host`` count only from a trusted proxy, see :mod:`stockade.controller.forwarded`),
  or one of ``ControllerSettings.allowed_origins``;
* a cookie request without either header is refused too (every current browser sends ``Origin``
  on a non-GET ``fetch``, same-origin included, so the console needs no extra token);
* a request without the cookie that still names a foreign origin (a login form posted from
  another site: login CSRF) is refused as well;
* requests carrying an ``Authorization`` header (API keys, agent tokens) are not checked: a
  browser never adds that header on its own, so it cannot be forged cross-origin.

The refusal is a 403 with the usual error body, before routing, so nothing is parsed or changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import Send

from stockade.controller.forwarded import TrustedProxies
from stockade.controller.services.auth import SESSION_COOKIE
from stockade.errors import Issue, ValidationError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
Origin = tuple[str, str, int]  # scheme, lower-case host, port


def parse_origin(text: str) -> Origin | None:
    """``https://Console.example:443`` -> ("https", "console.example", 443); None when not an origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def parse_allowed_origins(entries: Iterable[str]) -> frozenset[Origin]:
    out: set[Origin] = set()
    issues: list[Issue] = []
    for i, text in enumerate(entries):
        origin = parse_origin(text)
        if origin is None or urlsplit(text.strip()).path not in ("", "/"):
            issues.append(Issue("settings", 0, f"allowed_origins[{i}]",
                                f"{text!r} is not an origin like https://console.example:8443"))
        else:
            out.add(origin)
    if issues:
        raise ValidationError(issues)
    return frozenset(out)


def show(origin: Origin) -> str:
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if DEFAULT_PORTS[scheme] == port else f"{scheme}://{shown}:{port}"


class OriginCheck:
    """Refuses state-changing cookie requests whose Origin/Referer is not the controller's own
    (run for every request by :class:`stockade.controller.edge.Edge`)."""

    def __init__(self, proxies: TrustedProxies, allowed_origins: frozenset[Origin]) -> None:
        self.proxies = proxies
        self.allowed = allowed_origins

    def own_origin(self, conn: HTTPConnection) -> Origin | None:
        peer = conn.client.host if conn.client else None
        scheme, host = self.proxies.scheme_and_host(peer, conn.url.scheme, conn.headers)
        return parse_origin(f"{scheme}://{host}") if host else None

    def refusal(self, conn: HTTPConnection) -> str | None:
        """Why this request is refused, or None when it may pass."""
        if conn.scope.get("method", "GET") in SAFE_METHODS or conn.headers.get("authorization"):
            return None  # (a non-empty Authorization header is what authenticates, never the cookie)
        has_cookie = SESSION_COOKIE in conn.cookies
        claimed = conn.headers.get("origin")
        source = "Origin"
        if claimed is None and conn.headers.get("referer"):
            claimed, source = conn.headers["referer"], "Referer"
        if claimed is None:
            if has_cookie:
                return ("a state-changing request authenticated by the session cookie must carry an Origin "
                        "or Referer header (API clients: use an API key in 'Authorization: Bearer')")
            return None
        origin = parse_origin(claimed)
        own = self.own_origin(conn)
        if origin is not None and (origin == own or origin in self.allowed):
            return None
        expected = show(own) if own is not None else "this controller's origin"
        return (f"cross-origin request refused: {source} {claimed[:200]!r} is not {expected} "
                f"(nor a configured allowed origin)")

    @staticmethod
    async def refuse(send: Send, reason: str) -> None:
        """The 403 answer (the usual error body) of a refused request."""
        body = json.dumps({"error": "CsrfError", "message": reason, "issues": []}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
