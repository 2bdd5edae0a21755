"""CRUD, validation, ETag and pagination tests for every stored kind, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from tests.api.conftest import Api

# kind path -> (a valid body, a valid replacement body)
SAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "label-keys": ({"name": "tier", "values": ["gold", "silver"]}, {"name": "tier", "values": []}),
    "workloads": (
        {"name": "web-1", "labels": {"app": "shop", "role": "web"},
         "interfaces": [{"name": "eth0", "addresses": ["10.0.0.1", "fd00::1"]}]},
        {"name": "web-1", "labels": {"app": "shop", "role": "db"}, "mode": "full",
         "interfaces": [{"name": "eth0", "addresses": ["10.0.0.2"]}]},
    ),
    "label-groups": ({"name": "envs", "key": "env", "values": ["dev", "test"]},
                     {"name": "envs", "key": "env", "values": ["prod"]}),
    "ip-lists": ({"name": "corp", "include": ["10.70.0.0/16", "fd70::/64"], "exclude": ["10.70.0.1"]},
                 {"name": "corp", "include": ["192.0.2.0/24"]}),
    "services": ({"name": "web", "ports": ["80/tcp", "8000-8080/tcp", "icmp:8"]},
                 {"name": "web", "ports": ["443/tcp"]}),
    "rulesets": (
        {"name": "shop", "scope": [{"labels": {"app": "shop"}}],
         "rules": [{"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
                    "services": ["any"]}]},
        {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": []},
    ),
    "deny-rules": (
        {"name": "no-any", "consumers": [{"all": True}], "providers": [{"labels": {"role": "db"}}],
         "services": ["any"], "override": True},
        {"name": "no-any", "consumers": [{"all": True}], "providers": [{"all": True}], "services": ["any"]},
    ),
    "failsafe": ({"name": "default", "controller": ["10.9.9.9"], "controller_port": 9443},
                 {"name": "default", "management": ["22/tcp", "2222/tcp"]}),
}


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_crud_every_kind(api: Api, path: str) -> None:
    body, replacement = SAMPLES[path]
    name = body["name"]
    created = api.req("POST", f"/{path}", json=body)
    assert created.status_code == 201, created.text
    etag = created.headers["ETag"]
    assert created.json()["revision"] == 1 and created.json()["etag"] == etag

    got = api.ok("GET", f"/{path}/{name}")
    assert got["body"]["name"] == name
    listed = api.ok("GET", f"/{path}")
    assert name in [o["name"] for o in listed["items"]]

    assert api.req("POST", f"/{path}", json=body).status_code == 409  # duplicate

    put = api.req("PUT", f"/{path}/{name}", json=replacement, headers={**api.owner, "If-Match": etag})
    assert put.status_code == 200, put.text
    assert put.json()["revision"] == 2 and put.headers["ETag"] != etag
    # the old ETag is stale now
    stale = api.req("PUT", f"/{path}/{name}", json=body, headers={**api.owner, "If-Match": etag})
    assert stale.status_code == 412
    assert api.req("DELETE", f"/{path}/{name}", headers={**api.owner, "If-Match": etag}).status_code == 412

    fresh = {**api.owner, "If-Match": put.headers["ETag"]}
    assert api.req("DELETE", f"/{path}/{name}", headers=fresh).status_code == 204
    assert api.req("GET", f"/{path}/{name}").status_code == 404
    events = api.ok("GET", "/events", params={"name": name})["items"]
    actions = [e["action"] for e in events]
    kind = path.rstrip("s").replace("-", "_") if path != "failsafe" else "failsafe"
    assert any(a.endswith(".create") for a in actions) and any(a.endswith(".delete") for a in actions), (kind, actions)
    update = next(e for e in events if e["action"].endswith(".update"))
    assert update["before"] is not None and update["after"] is not None


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("workloads", {"name": "bad name!"}, "name"),
    ("workloads", {"name": "w", "labels": {"nokey": "x"}}, "labels.nokey"),
    ("workloads", {"name": "w", "interfaces": [{"name": "eth0", "addresses": ["10.0.0.300"]}]},
     "interfaces[0].addresses[0]"),
    ("workloads", {"name": "w", "mode": "bogus"}, "mode"),
    ("workloads", {"name": "w", "colour": "red"}, "colour"),
    ("services", {"name": "s", "ports": ["99999/tcp"]}, "ports[0]"),
    ("services", {"name": "s", "ports": []}, "ports"),
    ("ip-lists", {"name": "i", "include": ["not-a-cidr"]}, "include[0]"),
    ("rulesets", {"name": "r", "scope": "all",
                  "rules": [{"consumers": [{}], "providers": [{"all": True}], "services": ["any"]}]},
     "rules[0].consumers[0]"),
    ("rulesets", {"name": "r", "scope": "all", "rules": [{"consumers": [{"all": True}], "providers": [{"all": True}],
                                         "services": ["nosuch"]}]}, "services"),
    ("rulesets", {"name": "r", "scope": [{"ip_list": "x"}]}, "scope[0]"),
    ("label-groups", {"name": "g", "key": "nokey", "values": ["a"]}, "LabelGroup g"),
]


@pytest.mark.parametrize(("path", "body", "field"), INVALID)
def test_validation_errors_are_422_with_field(api: Api, path: str, body: dict[str, Any], field: str) -> None:
    r = api.req("POST", f"/{path}", json=body)
    assert r.status_code == 422, r.text
    issues = r.json()["issues"]
    assert issues, r.json()
    assert any(field in i["field"] or field in i["message"] for i in issues), issues


def test_malformed_json_and_wrong_types_are_4xx(sqlite_api: Api) -> None:
    api = sqlite_api
    r = api.req("POST", "/workloads", content=b"{not json", headers={**api.owner, "Content-Type": "application/json"})
    assert r.status_code == 422
    assert api.req("POST", "/workloads", json=["a list"]).status_code == 422
    assert api.req("GET", "/workloads", params={"limit": "0"}).status_code == 422
    assert api.req("GET", "/workloads", params={"cursor": "%%%"}).status_code == 422
    assert api.req("GET", "/workloads", params={"labels": "novalue"}).status_code == 422
    assert api.req("GET", "/rulesets", params={"version": "latest"}).status_code == 422


def test_referenced_objects_cannot_be_deleted(api: Api) -> None:
    api.ok("POST", "/services", 201, json={"name": "web", "ports": ["80/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "r", "scope": "all", "rules": [
        {"consumers": [{"all": True}], "providers": [{"all": True}], "services": ["web"]}]})
    r = api.req("DELETE", "/services/web")
    assert r.status_code == 409 and "web" in r.json()["message"]
    api.ok("POST", "/workloads", 201, json={"name": "w", "labels": {"env": "prod"}})
    assert api.req("DELETE", "/label-keys/env").status_code == 409
    # narrowing allowed values below what workloads use is refused too
    assert api.req("PUT", "/label-keys/env", json={"name": "env", "values": ["dev"]}).status_code == 409


def test_addresses_belong_to_one_workload(api: Api) -> None:
    api.ok("POST", "/workloads", 201, json={"name": "a", "interfaces": [{"name": "eth0", "addresses": ["10.1.1.1"]}]})
    r = api.req("POST", "/workloads", json={"name": "b", "interfaces": [{"name": "eth0", "addresses": ["10.1.1.1"]}]})
    assert r.status_code == 409 and "10.1.1.1" in r.json()["message"]
    assert api.req("GET", "/workloads/b").status_code == 404  # nothing half-written


def test_pagination_and_filters(api: Api) -> None:
    for i in range(7):
        env = "prod" if i % 2 else "dev"
        api.ok("POST", "/workloads", 201, json={"name": f"host-{i}", "labels": {"env": env, "app": "shop"}})
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.ok("GET", "/workloads", params=params)
        seen += [o["name"] for o in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [f"host-{i}" for i in range(7)] and pages == 3
    prod = api.ok("GET", "/workloads", params={"labels": "env=prod,app=shop"})["items"]
    assert [o["name"] for o in prod] == ["host-1", "host-3", "host-5"]
    by_name = api.ok("GET", "/workloads", params={"name": "-4"})["items"]
    assert [o["name"] for o in by_name] == ["host-4"]


def test_enforcement_mode_switch(api: Api) -> None:
    api.ok("POST", "/workloads", 201, json={"name": "w", "labels": {"app": "a"}})
    out = api.ok("PUT", "/workloads/w/mode", json={"mode": "full"})
    assert out["body"]["mode"] == "full" and out["revision"] == 2
    hp = api.ok("GET", "/workloads/w/host-policy")
    assert hp["policy"]["mode"] == "full"
    assert api.req("PUT", "/workloads/w/mode", json={"mode": "nope"}).status_code == 422


def test_concurrent_creates_of_one_name_never_500(api: Api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(i: int) -> int:
        body = {"name": "raced", "interfaces": [{"name": "eth0", "addresses": [f"10.77.0.{i}"]}]}
        return int(api.req("POST", "/workloads", json=body).status_code)

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(create, range(1, 17)))
    assert codes.count(201) == 1 and set(codes) <= {201, 409}, codes


# ---- one codec with the policy files (issue 13.1; issue 12 items 10 and 12) ----------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "w", "interfaces": [{"name": "eth0@if12", "addresses": ["10.0.0.1"]}]}, "interfaces[0].name"),
        ({"name": "w", "interfaces": [{"name": "eth0", "addresses": ["0.0.0.0"]}]}, "interfaces[0].addresses[0]"),
        ({"name": "w", "interfaces": [{"name": "eth0", "addresses": ["::"]}]}, "interfaces[0].addresses[0]"),
        ({"name": "w", "interfaces": [{"name": "eth0", "addresses": ["255.255.255.255"]}]},
         "interfaces[0].addresses[0]"),
        ({"name": "w", "interfaces": [{"name": "eth0", "addresses": ["ff02::1"]}]}, "interfaces[0].addresses[0]"),
    ],
)
def test_workload_bodies_the_export_could_not_reimport_are_refused(api: Api, body: dict[str, Any],
                                                                   field: str) -> None:
    r = api.req("POST", "/workloads", json=body)
    assert r.status_code == 422, r.text
    assert [i["field"] for i in r.json()["issues"]] == [field]


def test_exclude_only_selector_and_named_icmp_types_round_trip_through_yaml(api: Api) -> None:
    """`stockade check` accepted an exclude-only selector that `PUT /policy/draft` refused: now both accept it."""
    api.ok("POST", "/services", 201, json={"name": "ping", "ports": ["icmp:echo-request", "icmpv6:echo-request"]})
    api.ok("POST", "/rulesets", 201, json={
        "name": "not-web", "scope": [{"exclude": {"role": "web"}}],
        "rules": [{"consumers": "all", "providers": [{"exclude": {"role": ["web", "db"]}}], "services": ["ping"]}]})
    assert api.ok("GET", "/services/ping")["body"]["ports"] == ["icmp:8", "icmpv6:128"]
    exported = api.req("GET", "/policy/draft")
    assert exported.status_code == 200
    headers = {**api.owner, "Content-Type": "application/yaml"}
    again = api.req("PUT", "/policy/draft", content=exported.content, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["draft_changes"] == []


def test_a_ruleset_must_state_its_scope(api: Api) -> None:
    r = api.req("POST", "/rulesets", json={"name": "r", "rules": []})
    assert r.status_code == 422
    assert [i["field"] for i in r.json()["issues"]] == ["scope"]
    api.ok("POST", "/rulesets", 201, json={"name": "r", "scope": "all", "rules": []})
    assert api.ok("GET", "/rulesets/r")["body"]["scope"] == "all"
