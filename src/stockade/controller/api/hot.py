"""A fast dispatch for the agent protocol's hot routes, in front of the framework (issue 18).

Every agent's long-poll answer, ack and heartbeat, and every node's pod long-poll and acks, used
to cross FastAPI's route matching (its included routers tried one by one), its dependency solver
and its parameter validation before the handler ran: together with the middlewares, more than
half of a replica's CPU while 10,000 agents followed a global change. :class:`HotRoutes` serves
these few routes itself, after :class:`stockade.controller.edge.Edge` has done every check the
middlewares did (limits, origin, request id, headers, metrics, access log), and runs:

* the **same authentication and authorisation**: the route's own ``require(Permission.AGENT)``
  dependency (agent token, request signature, freshness, replay, role), then the route's
  handler itself (the agent-acts-for-itself check, the work, the answer);
* the **same answers to errors**: an exception goes to the app's own exception handler for its
  class (so a 401/403/404/409/422 says what it said); one with no handler propagates to the
  framework's 500 handler, as before;
* the **same parameters**, or none at all: a query or body is served here only when it is
  certainly what the framework would accept, with the same value (plain decimal revisions in
  range, ``true``/``false``, a JSON body validated by the route's own Pydantic model from
  ``json.loads`` as FastAPI does). Anything else - a duplicate or malformed parameter, another
  content type, an empty or invalid body, a root path - is handed to the framework untouched,
  before authentication, so its error (422 with the field, or the 401 it checks first) is the
  framework's own.

``scope["route"]`` is set to the framework's route object, so logs, metrics and the scope check
name the same template. The table is checked against the framework's router by
``tests/security/test_hot_routes.py`` (same route for the same request, same answers).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel
from pydantic import ValidationError as PydanticError
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from stockade.controller.api import agents, k8s_nodes
from stockade.controller.api.dto.agents import AckIn, HeartbeatIn
from stockade.controller.api.dto.k8s_nodes import PodAcksIn, PodUpdatesIn
from stockade.controller.context import API, require
from stockade.controller.limits import replay
from stockade.controller.services.auth import Permission

REVISION_MAX = 2**31 - 1
_DECIMAL = re.compile(r"[0-9]{1,10}")
_SECONDS = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?")
_BOOLS = {"true": True, "false": False}
Params = dict[str, Any]
Parser = Callable[[bytes, bytes, bytes], Params | None]  # (query string, body, content type) -> kwargs | None
Handler = Callable[[Request, Any], Response | Awaitable[Response]]


def _revision(text: str) -> int | None:
    if not (text.isascii() and text.isdigit() and len(text) <= 10):  # (_DECIMAL, without the regex)
        return None
    value = int(text)
    return value if value <= REVISION_MAX else None


def query_pairs(text: str) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True)`` (how Starlette reads a query), without its
    unquoting when there is nothing to unquote: no ``%`` and no ``+``, the agents' plain
    ``after=12&applied=12&timeout=30&include_policy=true`` (its unquoting was ~5 % of a replica's
    CPU under 25,000 agents). Anything else goes to ``parse_qsl`` itself; a property test checks
    that both agree on every text."""
    if "%" in text or "+" in text:
        return parse_qsl(text, keep_blank_values=True)
    out = []
    for part in text.split("&"):
        if part:  # (an empty field is skipped, as parse_qsl skips it)
            name, _, value = part.partition("=")
            out.append((name, value))
    return out


def _query(query: bytes) -> dict[str, str] | None:
    """The query's parameters as Starlette reads them; None when a name repeats (doubt)."""
    out: dict[str, str] = {}
    for name, value in query_pairs(query.decode("latin-1")):
        if name in out:
            return None
        out[name] = value
    return out


def wait_params(query: bytes, _body: bytes, _content_type: bytes) -> Params | None:
    """``after``, ``timeout``, ``include_policy``, ``applied`` of ``GET .../policy/wait``."""
    q = _query(query)
    if q is None:
        return None
    out: Params = {"after": 0, "timeout": 30.0, "include_policy": False, "applied": None}
    if "after" in q:
        out["after"] = _revision(q["after"])
    if "applied" in q:
        out["applied"] = _revision(q["applied"])
        if out["applied"] is None:
            return None
    if "timeout" in q:
        if not _SECONDS.fullmatch(q["timeout"]) or float(q["timeout"]) > 300:
            return None
        out["timeout"] = float(q["timeout"])
    if "include_policy" in q:
        out["include_policy"] = _BOOLS.get(q["include_policy"])
    return None if out["after"] is None or out["include_policy"] is None else out


def _json_media(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def body_params(model: type[BaseModel]) -> Parser:
    """``body``: a non-empty JSON body the route's model accepts (validated as FastAPI does)."""

    def parse(_query: bytes, body: bytes, content_type: bytes) -> Params | None:
        if not body or not _json_media(content_type):
            return None
        try:
            return {"body": model.model_validate(json.loads(body))}
        except (ValueError, PydanticError):  # (json's errors are ValueErrors)
            return None

    return parse


@dataclass(frozen=True)
class HotRoute:
    """One route served here: the framework's route object, its method and full path pattern."""

    route: APIRoute
    method: str
    pattern: re.Pattern[str]
    parse: Parser


def _route(router: APIRouter, endpoint: Callable[..., Any]) -> APIRoute:
    found = [r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint]
    if len(found) != 1:
        raise LookupError(f"{endpoint.__name__}: {len(found)} routes")  # a renamed route: fail at start-up
    return found[0]


def _hot(router: APIRouter, endpoint: Callable[..., Any], parse: Parser) -> HotRoute:
    route = _route(router, endpoint)
    (method,) = route.methods or {""}
    pattern = re.compile("^" + re.escape(API) + route.path.replace("{agent_id}", "(?P<agent_id>[^/]+)") + "$")
    return HotRoute(route, method, pattern, parse)


def hot_routes() -> tuple[HotRoute, ...]:
    """The routes served here (every other one, and every doubt, goes to the framework)."""
    return (
        _hot(agents.router, agents.wait_for_policy, wait_params),
        _hot(agents.router, agents.ack_policy, body_params(AckIn)),
        _hot(agents.router, agents.heartbeat, body_params(HeartbeatIn)),
        _hot(k8s_nodes.router, k8s_nodes.wait_for_pod_updates, body_params(PodUpdatesIn)),
        _hot(k8s_nodes.router, k8s_nodes.ack_pod_policies, body_params(PodAcksIn)),
    )


class HotRoutes:
    """The fast dispatch :class:`stockade.controller.edge.Edge` asks first."""

    def __init__(self, handlers: Mapping[Any, Handler]) -> None:
        self.routes = hot_routes()
        self.by_method: dict[str, tuple[HotRoute, ...]] = {}
        for hot in self.routes:
            self.by_method[hot.method] = (*self.by_method.get(hot.method, ()), hot)
        self.handlers = handlers  # the app's exception handlers, by class
        self.authenticate = require(Permission.AGENT)
        self.served = 0  # requests served here (tests and benchmarks read it)

    def match(self, scope: Scope) -> tuple[HotRoute, str] | None:
        """The hot route of this request and its agent id, or None (the framework routes it)."""
        if scope.get("root_path"):
            return None
        path = scope.get("path", "")
        for hot in self.by_method.get(scope.get("method", ""), ()):
            m = hot.pattern.match(path)
            if m is not None:
                return hot, m["agent_id"]
        return None

    async def __call__(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Serve the request when it is a hot one (True); ``body``: the whole body, already read."""
        found = self.match(scope)
        if found is None:
            return False
        hot, agent_id = found
        content_type = b""
        for k, v in scope.get("headers") or ():
            if k.lower() == b"content-type":
                content_type = v
                break
        params = hot.parse(scope.get("query_string", b""), body, content_type)
        if params is None:
            return False  # doubt: the framework parses it (and answers its own errors)
        self.served += 1
        request = Request(scope, replay(body, receive))  # the signature check reads the body from it
        scope["route"], scope["endpoint"], scope["path_params"] = hot.route, hot.route.endpoint, {"agent_id": agent_id}
        try:
            principal = await self.authenticate(request)
            result = await hot.route.endpoint(request, agent_id=agent_id, principal=principal, **params)
            response = result if isinstance(result, Response) else JSONResponse(result.model_dump(mode="json"))
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # the framework's 500 handler, as before
            answered = handler(request, exc)
            response = await answered if inspect.isawaitable(answered) else answered
        await response(scope, receive, send)
        return True

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in self.handlers:
                return self.handlers[cls]
        return None
