"""Every route x every role: the authorisation matrix, checked statically and by real requests.

The expected permission of each route is written here independently of the code (from the
method and path); the test fails if a route is added without an entry, if its declared
permission differs, or if a real request by a role gets the wrong allow/deny answer.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import APIRoute
from tests.api.conftest import Api

from stockade.controller.services.auth import Permission

ROLES = ("owner", "admin", "ruleset-manager", "read-only")
AGENT_ROUTES = re.compile(
    r"^/api/v1/agents/\{agent_id\}/(interfaces|heartbeat|policy|policy/wait|ack|events|unenroll|flows|key|session|wireguard-key|pods/enroll|pods/enroll-batch|pods/updates|pods/acks)$"
)


def expected(method: str, path: str) -> Permission:
    if (method, path) in {("POST", "/api/v1/auth/login"), ("POST", "/api/v1/agents/enroll")}:
        return Permission.PUBLIC
    if AGENT_ROUTES.match(path):
        return Permission.AGENT
    if path.startswith(("/api/v1/users", "/api/v1/api-keys")):
        return Permission.MANAGE_USERS
    if method == "GET" or (method, path) == ("POST", "/api/v1/auth/logout"):
        return Permission.READ
    if path in ("/api/v1/rulesets", "/api/v1/rulesets/{name}"):
        return Permission.WRITE_RULESETS
    return Permission.WRITE


ALLOWED_ROLES = {
    Permission.PUBLIC: set(ROLES),
    Permission.READ: set(ROLES),
    Permission.WRITE_RULESETS: {"owner", "admin", "ruleset-manager"},
    Permission.WRITE: {"owner", "admin"},
    Permission.MANAGE_USERS: {"owner"},
    Permission.AGENT: set(),
}


def routes(api: Api) -> list[tuple[str, str, Permission]]:
    out = []
    app = api.client.app
    for prefix, router in app.state.routers:  # type: ignore[attr-defined]
        for route in router.routes:
            assert isinstance(route, APIRoute)
            declared = [getattr(d.call, "permission", None) for d in route.dependant.dependencies]
            perms = [p for p in declared if p is not None]
            for method in sorted(route.methods):
                out.append((method, prefix + route.path, perms[0] if len(perms) == 1 else None))
    # the walk covers every operation the app publishes
    spec = app.openapi()  # type: ignore[attr-defined]
    published = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert published == {(m, p) for m, p, _ in out}
    return out


def test_every_route_declares_the_expected_permission(sqlite_api: Api) -> None:
    found = routes(sqlite_api)
    assert len(found) > 40
    wrong = [(m, p, d, expected(m, p)) for m, p, d in found if d is not expected(m, p)]
    assert wrong == []


def _fill(path: str, agent_id: str) -> str:
    return path.replace("{agent_id}", agent_id).replace("{number}", "999").replace("{code_id}", "nocode") \
        .replace("{key_id}", "nokey").replace("{username}", "nouser").replace("{name}", "nosuch")


def test_route_role_matrix(api: Api) -> None:
    creds: dict[str, dict[str, str]] = {"owner": api.owner}
    creds["admin"] = api.key("admin")
    creds["ruleset-manager"] = api.key("ruleset-manager", ["app=shop"])
    creds["read-only"] = api.key("read-only")
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p"})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agent = api.client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": "h"}).json()
    creds["agent"] = api.headers(agent["token"])
    creds["anonymous"] = {}

    failures: list[Any] = []
    for method, path, _declared in routes(api):
        perm = expected(method, path)
        url = _fill(path, agent["agent_id"])
        for who, headers in creds.items():
            if who == "agent":
                allowed = perm in (Permission.AGENT, Permission.PUBLIC)
            elif who == "anonymous":
                allowed = perm is Permission.PUBLIC
            else:
                allowed = who in ALLOWED_ROLES[perm]
            kw: dict[str, Any] = {"headers": headers, "params": {"timeout": 0}}
            if method in ("POST", "PUT"):
                kw["json"] = {}
            if path.endswith("/auth/logout") or (path.endswith("/revoke") and who in ("owner", "admin")) \
                    or (path.endswith("/unenroll") and who == "agent"):
                continue  # would end the credential or the agent used by the rest of the walk
            status = api.client.request(method, url, **kw).status_code
            if allowed and status in (401, 403):
                failures.append((who, method, path, status, "should be allowed"))
            if not allowed and status != (401 if who == "anonymous" else 403):
                failures.append((who, method, path, status, "should be denied"))
    assert failures == []


def test_ruleset_manager_scope(api: Api) -> None:
    mgr = api.key("ruleset-manager", ["app=shop"])
    inside = {"name": "shop", "scope": [{"labels": {"app": "shop", "env": "prod"}}], "rules": []}
    outside = {"name": "crm", "scope": [{"labels": {"app": "crm"}}], "rules": []}
    unscoped = {"name": "all", "scope": "all", "rules": []}
    assert api.req("POST", "/rulesets", json=inside, headers=mgr).status_code == 201
    assert api.req("POST", "/rulesets", json=outside, headers=mgr).status_code == 403
    assert api.req("POST", "/rulesets", json=unscoped, headers=mgr).status_code == 403
    api.ok("POST", "/rulesets", 201, json=outside)  # the owner may
    moved = {**inside, "scope": [{"labels": {"app": "crm"}}]}
    assert api.req("PUT", "/rulesets/shop", json=moved, headers=mgr).status_code == 403
    assert api.req("DELETE", "/rulesets/crm", headers=mgr).status_code == 403
    assert api.req("DELETE", "/rulesets/shop", headers=mgr).status_code == 204
    assert api.req("POST", "/services", json={"name": "x", "ports": ["1/tcp"]}, headers=mgr).status_code == 403
    assert api.req("POST", "/policy/provision", json={"message": "m"}, headers=mgr).status_code == 403


def test_sessions_keys_and_rate_limit(sqlite_api: Api) -> None:
    api = sqlite_api
    api.ok("POST", "/users", 201, json={"username": "ro", "password": "correct horse battery", "role": "read-only"})
    assert api.req("POST", "/users", json={"username": "x", "password": "short", "role": "admin"}).status_code == 422
    c = api.client
    assert c.post("/api/v1/auth/login", json={"username": "ro", "password": "wrong password!"}).status_code == 401
    assert c.post("/api/v1/auth/login", json={"username": "nobody", "password": "x"}).status_code == 401
    r = c.post("/api/v1/auth/login", json={"username": "ro", "password": "correct horse battery"})
    assert r.status_code == 200 and "stockade_session" in r.cookies
    assert c.get("/api/v1/auth/whoami").json()["role"] == "read-only"
    assert c.get("/api/v1/workloads").status_code == 200
    assert c.post("/api/v1/services", json={"name": "s", "ports": ["1/tcp"]}).status_code == 403
    assert c.post("/api/v1/auth/logout").status_code == 204
    c.cookies.clear()
    assert c.get("/api/v1/workloads").status_code == 401
    # API keys: secret shown once, revocable
    key = api.ok("POST", "/api-keys", 201, json={"name": "ci", "role": "admin"})
    listed = api.ok("GET", "/api-keys")
    assert all(k["key"] is None for k in listed)
    hdr = api.headers(key["key"])
    assert c.get("/api/v1/workloads", headers=hdr).status_code == 200
    api.ok("DELETE", f"/api-keys/{key['id']}", 204)
    assert c.get("/api/v1/workloads", headers=hdr).status_code == 401
    assert c.get("/api/v1/workloads", headers=api.headers("stk_bogus_bogus")).status_code == 401
    assert c.get("/api/v1/workloads", headers={"Authorization": "Basic abc"}).status_code == 401
    # the last owner cannot be demoted
    assert api.req("PUT", "/users/admin", json={"role": "admin"}).status_code == 409
    # login is rate limited per client
    api.ctl.login_limiter.limit = 3
    api.ctl.login_limiter._hits.clear()
    codes = [c.post("/api/v1/auth/login", json={"username": "ro", "password": "bad"}).status_code for _ in range(5)]
    assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429]


@pytest.mark.parametrize("path", ["/metrics"])
def test_metrics(sqlite_api: Api, path: str) -> None:
    api = sqlite_api
    assert api.client.get(path).status_code == 401
    api.ok("POST", "/workloads", 201, json={"name": "w"})
    text = api.client.get(path, headers=api.owner).text
    assert "stockade_http_requests_total" in text and "stockade_agents_enrolled" in text
    assert "stockade_compile_seconds_count" in text
