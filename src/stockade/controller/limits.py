"""Input limits every request meets before a route parses anything: body size, NUL bytes, UTF-8.

Why in front of the routes: a route (or FastAPI's body parsing) reads and decodes the
whole body before the auth dependency runs, so one unauthenticated 60 MB JSON document used to
cost the controller half a gigabyte. :class:`stockade.controller.edge.Edge` runs these checks in
front of every route and:

1. **limits the body per route** (:data:`BODY_LIMITS`, one table; everything else gets
   :data:`DEFAULT_LIMIT`, 64 KiB). ``Content-Length`` is checked first (413 before a byte is
   read); a chunked body is read with the cap and refused (413) as soon as it passes it, so
   the process never holds more than the route's limit. The two unauthenticated routes
   (login, enrolment) get a few KiB;
2. **asks for a credential before a large body**: a body above :data:`DEFAULT_LIMIT` is read
   only when the request carries an ``Authorization`` header or the console session cookie
   (otherwise 401). Checking that credential stays with the route's auth dependency;
3. **refuses NUL** (``\\x00``) in the path, in any query parameter name or value, and in any
   string (or object key) of a JSON body, with a 422 naming the field: PostgreSQL cannot
   store NUL in text, and SQLite silently truncated filters at it;
4. **refuses a JSON body that is not UTF-8** (RFC 8259) with a 422 instead of guessing UTF-16.

The accepted body is handed to the route as one message, so a route reads it at once; later
``receive`` calls (a long-poll waiting for ``http.disconnect``) go to the server as before.
Errors have the API's usual shape ``{"error", "message", "issues": [{"field", "message"}]}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Message, Receive, Scope, Send

API = "/api/v1"
KiB = 1024
MiB = 1024 * KiB

DEFAULT_LIMIT = 64 * KiB  # every route not in the table
PUBLIC_LIMIT = 4 * KiB  # unauthenticated login
SESSION_COOKIE = b"stockade_session"  # stockade.controller.services.auth.SESSION_COOKIE


@dataclass(frozen=True)
class BodyLimit:
    """The largest body ``method`` on the route ``template`` (with ``{param}`` parts) accepts."""

    method: str
    template: str
    limit: int
    why: str


BODY_LIMITS: tuple[BodyLimit, ...] = (
    BodyLimit("POST", "/auth/login", PUBLIC_LIMIT, "unauthenticated: a username and a password"),
    BodyLimit("POST", "/agents/enroll", 32 * KiB, "unauthenticated: a code, a hostname and its interfaces"),
    BodyLimit("PUT", "/policy/draft", 8 * MiB, "the whole policy and inventory as YAML"),
    BodyLimit("POST", "/workload-batches", 2 * MiB, "up to 1,000 workloads (the cluster sync's pod churn)"),
    BodyLimit("POST", "/agents/{agent_id}/flows", 4 * MiB, "10,000 flow records per upload"),
    BodyLimit("PUT", "/agents/{agent_id}/interfaces", 1 * MiB, "up to 64 interfaces of up to 256 addresses"),
    BodyLimit("POST", "/agents/{agent_id}/events", 2 * MiB, "up to 500 events of up to 2 KiB each"),
    BodyLimit("POST", "/ip-lists", 1 * MiB, "up to 10,000 CIDRs"),
    BodyLimit("PUT", "/ip-lists/{name}", 1 * MiB, "up to 10,000 CIDRs"),
    BodyLimit("POST", "/rulesets", 1 * MiB, "up to 1,000 rules"),
    BodyLimit("PUT", "/rulesets/{name}", 1 * MiB, "up to 1,000 rules"),
    BodyLimit("POST", "/workloads", 1 * MiB, "up to 64 interfaces of up to 256 addresses"),
    BodyLimit("PUT", "/workloads/{name}", 1 * MiB, "up to 64 interfaces of up to 256 addresses"),
    BodyLimit("POST", "/label-keys", 256 * KiB, "up to 1,024 allowed values"),
    BodyLimit("PUT", "/label-keys/{name}", 256 * KiB, "up to 1,024 allowed values"),
    BodyLimit("POST", "/network-policies", 8 * MiB, "a NetworkPolicy: up to 100,000 pods and peers"),
    BodyLimit("PUT", "/network-policies/{name}", 8 * MiB, "a NetworkPolicy: up to 100,000 pods and peers"),
)


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z_]+\})", API + template)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


_COMPILED: dict[str, tuple[tuple[re.Pattern[str], int], ...]] = {
    method: tuple((_compile(b.template), b.limit) for b in BODY_LIMITS if b.method == method)
    for method in {b.method for b in BODY_LIMITS}
}  # by method, in the table's order (the first match wins)


def body_limit(method: str, path: str) -> int:
    """The body limit of the route ``method path`` (the default for any route not in the table)."""
    for pattern, limit in _COMPILED.get(method, ()):
        if pattern.match(path):
            return limit
    return DEFAULT_LIMIT


# ---- checks ----------------------------------------------------------------------------------


class Refused(Exception):
    """A request refused before routing: the status, the message and the offending field."""

    def __init__(self, status: int, message: str, field: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


def nul_fields(value: Any, where: str) -> Iterator[str]:
    """The fields (dotted paths) of a decoded JSON document holding a NUL character."""
    if isinstance(value, str):
        if "\x00" in value:
            yield where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from nul_fields(item, f"{where}.{i}" if where else str(i))
    elif isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if "\x00" in key:
                yield name.replace("\x00", "\\u0000")
            else:
                yield from nul_fields(item, name)


def check_target(scope: Scope) -> None:
    """Refuse NUL in the path or in a query parameter (name or value)."""
    if "\x00" in scope.get("path", ""):
        raise Refused(422, "the path contains a NUL character", "path")
    query = scope.get("query_string", b"")
    if query and (b"%00" in query or b"\x00" in query):
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                raise Refused(422, "a query parameter contains a NUL character",
                              "query." + name.replace("\x00", "\\u0000"))
        raise Refused(422, "the query string contains a NUL character", "query")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "" or media == "application/json" or media.endswith("+json")


def check_json_body(body: bytes, content_type: str) -> None:
    """Refuse a JSON body that is not UTF-8 or that holds NUL in a string or a key."""
    if not body or not _is_json(content_type):
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(422, "the request body must be JSON encoded as UTF-8", "body") from None
    if "\\u0000" not in text:  # JSON forbids a raw NUL; only the escape can make one
        return
    try:
        doc = json.loads(text)
    except ValueError:
        return  # not JSON: the route's own parsing reports it
    for field in nul_fields(doc, ""):
        raise Refused(422, "a string contains a NUL character", field)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


def has_credential(headers: dict[bytes, bytes]) -> bool:
    """Whether the request carries something that may authenticate it (not whether it does)."""
    if headers.get(b"authorization", b"").strip():
        return True
    return any(part.strip().startswith(SESSION_COOKIE + b"=") for part in headers.get(b"cookie", b"").split(b";"))


# ---- the edge's steps (stockade.controller.edge.Edge) ----------------------------------------


async def refuse(send: Send, refused: Refused) -> None:
    """Answer a refused request (the API's error shape; 401 and 413 close the connection)."""
    body = json.dumps({
        "error": "PayloadTooLarge" if refused.status == 413 else
                 "NotAuthenticatedError" if refused.status == 401 else "ValidationError",
        "message": refused.message,
        "issues": [{"field": refused.field, "message": refused.message}] if refused.field else [],
    }).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refused.headers.items()]
    if refused.status in (401, 413):
        headers.append((b"connection", b"close"))  # never read the rest of a refused body
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(scope: Scope, headers: dict[bytes, bytes], receive: Receive) -> bytes:
    """The whole body, read within the route's limit (``headers``: names in lower case)."""
    limit = body_limit(scope.get("method", ""), scope.get("path", ""))
    allowed = limit if limit <= DEFAULT_LIMIT or has_credential(headers) else DEFAULT_LIMIT
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Refused(400, "invalid Content-Length", "Content-Length") from None
        if size > allowed:
            raise _too_large(limit, allowed)
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away", "")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > allowed:
            raise _too_large(limit, allowed)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Replay:
    """A ``receive`` that hands the accepted body over as one message, then asks the server.

    (An object, not a closure: a held long-poll keeps it for its whole hold, one object where the
    closure and its cells were four.)"""

    __slots__ = ("body", "delivered", "receive")

    def __init__(self, body: bytes, receive: Receive) -> None:
        self.body = body
        self.receive = receive
        self.delivered = False

    async def __call__(self) -> Message:
        if not self.delivered:
            self.delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the accepted body over as one message, then asks the server."""
    return _Replay(body, receive)


def _too_large(limit: int, allowed: int) -> Refused:
    if allowed < limit:
        return Refused(401, f"a body above {allowed} bytes needs credentials", "body",
                       {"WWW-Authenticate": "Bearer"})
    return Refused(413, f"the request body exceeds this route's limit of {limit} bytes", "body")
