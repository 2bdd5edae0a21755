"""CSRF: a state-changing request authenticated by the session cookie must come from our own origin.

The class: every state-changing route the app serves (walked from ``app.routes``) refuses the
console's cookie when the request names another origin (the issue's attack was a page on another
port of the same host), names none, or names ``null``; and nothing changes (no audit event, the
objects the requests point at are intact). The same routes accept the cookie from the
controller's own origin, and API keys work without any Origin. A real chromium then runs the
issue's attack from a page on another port against ``stockade controller`` and the real console.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stockade.controller.app import create_app
from stockade.controller.context import ControllerSettings
from stockade.errors import ValidationError
from tests.api.conftest import Api, make_settings
from tests.asyncutil import in_thread
from tests.browser.harness import chromium_skip_reason, free_port, launch_chromium, running_controller
from tests.security.test_authz_matrix import write_routes

OWN = "http://testserver"
FOREIGN = "http://testserver:8081"  # same host, another port: same site, another origin


def events(api: Api) -> list[dict[str, Any]]:
    return api.ok("GET", "/events", params={"limit": 500})["items"]  # type: ignore[no-any-return]


def login_cookie(api: Api) -> None:
    assert api.ctl.first_run_credential is not None
    user, password = api.ctl.first_run_credential
    r = api.client.post("/api/v1/auth/login", json={"username": user, "password": password}, headers={"Origin": OWN})
    assert r.status_code == 200, r.text


def seed(api: Api) -> dict[str, str]:
    """Real objects for the write routes to point at, so an accepted forgery would change something."""
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p"})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)
    agent = api.client.post("/api/v1/agents/enroll", json={"activation_code": code["code"], "hostname": "web-1"})
    assert agent.status_code == 201, agent.text
    return {"agent_id": agent.json()["agent_id"], "code_id": code["id"], "name": "p", "username": "admin",
            "key_id": "nokey", "number": "1"}


def fill(path: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    assert "{" not in path, path
    return path


@pytest.mark.parametrize("claim", [
    {"Origin": FOREIGN},
    {"Origin": "http://evil.example"},
    {"Origin": "https://testserver"},  # another scheme
    {"Origin": "null"},  # sandboxed frames, data: URLs
    {"Referer": FOREIGN + "/attack.html"},  # no Origin: the Referer decides
    {},  # neither
])
def test_every_write_route_refuses_a_cookie_from_elsewhere(sqlite_api: Api, claim: dict[str, str]) -> None:
    api = sqlite_api
    values = seed(api)
    login_cookie(api)
    before = events(api)
    del api.client.headers["Origin"]
    refused = []
    for method, path, _perm in write_routes(api.client.app):
        r = api.client.request(method, fill(path, values), headers=claim, json={})
        if r.status_code != 403 or r.json()["error"] != "CsrfError":
            refused.append((method, path, r.status_code, r.text[:120]))
        elif claim.get("Origin") == FOREIGN:
            assert "cross-origin request refused" in r.json()["message"] and OWN in r.json()["message"]
    assert refused == []
    api.client.headers["Origin"] = OWN
    assert events(api) == before  # nothing was changed (every change is an audit event)
    assert api.ok("GET", f"/agents/{values['agent_id']}")["revoked"] is False
    assert api.client.get("/api/v1/auth/whoami").status_code == 200  # the session survived too (no logout)


def test_same_origin_cookie_and_bearer_without_origin_work(sqlite_api: Api) -> None:
    api = sqlite_api
    values = seed(api)
    login_cookie(api)
    del api.client.headers["Origin"]
    c = api.client
    # the console's own origin, by Origin or (when absent) by Referer
    assert c.post("/api/v1/pairing-profiles/p/codes", headers={"Origin": OWN}).status_code == 201
    assert c.post("/api/v1/pairing-profiles/p/codes", headers={"Referer": OWN + "/#/pairing"}).status_code == 201
    assert c.post("/api/v1/pairing-profiles/p/codes", headers={"Origin": "http://TestServer:80"}).status_code == 201
    for method, path, _perm in write_routes(c.app):
        if path.endswith("/logout"):
            continue
        r = c.request(method, fill(path, {**values, "agent_id": "nosuch", "name": "nosuch", "username": "nosuch"}),
                      headers={"Origin": OWN}, json={})
        assert r.status_code != 403 or r.json()["error"] != "CsrfError", (method, path)
    c.cookies.clear()
    # an API key needs no Origin (a browser never adds Authorization on its own), even with a foreign one
    assert c.post("/api/v1/pairing-profiles/p/codes", headers=api.owner).status_code == 201
    assert c.post("/api/v1/pairing-profiles/p/codes", headers={**api.owner, "Origin": FOREIGN}).status_code == 201
    assert c.post(f"/api/v1/agents/{values['agent_id']}/revoke", headers=api.owner).status_code == 204
    # cookie-less requests without an Origin (agents, scripts) are not affected
    assert c.post("/api/v1/auth/login", json={"username": "admin", "password": "wrong password"}).status_code == 401


def test_login_from_another_origin_is_refused(sqlite_api: Api) -> None:
    """Login CSRF: a foreign page must not log the victim's browser into an account of its choosing."""
    api = sqlite_api
    assert api.ctl.first_run_credential is not None
    user, password = api.ctl.first_run_credential
    r = api.client.post("/api/v1/auth/login", json={"username": user, "password": password},
                        headers={"Origin": FOREIGN})
    assert r.status_code == 403 and "stockade_session" not in r.cookies


def test_allowed_origins_and_forwarded_host_from_trusted_proxy(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'c.db'}", allowed_origins=("https://console.example:8443",),
                             trusted_proxies=("10.0.0.0/8",))
    app = create_app(settings)
    ctl = app.state.controller
    assert ctl.first_run_credential is not None
    user, password = ctl.first_run_credential
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "stockade.example"}
    for peer, trusted in ((("10.1.2.3", 40000), True), (("192.0.2.9", 40000), False)):
        with TestClient(app, client=peer) as c:
            assert c.post("/api/v1/auth/login", json={"username": user, "password": password}).status_code == 200
            extra = c.post("/api/v1/pairing-profiles", json={"name": f"x{peer[0]}"},
                           headers={"Origin": "https://console.example:8443"})
            assert extra.status_code == 201, extra.text
            via_proxy = c.post("/api/v1/pairing-profiles", json={"name": f"y{peer[0]}"},
                               headers={**proxied, "Origin": "https://stockade.example"})
            assert via_proxy.status_code == (201 if trusted else 403), via_proxy.text


def test_bad_allowed_origin_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"allowed_origins\[1\]"):
        ControllerSettings(database_url="sqlite://", allowed_origins=("https://ok.example", "ftp://x/y"))
    with pytest.raises(ValidationError, match=r"trusted_proxies\[0\]"):
        ControllerSettings(database_url="sqlite://", trusted_proxies=("10.0.0.0/33",))


# ---- the attack, in a real browser against the real command ----------------------------------

ATTACK = """<!doctype html><title>cat pictures</title><script>
const target = %(target)r;
Promise.allSettled([
  fetch(target + "/api/v1/agents/%(agent)s/revoke", {method: "POST", credentials: "include", mode: "no-cors"}),
  fetch(target + "/api/v1/pairing-profiles/p/codes", {method: "POST", credentials: "include", mode: "no-cors"}),
]).then(() => { document.title = "done"; });
</script>"""


@pytest.fixture
def attacker_site() -> Iterator[tuple[str, dict[str, str]]]:
    page: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.get("html", "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", page
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(chromium_skip_reason() is not None, reason=str(chromium_skip_reason()))
def test_chromium_page_on_another_port_cannot_use_the_console_session(attacker_site: tuple[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    attacker, page_html = attacker_site
    with running_controller(cli=True) as con:
        con.post("/pairing-profiles", {"name": "p"})
        code = con.post("/pairing-profiles/p/codes", {})["code"]
        enrolled = con.api.post("/agents/enroll", json={"activation_code": code, "hostname": "victim-1"})
        agent_id = enrolled.json()["agent_id"]
        page_html["html"] = ATTACK % {"target": con.url, "agent": agent_id}
        codes_before = len(con.get("/events", action="activation_code.create", limit=500)["items"])
        cookie = con.session_cookie()
        def drive() -> None:
            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                try:
                    ctx = browser.new_context()
                    ctx.add_cookies([{"name": "stockade_session", "value": cookie, "url": con.url}])
                    page = ctx.new_page()
                    page.goto(attacker + "/")
                    page.wait_for_function("document.title === 'done'", timeout=15000)
                    assert con.get(f"/agents/{agent_id}")["revoked"] is False
                    assert len(con.get("/events", action="activation_code.create", limit=500)["items"]) == codes_before
                    # the console itself (same origin) still writes with the same cookie: chromium sends Origin
                    page.goto(con.url + "/")
                    status = page.evaluate("""async () => (await fetch('/api/v1/pairing-profiles/p/codes',
                                              {method: 'POST', credentials: 'same-origin'})).status""")
                    assert status == 201
                    after = len(con.get("/events", action="activation_code.create", limit=500)["items"])
                    assert after == codes_before + 1
                finally:
                    browser.close()

        in_thread(drive, timeout=120, name="chromium")
