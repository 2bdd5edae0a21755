"""An API key is worth no more than its user is worth now: demotion, scope narrowing, disable, delete.

The class test walks every state-changing route the app serves (``app.routes``, so a route added
later is covered without editing this file) with keys of every role held by users of every role:
a key whose user has been demoted may do exactly what the lesser of the two roles may do, and
nothing more. The expected effective role is computed here from a table of its own, not from the
controller's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute

from stockade.controller.services.auth import ALLOWED, Permission, Role
from tests.api.conftest import Api

ROLES = ("owner", "admin", "ruleset-manager", "read-only")  # strongest first
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PASSWORD = "correct horse battery staple"
SHOP = {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": []}
SHOP_PROD = {"name": "shop-prod", "scope": [{"labels": {"app": "shop", "env": "prod"}}], "rules": []}


def weaker(a: str, b: str) -> str:
    return a if ROLES.index(a) >= ROLES.index(b) else b


Walked = Iterator[tuple[str, APIRoute, list[Any]]]


def _walk(routes: list[Any], prefix: str = "", inherited: tuple[Any, ...] = ()) -> Walked:
    """(full path, route, dependency callables) for every API route, through included routers."""
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps includes lazy
        if inner is not None:
            ctx = route.include_context
            deps = inherited + tuple(d.dependency for d in ctx.dependencies)
            yield from _walk(inner.routes, prefix + ctx.prefix, deps)
        elif isinstance(route, APIRoute):
            yield prefix + route.path, route, [*inherited, *(d.call for d in route.dependant.dependencies)]


def write_routes(app: Any) -> list[tuple[str, str, Permission]]:
    """Every (method, path, declared permission) that can change state, straight from ``app.routes``."""
    out = []
    seen = set()
    for path, route, calls in _walk(list(app.routes)):
        perms = [c.permission for c in calls if hasattr(c, "permission")]
        assert len(perms) == 1, f"{path} declares {perms}"
        seen |= {(m, path) for m in route.methods}
        for method in sorted(route.methods & WRITES):
            out.append((method, path, perms[0]))
    published = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert published <= seen, f"routes the walk missed: {sorted(published - seen)}"
    assert len(out) > 30
    return out


def checked_routes(api: Api) -> list[tuple[str, str, Permission]]:
    """The write routes a key's role decides (not login/enrolment; not logout, which a key may always call)."""
    return [r for r in write_routes(api.client.app) if r[2] is not Permission.PUBLIC and not r[1].endswith("/logout")]


def fill(path: str) -> str:
    """Path parameters point at nothing, so an allowed request cannot harm the rest of the walk."""
    for name in ("agent_id", "name", "username", "key_id", "code_id", "number"):
        path = path.replace("{" + name + "}", "999" if name == "number" else "nosuch")
    assert "{" not in path, f"unknown path parameter in {path}"
    return path


def user_with_keys(api: Api, username: str, keys: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """A user who was an owner when they made API keys of the given roles (and scopes)."""
    api.ok("POST", "/users", 201, json={"username": username, "password": PASSWORD, "role": "owner"})
    c = api.client
    assert c.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD}).status_code == 200
    out = {}
    for role, scope in keys.items():
        r = c.post("/api/v1/api-keys", json={"name": f"{username}-{role}", "role": role, "scope": scope})
        assert r.status_code == 201, r.text
        out[role] = api.headers(r.json()["key"])
    c.cookies.clear()
    return out


def set_user(api: Api, username: str, **change: Any) -> None:
    api.ok("PUT", f"/users/{username}", json=change)


def test_demoted_owner_key_can_no_longer_write(api: Api) -> None:
    """The issue's case: an owner key of a user demoted to read-only still created an owner (201)."""
    key = user_with_keys(api, "alice", {"owner": []})["owner"]
    made = api.req("POST", "/users", headers=key,
                   json={"username": "mallory", "password": PASSWORD, "role": "owner"})
    assert made.status_code == 201
    set_user(api, "alice", role="read-only")
    assert api.req("GET", "/auth/whoami", headers=key).json()["role"] == "read-only"
    again = api.req("POST", "/users", headers=key, json={"username": "eve", "password": PASSWORD, "role": "owner"})
    assert again.status_code == 403
    assert api.req("GET", "/users/eve").status_code == 404
    statuses = {(m, p): api.client.request(m, fill(p), headers=key, json={}).status_code
                for m, p, perm in checked_routes(api)}
    assert {k: v for k, v in statuses.items() if v != 403} == {}
    assert api.req("GET", "/workloads", headers=key).status_code == 200  # still reads
    set_user(api, "alice", role="owner")  # promotion back: the key is worth its own role again
    assert api.req("GET", "/auth/whoami", headers=key).json()["role"] == "owner"


def test_scope_narrowing_of_the_user_narrows_the_key(api: Api) -> None:
    keys = user_with_keys(api, "rita", {"ruleset-manager": [], "admin": [], "owner": []})
    set_user(api, "rita", role="ruleset-manager", scope=["app=shop"])
    for role, key in keys.items():
        who = api.req("GET", "/auth/whoami", headers=key).json()
        assert (who["role"], who["scope"]) == ("ruleset-manager", ["app=shop"]), role
    mgr = keys["ruleset-manager"]
    assert api.req("POST", "/rulesets", json=SHOP, headers=mgr).status_code == 201
    set_user(api, "rita", scope=["app=shop", "env=prod"])  # narrower
    assert api.req("PUT", "/rulesets/shop", json=SHOP, headers=mgr).status_code == 403
    assert api.req("POST", "/rulesets", json=SHOP_PROD, headers=mgr).status_code == 201
    # a key with a scope of its own keeps it; the user's scope adds to it (both must hold)
    own = api.ok("POST", "/api-keys", 201, json={"name": "k", "role": "ruleset-manager", "scope": ["env=prod"]})
    assert api.req("GET", "/auth/whoami", headers=api.headers(own["key"])).json()["scope"] == ["env=prod"]
    set_user(api, "rita", scope=["app=crm"])  # disjoint from what the keys were used for
    assert api.req("PUT", "/rulesets/shop-prod", json=SHOP_PROD, headers=mgr).status_code == 403


def test_disabled_or_deleted_user_keys_stop_working(api: Api) -> None:
    key = user_with_keys(api, "dora", {"admin": []})["admin"]
    assert api.req("GET", "/workloads", headers=key).status_code == 200
    set_user(api, "dora", disabled=True)
    assert api.req("GET", "/workloads", headers=key).status_code == 401
    set_user(api, "dora", disabled=False)
    assert api.req("GET", "/workloads", headers=key).status_code == 200
    api.ok("DELETE", "/users/dora", 204)
    assert api.req("GET", "/workloads", headers=key).status_code == 401
    # a new user of the same name does not inherit the old user's keys
    api.ok("POST", "/users", 201, json={"username": "dora", "password": PASSWORD, "role": "owner"})
    assert api.req("GET", "/workloads", headers=key).status_code == 401
    revoked = [k for k in api.ok("GET", "/api-keys") if k["owner"] == "dora"]
    assert revoked and all(k["revoked_at"] for k in revoked)


def test_every_role_transition_on_every_write_route(sqlite_api: Api) -> None:
    """Keys of every role x users now of every role x every state-changing route: a key may do
    exactly what the weaker of (its role, its user's current role) may do."""
    api = sqlite_api
    scope = ["app=shop"]
    keys: dict[tuple[str, str], dict[str, str]] = {}
    for now in ROLES:
        username = f"u-{now}"
        made = user_with_keys(api, username, {role: scope if role == "ruleset-manager" else [] for role in ROLES})
        if now != "owner":
            set_user(api, username, role=now, scope=scope if now == "ruleset-manager" else [])
        for role, key in made.items():
            keys[(role, now)] = key
    routes = checked_routes(api)
    failures = []
    for (key_role, user_role), key in keys.items():
        effective = weaker(key_role, user_role)
        assert api.req("GET", "/auth/whoami", headers=key).json()["role"] == effective
        for method, path, perm in routes:
            allowed = Role(effective) in ALLOWED[perm]
            url = fill(path)
            status = api.client.request(method, url, headers=key, json={}, params={"timeout": 0}).status_code
            if allowed and status in (401, 403):
                failures.append((key_role, user_role, method, path, status, "should be allowed"))
            if not allowed and status != 403:
                failures.append((key_role, user_role, method, path, status, "should be refused"))
    assert failures == []
