"""Draft -> provision -> versions, rollback, diff, YAML import/export and crash injection."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from tests.api.conftest import Api, make_settings

from stockade.controller.app import build_controller
from stockade.controller.services import versions
from stockade.controller.storage import store

WEB_DB = [
    ("POST", "/services", {"name": "pg", "ports": ["5432/tcp"]}),
    ("POST", "/workloads", {"name": "web", "labels": {"app": "shop", "role": "web"}, "mode": "full",
                            "interfaces": [{"name": "eth0", "addresses": ["10.0.0.1"]}]}),
    ("POST", "/workloads", {"name": "db", "labels": {"app": "shop", "role": "db"}, "mode": "full",
                            "interfaces": [{"name": "eth0", "addresses": ["10.0.0.2"]}]}),
    ("POST", "/workloads", {"name": "other", "labels": {"app": "crm", "role": "db"},
                            "interfaces": [{"name": "eth0", "addresses": ["10.0.9.9"]}]}),
    ("POST", "/rulesets", {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
         "services": ["pg"]}]}),
]


def seed(api: Api) -> None:
    for method, path, body in WEB_DB:
        api.ok(method, path, 201, json=body)


def rule_ids(api: Api, workload: str) -> list[str]:
    return [r["rule_id"] for r in api.ok("GET", f"/workloads/{workload}/host-policy")["policy"]["rules"]]


def test_provision_rollback_diff(api: Api) -> None:
    seed(api)
    assert not any(r.startswith("ruleset/") for r in rule_ids(api, "db"))  # draft is not in force
    diff = api.ok("GET", "/policy/diff")["changes"]
    assert {(c["kind"], c["name"], c["change"]) for c in diff} == {("service", "pg", "added"),
                                                                     ("ruleset", "shop", "added")}
    v1 = api.ok("POST", "/policy/provision", 201, json={"message": "first"})
    assert v1["number"] == 1 and v1["author"].startswith("key:")
    assert set(v1["affected_workloads"]) == {"web", "db"}  # "other" is untouched
    assert any(r.startswith("ruleset/shop") for r in rule_ids(api, "db"))
    assert api.req("POST", "/policy/provision", json={"message": "again"}).status_code == 409  # nothing changed

    # v2 removes the rule; read v1 content by version
    api.ok("PUT", "/rulesets/shop", json={"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": []})
    v2 = api.ok("POST", "/policy/provision", 201, json={"message": "drop rule"})
    assert v2["diff"][0]["change"] == "modified" and v2["diff"][0]["fields"] == ["rules"]
    assert not any(r.startswith("ruleset/shop") for r in rule_ids(api, "db"))
    old = api.ok("GET", "/rulesets/shop", params={"version": "1"})
    assert old["body"]["rules"], old
    assert api.ok("GET", "/rulesets/shop", params={"version": "active"})["body"]["rules"] == []
    between = api.ok("GET", "/policy/diff", params={"base": "1", "target": "2"})["changes"]
    assert [(c["kind"], c["change"]) for c in between] == [("ruleset", "modified")]

    # rollback to 1 provisions its content as 3 and resets the draft
    v3 = api.ok("POST", "/policy/rollback", 201, json={"version": 1})
    assert v3["number"] == 3 and v3["rollback_of"] == 1
    assert any(r.startswith("ruleset/shop") for r in rule_ids(api, "db"))
    assert api.ok("GET", "/rulesets/shop")["body"]["rules"]  # draft back to v1's content
    assert api.ok("GET", "/policy/diff", params={"base": "1", "target": "3"})["changes"] == []
    listed = api.ok("GET", "/policy/versions", params={"limit": 2})
    assert [v["number"] for v in listed["items"]] == [3, 2] and listed["next_cursor"] == "2"
    rest = api.ok("GET", "/policy/versions", params={"limit": 2, "cursor": listed["next_cursor"]})
    assert [v["number"] for v in rest["items"]] == [1]
    assert api.req("POST", "/policy/rollback", json={"version": 99}).status_code == 404
    assert api.req("GET", "/policy/versions/99").status_code == 404


def test_crash_before_commit_leaves_previous_version(api: Api) -> None:
    seed(api)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    dist = api.ctl.dist
    before_rev = dict(dist.revisions)
    before_rules = rule_ids(api, "db")
    api.ok("DELETE", "/rulesets/shop", 204)

    def crash(point: str) -> None:
        raise RuntimeError(f"injected crash at {point}")

    dist.fault_hook = crash
    with pytest.raises(RuntimeError):
        versions.provision(dist, "tester", "doomed")
    dist.fault_hook = None
    assert [v["number"] for v in api.ok("GET", "/policy/versions")["items"]] == [1]
    assert dist.revisions == before_rev
    assert rule_ids(api, "db") == before_rules  # compiler reverted
    assert api.req("GET", "/rulesets/shop").status_code == 404  # draft untouched
    v2 = api.ok("POST", "/policy/provision", 201, json={"message": "v2"})
    assert v2["number"] == 2


CRASHER = textwrap.dedent(
    """
    import os, sys
    from stockade.controller.storage import store
    from stockade.controller.services import versions
    from stockade.controller.app import build_controller
    from tests.api.conftest import make_settings
    ctl = build_controller(make_settings(sys.argv[1]))
    def die(point):
        os._exit(17)
    ctl.dist.fault_hook = die
    versions.provision(ctl.dist, "crasher", "never committed")
    """
)


def test_process_killed_mid_provision(database_url: str) -> None:
    ctl = build_controller(make_settings(database_url))
    with ctl.sessions.begin() as db:
        store.create_object(db, "service", {"name": "pg", "ports": ["5432/tcp"]}, "t")
    versions.provision(ctl.dist, "t", "v1")
    with ctl.sessions.begin() as db:
        store.delete_object(db, "service", "pg", "t")
    ctl.engine.dispose()
    proc = subprocess.run([sys.executable, "-c", CRASHER, database_url], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 17, proc.stderr
    again = build_controller(make_settings(database_url))
    with again.session() as db:
        rows = versions.list_versions(db, None, 10)
        assert [r.number for r in rows] == [1]
        assert "pg" in store.version_content(db, "active")["service"]
        assert "pg" not in store.draft_objects(db)["service"]
    again.engine.dispose()


YAML = """
apiVersion: stockade.io/v1
kind: Service
name: https
ports: [443/tcp]
---
apiVersion: stockade.io/v1
kind: Workload
name: edge
labels: {role: web, app: shop}
interfaces: [{name: eth0, addresses: [10.5.0.1]}]
---
apiVersion: stockade.io/v1
kind: Ruleset
name: shop
scope: [{labels: {app: shop}}]
rules:
  - consumers: all
    providers: [{labels: {role: web}}]
    services: [https]
"""


def test_yaml_import_export_roundtrip(api: Api) -> None:
    hdr = {**api.owner, "Content-Type": "application/yaml"}
    dry = api.ok("PUT", "/policy/draft", params={"dry_run": "true"}, content=YAML, headers=hdr)
    assert {(c["kind"], c["name"]) for c in dry["draft_changes"]} == {("service", "https"), ("ruleset", "shop")}
    assert [c["name"] for c in dry["inventory_changes"]] == ["edge"]
    assert api.req("GET", "/services/https").status_code == 404  # dry run wrote nothing
    api.ok("PUT", "/policy/draft", content=YAML, headers=hdr)
    assert api.ok("GET", "/services/https")["body"]["ports"] == ["443/tcp"]
    assert api.ok("GET", "/workloads/edge")["body"]["labels"] == {"app": "shop", "role": "web"}
    exported = api.req("GET", "/policy/draft").text
    assert "kind: Ruleset" in exported and "name: edge" in exported
    # re-importing the export is a no-op
    again = api.ok("PUT", "/policy/draft", params={"dry_run": "true"}, content=exported, headers=hdr)
    assert again["draft_changes"] == [] and again["inventory_changes"] == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("kind: [", "api"),
        ("apiVersion: stockade.io/v1\nkind: Service\nname: s\nports: [99999/tcp]\n", "ports"),
        ("apiVersion: stockade.io/v1\nkind: Ruleset\nname: r\nscope: all\nrules:\n"
         "  - {consumers: all, providers: all, services: [nosuch]}\n", "nosuch"),
    ],
)
def test_yaml_import_errors_are_422(sqlite_api: Api, text: str, needle: str) -> None:
    r = sqlite_api.req("PUT", "/policy/draft", content=text,
                       headers={**sqlite_api.owner, "Content-Type": "application/yaml"})
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_invalid_bytes_are_422(sqlite_api: Api) -> None:
    r = sqlite_api.req("PUT", "/policy/draft", content=b"\xff\xfe\x00",
                       headers={**sqlite_api.owner, "Content-Type": "application/yaml"})
    assert r.status_code == 422


