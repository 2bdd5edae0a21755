"""``POST /workloads/batch`` (issue 15, pod churn): many workload writes as one transaction.

One revision per affected host for the whole batch (the point of it), all-or-nothing on any bad
item with the field named, every write audited, and the same permission and scope rules as the
single writes. On SQLite and PostgreSQL (the ``api`` fixture).
"""

from __future__ import annotations

from typing import Any

from tests.api.conftest import Api


def _pod(name: str, role: str, addr: str, app: str = "shop") -> dict[str, Any]:
    return {"name": name, "labels": {"app": app, "role": role}, "mode": "full",
            "interfaces": [{"name": "eth0", "addresses": [addr]}]}


def _setup(api: Api) -> None:
    api.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["pg"]}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "t"})
    api.ok("POST", "/workloads", 201, json=_pod("db", "db", "10.5.0.1"))
    api.ok("POST", "/workloads", 201, json=_pod("web-old", "web", "10.5.0.9"))


def _revision(api: Api, name: str) -> int:
    return int(api.ok("GET", f"/workloads/{name}/host-policy")["revision"])


def test_a_batch_is_one_revision_per_affected_host_and_audited(api: Api) -> None:
    _setup(api)
    before = _revision(api, "db")
    got = api.ok("POST", "/workloads/batch", json={
        "upsert": [_pod(f"web-{i}", "web", f"10.5.0.{10 + 10 * i}") for i in range(3)] + [_pod("db", "db", "10.5.0.2")],
        "delete": ["web-old"]})
    assert got == {"created": ["web-0", "web-1", "web-2"], "replaced": ["db"], "deleted": ["web-old"]}
    assert _revision(api, "db") == before + 1  # four peer changes and a re-address: one revision
    hp = api.ok("GET", "/workloads/db/host-policy")["policy"]
    text = str(hp)
    assert all(f"10.5.0.{10 + 10 * i}/32" in text for i in range(3)) and "10.5.0.9/32" not in text
    assert "10.5.0.2" in text
    actions = [e["action"] for e in api.ok("GET", "/events", params={"limit": 200})["items"]]
    assert actions.count("workload.create") >= 3 + 2 and "workload.delete" in actions and "workload.update" in actions


def test_a_bad_item_refuses_the_whole_batch_naming_it(api: Api) -> None:
    _setup(api)
    before = _revision(api, "db")
    bad = _pod("web-x", "web", "not-an-address")
    r = api.req("POST", "/workloads/batch", json={"upsert": [_pod("web-ok", "web", "10.5.0.20"), bad]})
    assert r.status_code == 422 and "upsert[1]" in r.text
    r = api.req("POST", "/workloads/batch", json={"upsert": [_pod("web-y", "web", "10.5.0.21")], "delete": ["nosuch"]})
    assert r.status_code == 404
    r = api.req("POST", "/workloads/batch", json={"upsert": [_pod("web-z", "web", "10.5.0.1")]})  # db's address
    assert r.status_code == 409
    r = api.req("POST", "/workloads/batch", json={"upsert": [_pod("w", "web", "10.5.0.30")], "delete": ["w"]})
    assert r.status_code == 422 and "more than once" in r.text
    r = api.req("POST", "/workloads/batch", json={"upsert": [], "delete": ["bad name!"]})
    assert r.status_code == 422
    r = api.req("POST", "/workloads/batch", json={"upsert": [], "nonsense": 1})
    assert r.status_code == 422
    for name in ("web-ok", "web-x", "web-y", "web-z", "w"):
        assert api.req("GET", f"/workloads/{name}").status_code == 404  # nothing half-written
    assert _revision(api, "db") == before


def test_batch_permissions_and_scope(api: Api) -> None:
    _setup(api)
    body = {"upsert": [_pod("web-5", "web", "10.5.0.50")]}
    assert api.req("POST", "/workloads/batch", json=body, headers=api.key("read-only")).status_code == 403
    assert api.client.post("/api/v1/workloads/batch", json=body,
                           headers={"Authorization": "Bearer nope"}).status_code == 401
    # a principal scoped to another app may not change the shop's policy through a batch
    other = api.key("admin", ["app=other"])
    r = api.req("POST", "/workloads/batch", json={"upsert": [_pod("web-6", "web", "10.5.0.51")]}, headers=other)
    assert r.status_code == 403
    assert api.req("GET", "/workloads/web-6").status_code == 404
