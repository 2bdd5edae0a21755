"""The edge is the outermost layer of every HTTP request, and nothing it answers changed (issue 18).

:class:`stockade.controller.app.ControllerApp` hands an HTTP request to
:class:`stockade.controller.edge.Edge` before FastAPI's own outer layers (its OpenTelemetry check,
Starlette's 500 layer, its exception telemetry and app-wide body limit), and the edge answers an
unhandled exception with the app's 500 as the 500 layer did around it. Here:

* a request of either kind (hot, or routed by the framework) crosses none of those outer layers, and
  FastAPI's native OpenTelemetry is off;
* every answer - a hot route's, a framework route's, a 404, a 405 with its ``Allow``, a limit's 413,
  the origin check's 403, an unexpected error's 500 on a hot and on a framework route - is the one
  the old layering gives (Starlette's ``ServerErrorMiddleware`` around the edge, rebuilt here from
  the same parts): status, headers and body;
* an unexpected error is still logged and counted (as a 500, under its route) and reaches the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.telemetry._asgi import NativeTelemetry
from fastapi.testclient import TestClient
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import Receive, Scope, Send

from stockade.agent.signing import AgentAuth
from stockade.agent.state import Credential
from stockade.controller.app import ControllerApp
from stockade.controller.edge import Edge
from tests.api.conftest import Api
from tests.security.test_node_poll import _estate
from tests.security.test_pod_enrolment import _agent


@pytest.fixture
def agent(sqlite_api: Api, tmp_path: Path) -> Iterator[tuple[Api, Credential]]:
    _estate(sqlite_api)
    yield sqlite_api, _agent(sqlite_api, tmp_path, "node-a")


def _app(api: Api) -> ControllerApp:
    app = api.client.app
    assert isinstance(app, ControllerApp)
    return app


def _old_layering(app: ControllerApp) -> Any:
    """The layers as they were: Starlette's 500 layer around the edge (which then let errors pass)."""
    edge = app._edge
    assert edge is not None and edge.server_error is not None
    inner = Edge(edge.app, metrics=edge.metrics, origins=edge.origins, fast=edge.fast)
    legacy = ServerErrorMiddleware(inner, handler=edge.server_error)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = app  # (Starlette's application call set it)
        await legacy(scope, receive, send)

    return asgi


def _answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    shown = [(k, "<id>" if k == "x-request-id" else v) for k, v in r.headers.multi_items()]
    return r.status_code, shown, r.content


def test_no_request_crosses_the_frameworks_outer_layers(agent: tuple[Api, Credential],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    api, cred = agent
    crossed: list[str] = []
    real_errors, real_enabled = ServerErrorMiddleware.__call__, NativeTelemetry.enabled

    async def errors(self: ServerErrorMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        crossed.append(f"500 layer: {scope['type']}")
        await real_errors(self, scope, receive, send)

    def enabled(self: NativeTelemetry) -> bool:
        crossed.append("telemetry check")
        return real_enabled(self)

    monkeypatch.setattr(ServerErrorMiddleware, "__call__", errors)
    monkeypatch.setattr(NativeTelemetry, "enabled", enabled)
    assert api.client.post(f"/api/v1/agents/{cred.agent_id}/ack", json={"revision": 0},
                           auth=AgentAuth(cred)).status_code == 204
    assert api.req("GET", "/agents").status_code == 200  # a framework route
    assert api.req("GET", "/no-such-route").status_code == 404
    assert crossed == []
    config = _app(api)._telemetry
    assert not (config["tracing"] or config["metrics"] or config["logs"] or config["auto_configure"])


def test_every_kind_of_answer_is_the_old_layerings(agent: tuple[Api, Credential],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    api, cred = agent
    app = _app(api)
    base = f"/api/v1/agents/{cred.agent_id}"
    api.req("GET", "/agents")  # (the edge is built at the first request)
    old = TestClient(_old_layering(app), raise_server_exceptions=False)
    new = TestClient(app, raise_server_exceptions=False)
    for client in (old, new):
        client.headers.update(api.client.headers)

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    def answers(client: TestClient) -> list[tuple[int, list[tuple[str, str]], bytes]]:
        with monkeypatch.context() as m:
            got = [
                client.post(f"{base}/ack", json={"revision": 0}, auth=AgentAuth(cred)),  # hot
                client.post(f"{base}/heartbeat", json={}, auth=AgentAuth(cred)),  # hot, with a body
                client.get("/api/v1/label-keys", headers=api.owner),  # the framework's
                client.get("/api/v1/no-such-route", headers=api.owner),  # 404
                client.delete(f"{base}/ack", headers=api.owner),  # 405 with the complete Allow
                client.post(f"{base}/ack", content=b"x" * (128 * 1024), auth=AgentAuth(cred),
                            headers={"content-type": "application/json"}),  # the limit
                client.post("/api/v1/label-keys", json={"name": "k", "values": []},
                            headers={"origin": "https://evil.example", "cookie": "stockade_session=x"}),  # CSRF
                *(client.post("/api/v1/label-keys", json={"name": "k", "values": []},  # the first Authorization
                              headers=[("origin", "https://evil.example"), ("cookie", "stockade_session=x"),
                                       *auth])  # header is the one that counts, empty or not
                  for auth in ([("authorization", ""), ("authorization", "Bearer x")],
                               [("authorization", "Bearer x"), ("authorization", "")])),
            ]
            m.setattr(api.ctl.dist, "agent_ack", broken)
            got.append(client.post(f"{base}/ack", json={"revision": 0}, auth=AgentAuth(cred)))  # hot: 500
            m.setattr(api.ctl, "session", broken)
            got.append(client.get("/api/v1/agents", headers=api.owner))  # a framework route: 500
        return [_answer(r) for r in got]

    before = answers(old)
    after = answers(new)
    assert [status for status, _h, _b in after] == [204, 200, 200, 404, 405, 413, 403, 403, 401, 500, 500]
    assert after == before


def test_an_unexpected_error_is_logged_counted_and_reaches_the_server(
        agent: tuple[Api, Credential], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    api, cred = agent

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(api.ctl.dist, "agent_ack", broken)
    caplog.set_level(logging.INFO)
    raising = TestClient(_app(api))  # raise_server_exceptions: what the server sees
    with pytest.raises(RuntimeError, match="boom"):
        raising.post(f"/api/v1/agents/{cred.agent_id}/ack", json={"revision": 0}, auth=AgentAuth(cred))
    errors = [r for r in caplog.records if r.name == "stockade.controller" and r.getMessage() == "unexpected error"]
    assert len(errors) == 1 and errors[0].exc_info is not None
    access = [r for r in caplog.records if r.name == "stockade.access"]
    assert access[-1].__dict__["status"] == 500 and access[-1].__dict__["route"] == "/agents/{agent_id}/ack"
    assert caplog.records.index(access[-1]) < caplog.records.index(errors[0])  # the access line first, as before
    count = api.ctl.metrics.registry.get_sample_value(
        "stockade_http_requests_total", {"method": "POST", "route": "/agents/{agent_id}/ack", "status": "500"})
    assert count == 1.0


def test_an_agents_principal_is_kept_only_behind_its_token(agent: tuple[Api, Credential]) -> None:
    api, cred = agent
    agent_id, _, secret = cred.token[4:].partition("_")
    first = api.ctl.agent_principal(agent_id, secret)
    assert first is not None and first.agent_id == agent_id and first.workload == cred.workload
    assert api.ctl.agent_principal(agent_id, secret) is first  # made once
    assert api.ctl.agent_principal(agent_id, secret[:-1] + ("0" if secret[-1] != "0" else "1")) is None
    assert api.ctl.agent_principal(agent_id, "") is None
    api.ok("POST", f"/agents/{agent_id}/revoke", 204)
    assert api.ctl.agent_principal(agent_id, secret) is None  # revoked: refused, kept or not
