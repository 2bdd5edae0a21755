"""Pairing profiles on the generic object skeleton: every one of their routes authorised by role AND scope.

A pairing profile's labels decide what every host enrolled with its codes becomes, and that effect
comes later (at enrolment), so no label scope can judge a profile write by its compiled effect:
its routes are closed to every label-scoped principal, whatever its role, even for a profile whose
labels lie inside the scope. The routes are found from the app (every route under
``/pairing-profiles``: the generic kind's five and the activation codes'), so a route added later
is walked too. A refused write changes nothing and records no event. Also: codes go with their
profile (a profile created again under the same name does not honour the old codes), and the list
is a bare array paged by a ``Link`` header. On SQLite and PostgreSQL (the ``api`` fixture).
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute

from stockade.controller.services.auth import Permission
from stockade.controller.services.codec import KINDS
from stockade.controller.services.scope import SCOPE_CHECKED_ROUTES
from tests.api.conftest import Api

PREFIX = "/api/v1/pairing-profiles"
INSIDE = {"name": "shop-web", "labels": {"app": "shop", "role": "web"}, "mode": "full"}


def _profile_routes(api: Api) -> list[tuple[str, str, Permission]]:
    out = []
    for prefix, router in api.client.app.state.routers:  # type: ignore[attr-defined]
        for route in router.routes:
            assert isinstance(route, APIRoute)
            path = prefix + route.path
            if not path.startswith(PREFIX):
                continue
            perms = [p for p in (getattr(d.call, "permission", None) for d in route.dependant.dependencies) if p]
            assert len(perms) == 1, path
            out.extend((m, path, perms[0]) for m in sorted(route.methods))
    return out


def _events(api: Api) -> int:
    page = api.ok("GET", "/events?kind=pairing_profile&limit=500")
    return len(page["items"] if isinstance(page, dict) else page)


def _request(api: Api, method: str, path: str, headers: dict[str, str], code_id: str) -> Any:
    url = path.replace("{name}", INSIDE["name"]).replace("{code_id}", code_id)
    body: dict[str, Any] | None = None
    if method == "POST" and path == PREFIX:
        body = {**INSIDE, "name": "shop-new"}
    elif method == "PUT":
        body = {**INSIDE, "description": "edited"}
    elif method == "POST":
        body = {}
    return api.client.request(method, url, headers=headers, json=body)


def test_every_pairing_profile_route_by_role_and_scope(api: Api) -> None:
    routes = _profile_routes(api)
    # the generic kind's five routes and the codes' three, nothing else
    assert {(m, p.removeprefix(PREFIX)) for m, p, _ in routes} == {
        ("GET", ""), ("POST", ""), ("GET", "/{name}"), ("PUT", "/{name}"), ("DELETE", "/{name}"),
        ("POST", "/{name}/codes"), ("GET", "/{name}/codes"), ("DELETE", "/{name}/codes/{code_id}")}
    assert all(perm is (Permission.READ if m == "GET" else Permission.WRITE) for m, _p, perm in routes)
    assert not {(m, p.removeprefix("/api/v1")) for m, p, _ in routes} & SCOPE_CHECKED_ROUTES

    api.ok("POST", "/pairing-profiles", 201, json=INSIDE)
    code_id = api.ok("POST", f"/pairing-profiles/{INSIDE['name']}/codes", 201)["id"]
    before = api.ok("GET", f"/pairing-profiles/{INSIDE['name']}")
    codes_before = api.ok("GET", f"/pairing-profiles/{INSIDE['name']}/codes")
    events = _events(api)
    admin = api.key("admin")  # the unscoped writers (the owner, an admin) are walked after the refusals
    roles = {"ruleset-manager": api.key("ruleset-manager", ["app=shop"]), "read-only": api.key("read-only")}
    # scoped principals of every role, their scope holding the profile's labels
    scoped = {f"scoped {role}": api.key(role, ["app=shop"]) for role in ("owner", "admin", "read-only")}

    failures = []
    for method, path, perm in routes:
        for who, headers in {"admin": admin, **roles, **scoped, "anonymous": {}}.items():
            if who == "admin" and perm is not Permission.READ:
                continue
            allowed = perm is Permission.READ and who != "anonymous"
            r = _request(api, method, path, headers, code_id)
            want = (200,) if allowed else ((401,) if who == "anonymous" else (403,))
            if r.status_code not in want:
                failures.append((who, method, path, r.status_code, r.text[:200]))
            if who in ("scoped owner", "scoped admin") and not allowed and "label-scoped" not in r.text:
                failures.append((who, method, path, "no scope reason", r.text[:200]))
    assert failures == []
    # nothing any refused write did is visible
    assert api.ok("GET", f"/pairing-profiles/{INSIDE['name']}") == before
    assert api.ok("GET", f"/pairing-profiles/{INSIDE['name']}/codes") == codes_before
    assert api.req("GET", "/pairing-profiles/shop-new").status_code == 404
    assert _events(api) == events

    # the unscoped owner and admin may write through every route
    for who in (api.owner, admin):
        for method, path, perm in routes:
            if perm is Permission.WRITE and method != "DELETE":
                r = _request(api, method, path, who, code_id)
                assert r.status_code in (200, 201), (method, path, r.text)
        api.ok("DELETE", f"/pairing-profiles/{INSIDE['name']}/codes/{code_id}", 204, headers=who)
        api.ok("DELETE", "/pairing-profiles/shop-new", 204, headers=who)
    assert api.ok("GET", f"/pairing-profiles/{INSIDE['name']}")["description"] == "edited"


def test_enrolment_kinds_are_closed_to_scoped_principals() -> None:
    """Every kind whose effect comes later is outside the scope-checked routes (fails closed)."""
    later = [k for k in KINDS if not k.scope_checked]
    assert [k.name for k in later] == ["pairing_profile"]
    for kind in later:
        for route in (("POST", f"/{kind.path}"), ("PUT", f"/{kind.path}/{{name}}"),
                      ("DELETE", f"/{kind.path}/{{name}}")):
            assert route not in SCOPE_CHECKED_ROUTES


def test_codes_go_with_their_profile(api: Api) -> None:
    """Deleting a profile deletes its codes: the same name created again (say, with other labels)
    does not honour a code issued before."""
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "labels": {"env": "dev"}})
    old = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    api.ok("DELETE", "/pairing-profiles/p", 204)
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "labels": {"env": "prod"}})
    assert api.ok("GET", "/pairing-profiles/p/codes") == []
    r = api.client.post("/api/v1/agents/enroll", json={"activation_code": old, "hostname": "h"})
    assert r.status_code == 403, r.text
    assert api.ok("GET", "/pairing-profiles/p")["uses"] == 0
    new = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    api.ok("POST", "/agents/enroll", 201, json={"activation_code": new, "hostname": "h"})
    assert api.ok("GET", "/workloads/h")["body"]["labels"] == {"env": "prod"}
    assert api.ok("GET", "/pairing-profiles/p")["uses"] == 1


def test_profile_list_is_paged_by_link_header(api: Api) -> None:
    for i in range(5):
        api.ok("POST", "/pairing-profiles", 201, json={"name": f"p{i}"})
    seen: list[str] = []
    url = "/api/v1/pairing-profiles?limit=2"
    while url:
        r = api.client.get(url, headers=api.owner)
        assert r.status_code == 200 and isinstance(r.json(), list)
        seen += [p["name"] for p in r.json()]
        link = r.headers.get("Link")
        url = link[1:link.index(">")] if link else ""
    assert seen == [f"p{i}" for i in range(5)]
    assert [p["name"] for p in api.ok("GET", "/pairing-profiles")] == seen  # default: a page of 500
    bad = api.req("GET", "/pairing-profiles?labels=app")
    assert bad.status_code == 422
