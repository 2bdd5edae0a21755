"""The hot agent routes' fast dispatch keeps every guarantee of the framework path (issue 18).

:mod:`stockade.controller.api.hot` serves the agent protocol's hot routes without FastAPI's routing
and dependency machinery. For the class of them (every route in its table, checked complete):

* it really serves them (else this file would test the framework twice);
* each answer carries the security headers and the request id, is counted in the metrics under the
  route's template and logged by ``stockade.access`` with the route and the request id;
* body limits and NUL checks still come first (413, 422 with the field);
* authentication and authorisation still refuse: no credential (401), a copied token without the
  signature (401), an operator's key however mighty (403), another agent acting for this one (403);
* every answer - accepted, refused, or a parameter or body the framework would refuse - is the
  framework's own answer (status and body compared with the fast dispatch switched off), and a
  doubtful request is left to the framework before anything is checked;
* the table names the route the framework's router picks for the same request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from stockade.agent.signing import AgentAuth
from stockade.agent.state import Credential
from stockade.controller.api.hot import HotRoutes
from stockade.logs import request_id
from tests.api.conftest import Api
from tests.security.test_node_poll import _batch, _estate
from tests.security.test_pod_enrolment import _agent

# (method, path after /agents/{id}/, a body; "{pod}": the node's pod) for every route of the fast table
CASES: dict[str, tuple[str, str, Any]] = {
    "wait": ("GET", "policy/wait?after=0&timeout=0&include_policy=true&applied=0", None),
    "ack": ("POST", "ack", {"revision": 0}),
    "heartbeat": ("POST", "heartbeat", {"backend": "nftables"}),
    "pods/updates": ("POST", "pods/updates", {"pods": [{"agent_id": "{pod}", "revision": 0}], "timeout": 0}),
    "pods/acks": ("POST", "pods/acks", {"acks": [{"agent_id": "{pod}", "revision": 0}]}),
}
# inputs the framework refuses or that the fast dispatch is not sure of, per route: each must get the
# framework's own answer, and must not be served by the fast dispatch
DOUBTFUL: dict[str, list[tuple[str, Any]]] = {
    "wait": [("policy/wait?after=-1", None), ("policy/wait?after=x", None), ("policy/wait?after=2147483648", None),
             ("policy/wait?timeout=301", None), ("policy/wait?timeout=1e1", None),
             ("policy/wait?include_policy=maybe", None), ("policy/wait?include_policy=yes&timeout=0", None),
             ("policy/wait?after=1&after=2&timeout=0", None), ("policy/wait?applied=-3", None)],
    "ack": [("ack", {"revision": "1"}), ("ack", {"revision": True}), ("ack", {"revision": -1}),
            ("ack", {"revision": 1, "extra": 1}), ("ack", {}), ("ack", b"{not json"), ("ack", b""),
            ("ack", b'{"revision": 1.0}')],
    "heartbeat": [("heartbeat", {"backend": "Bad Name"}), ("heartbeat", b""), ("heartbeat", [1])],
    "pods/updates": [("pods/updates", {"pods": [{"agent_id": "x", "revision": 0}]}),
                     ("pods/updates", {"pods": [], "timeout": 301}), ("pods/updates", {"pods": "all"})],
    "pods/acks": [("pods/acks", {"acks": [{"agent_id": "{pod}", "revision": -1}]}), ("pods/acks", {})],
}


@pytest.fixture
def node(sqlite_api: Api, tmp_path: Path) -> Iterator[tuple[Api, Credential, str]]:
    _estate(sqlite_api)
    cred = _agent(sqlite_api, tmp_path, "node-a")
    pod = _batch(sqlite_api, cred, ["k8s.shop.db-1"], tmp_path)["enrolled"][0]["agent_id"]
    yield sqlite_api, cred, pod


def _hot(api: Api) -> HotRoutes:
    hot = api.client.app.state.hot_routes  # type: ignore[attr-defined]
    assert isinstance(hot, HotRoutes)
    return hot


def _send(api: Api, cred: Credential, pod: str, method: str, suffix: str, body: Any,
          auth: httpx.Auth | None = None, **kw: Any) -> httpx.Response:
    if isinstance(body, bytes):
        kw["content"] = body
        kw.setdefault("headers", {})["content-type"] = "application/json"
    elif body is not None:
        kw["json"] = _fill(body, pod)
    return api.client.request(method, f"/api/v1/agents/{cred.agent_id}/{suffix}",
                              auth=auth if auth is not None else AgentAuth(cred), **kw)


def _fill(value: Any, pod: str) -> Any:
    if value == "{pod}":
        return pod
    if isinstance(value, dict):
        return {k: _fill(v, pod) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, pod) for v in value]
    return value


def _template(suffix: str) -> str:
    return "/agents/{agent_id}/" + suffix.split("?")[0]


def _framework_only(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_hot(api), "match", lambda scope: None)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, int, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((getattr(record, "route", ""), getattr(record, "status", 0), request_id.get()))


def test_the_cases_cover_the_whole_fast_table(node: tuple[Api, Credential, str]) -> None:
    api, _cred, _pod = node
    table = {(h.method, h.route.path) for h in _hot(api).routes}
    assert table == {(m, _template(s)) for m, s, _ in CASES.values()}
    assert set(DOUBTFUL) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hot_route_is_served_fast_with_headers_request_id_metrics_and_log(
        name: str, node: tuple[Api, Credential, str]) -> None:
    api, cred, pod = node
    method, suffix, body = CASES[name]
    template = _template(suffix)
    metrics = api.ctl.metrics.registry
    labels = {"method": method, "route": template}
    lines = _Lines()
    access = logging.getLogger("stockade.access")
    access.addHandler(lines)
    level = access.level
    access.setLevel(logging.DEBUG)
    served = _hot(api).served
    try:
        r = _send(api, cred, pod, method, suffix, body, headers={"X-Request-ID": f"hot-{name.replace('/', '-')}"})
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    assert r.status_code in (200, 204), r.text
    assert _hot(api).served == served + 1, "served by the fast dispatch"
    assert r.headers["x-request-id"] == f"hot-{name.replace('/', '-')}"
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    for header, value in (("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"),
                          ("referrer-policy", "no-referrer"), ("cache-control", "no-store"),
                          ("cross-origin-resource-policy", "same-origin")):
        assert r.headers[header] == value, header
    count = metrics.get_sample_value("stockade_http_requests_total", {**labels, "status": str(r.status_code)})
    assert count == 1.0
    if not template.endswith("/wait"):  # long-polls are counted, not timed
        assert metrics.get_sample_value("stockade_http_request_seconds_count", labels) == 1.0
    assert (template, r.status_code, f"hot-{name.replace('/', '-')}") in lines.seen


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hot_route_still_refuses_who_may_not_call_it(
        name: str, node: tuple[Api, Credential, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api, cred, pod = node
    method, suffix, body = CASES[name]
    other = _agent(api, tmp_path, "node-b")

    class Token(httpx.Auth):  # the token alone: a copy without the host's key
        def __init__(self, token: str) -> None:
            self.token = token

        def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
            request.headers["Authorization"] = f"Bearer {self.token}"
            yield request

    def refusals() -> list[tuple[int, Any, str | None]]:
        got = [
            _send(api, cred, pod, method, suffix, body, auth=Token("")),  # no credential at all
            _send(api, cred, pod, method, suffix, body, auth=Token(cred.token)),  # copied token, no signature
            _send(api, cred, pod, method, suffix, body, auth=Token(api.owner["Authorization"][7:])),  # operator
            _send(api, cred, pod, method, suffix, body, auth=AgentAuth(other)),  # another agent for this one
        ]
        for r in got:
            assert r.headers["content-security-policy"] and r.headers["x-request-id"]
        return [(r.status_code, r.json(), r.headers.get("www-authenticate")) for r in got]

    fast = refusals()
    assert [s for s, _b, _w in fast] == [401, 401, 403, 403], fast
    assert "only agents" in fast[2][1]["message"] and "only act for itself" in fast[3][1]["message"]
    assert fast[0][2] == fast[1][2] == "Bearer"
    _framework_only(api, monkeypatch)
    assert refusals() == fast  # word for word the framework's refusals


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hot_route_keeps_the_input_limits(name: str, node: tuple[Api, Credential, str]) -> None:
    api, cred, pod = node
    method, suffix, _body = CASES[name]
    path = f"/api/v1/agents/{cred.agent_id}/{suffix}"
    served = _hot(api).served
    big = api.client.request(method, path, content=b'{"x": "' + b"a" * (9 * 1024 * 1024) + b'"}',
                             headers={"content-type": "application/json"}, auth=AgentAuth(cred))
    assert big.status_code == 413 and big.headers["x-request-id"] and big.headers["content-security-policy"]
    sep = "&" if "?" in suffix else "?"
    nul = api.client.request(method, path + sep + "after=%00", auth=AgentAuth(cred),
                             json=_fill(_body, pod) if _body is not None else None)
    assert nul.status_code == 422 and nul.json()["issues"][0]["field"] == "query.after"
    if method == "POST":
        bad = api.client.request(method, path, content=b'{"a": "\\u0000"}', auth=AgentAuth(cred),
                                 headers={"content-type": "application/json"})
        assert bad.status_code == 422 and bad.json()["issues"][0]["field"] == "a"
    assert _hot(api).served == served, "refused before any route"


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hot_route_answers_what_the_framework_answers(
        name: str, node: tuple[Api, Credential, str], monkeypatch: pytest.MonkeyPatch) -> None:
    api, cred, pod = node
    method, suffix, body = CASES[name]

    def answers() -> list[tuple[int, Any]]:
        out = []
        for s, b in [(suffix, body), *DOUBTFUL[name]]:
            r = _send(api, cred, pod, method, s, b)
            out.append((r.status_code, r.json() if r.content else None))
        return out

    served = _hot(api).served
    fast = answers()
    assert _hot(api).served == served + 1, "only the first (valid) request is served fast"
    assert fast[0][0] in (200, 204) and all(status < 500 for status, _ in fast), fast
    assert any(status == 422 for status, _ in fast), fast  # (some doubts are fine: the framework says so)
    _framework_only(api, monkeypatch)
    slow = answers()
    assert _hot(api).served == served + 1
    assert fast == slow


def test_the_table_names_the_route_the_router_picks(node: tuple[Api, Credential, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    api, cred, pod = node
    hot = _hot(api)
    _framework_only(api, monkeypatch)
    picked: dict[str, Any] = {}
    lines = _Lines()
    access = logging.getLogger("stockade.access")
    access.addHandler(lines)
    level = access.level
    access.setLevel(logging.DEBUG)
    try:
        for name, (method, suffix, body) in CASES.items():
            _send(api, cred, pod, method, suffix, body)
            picked[name] = lines.seen[-1][0]
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    for name, (method, suffix, _body) in CASES.items():
        scope = {"type": "http", "method": method, "path": f"/api/v1/agents/{cred.agent_id}/{suffix.split('?')[0]}"}
        found = HotRoutes.match(hot, scope)
        assert found is not None and found[1] == cred.agent_id
        assert found[0].route.path == picked[name], name
    assert HotRoutes.match(hot, {"type": "http", "method": "GET", "path": "/api/v1/agents/x/policy"}) is None
    assert HotRoutes.match(hot, {"type": "http", "method": "GET", "path": "/api/v1/agents/x/policy/wait",
                                 "root_path": "/proxy"}) is None


def test_an_unexpected_error_on_a_hot_route_is_the_frameworks_500(
        node: tuple[Api, Credential, str], monkeypatch: pytest.MonkeyPatch) -> None:
    api, cred, _pod = node

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(api.ctl.dist, "agent_ack", broken)
    client = TestClient(api.client.app, raise_server_exceptions=False)
    served = _hot(api).served

    def ack() -> tuple[int, Any]:
        r = client.post(f"/api/v1/agents/{cred.agent_id}/ack", json={"revision": 0}, auth=AgentAuth(cred))
        return r.status_code, r.json()

    fast = ack()
    assert _hot(api).served == served + 1
    assert fast == (500, {"error": "InternalError", "message": "internal error", "issues": []})
    _framework_only(api, monkeypatch)
    assert ack() == fast
