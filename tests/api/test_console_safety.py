"""Issue 14, API side of the console's safety items.

* A ruleset's scope is never "every workload" by omission: an empty list or a missing scope is a
  422 on ``scope``; only the explicit ``"all"`` governs every workload, and it reads back as ``"all"``.
  Rulesets stored before the explicit form (``scope: []``) still load.
* Adding an allowed value to a label key (``PUT /label-keys/{name}``) is for owners and admins:
  a ruleset-manager or a read-only user gets 403 and the key is unchanged.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from tests.api.conftest import Api
from tests.api.test_flows import agent_for, load_estate, rec, upload

from stockade.controller.storage import store
from stockade.controller.storage.db import ObjectRow

RULE = {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["any"]}


def _issue_fields(r: Any) -> list[str]:
    return [i["field"] for i in r.json()["issues"]]


def test_empty_or_missing_scope_is_refused_only_all_means_every_workload(api: Api) -> None:
    r = api.req("POST", "/rulesets", json={"name": "billing", "scope": [], "rules": [RULE]})
    assert r.status_code == 422, r.text
    assert _issue_fields(r) == ["scope"]
    assert 'write "all"' in r.json()["issues"][0]["message"]
    r = api.req("POST", "/rulesets", json={"name": "billing", "rules": [RULE]})
    assert r.status_code == 422 and _issue_fields(r) == ["scope"], r.text
    assert api.req("GET", "/rulesets/billing").status_code == 404  # nothing stored

    created = api.ok("POST", "/rulesets", 201, json={"name": "billing", "scope": "all", "rules": [RULE]})
    assert created["body"]["scope"] == "all"
    # what GET answers can be PUT back unchanged
    got = api.ok("GET", "/rulesets/billing")
    api.ok("PUT", "/rulesets/billing", json=got["body"])
    r = api.req("PUT", "/rulesets/billing", json={**got["body"], "scope": []})
    assert r.status_code == 422 and _issue_fields(r) == ["scope"], r.text


def test_a_ruleset_stored_with_the_old_empty_scope_still_loads(api: Api) -> None:
    api.ok("POST", "/rulesets", 201, json={"name": "old", "scope": "all", "rules": [RULE]})
    with api.ctl.sessions.begin() as db:  # as an older controller stored it
        assert store.get_object(db, "ruleset", "old", None).body["scope"] == "all"
        obj = db.scalars(select(ObjectRow).where(ObjectRow.kind == "ruleset", ObjectRow.name == "old")).one()
        obj.body = {**obj.body, "scope": []}
    diff = api.ok("GET", "/policy/diff", params={"base": "active", "target": "draft"})
    assert [c["name"] for c in diff["changes"]] == ["old"]
    api.ok("POST", "/policy/provision", 201, json={"message": "legacy body"}, params={"proceed": "true"})


def test_adding_an_allowed_value_is_authorised_by_role(api: Api) -> None:
    api.ok("PUT", "/label-keys/app", json={"name": "app", "values": ["shop"]})
    etag_body = api.ok("GET", "/label-keys/app")["body"]
    wanted = {**etag_body, "values": ["billing", "shop"]}
    for role, scope in (("read-only", None), ("ruleset-manager", ["app=shop"])):
        r = api.req("PUT", "/label-keys/app", json=wanted, headers=api.key(role, scope))
        assert r.status_code == 403, (role, r.text)
        assert api.ok("GET", "/label-keys/app")["body"]["values"] == ["shop"]
    admin = api.key("admin")
    r = api.req("PUT", "/label-keys/app", json=wanted, headers=admin)
    assert r.status_code == 200, r.text
    assert api.ok("GET", "/label-keys/app")["body"]["values"] == ["billing", "shop"]
    # and a workload may now carry it
    api.ok("POST", "/workloads", 201, json={"name": "billing-web-1", "labels": {"app": "billing", "role": "web"}})


def test_the_impact_guard_looks_both_ways(api: Api) -> None:
    """The issue's scenario: a new ruleset with every workload as its scope opens web -> db 5432."""
    load_estate(api)
    web = agent_for(api, "web-prod-1")
    upload(api, web, [rec("10.70.0.11", "10.70.0.31", 5432, "out", "blocked", rule="default", count=3)])
    api.ok("POST", "/rulesets", 201, json={"name": "billing-prod", "scope": "all", "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
         "services": ["postgres"]}]})
    imp = api.ok("GET", "/policy/impact")
    assert imp["newly_allowed"] == 1 and imp["newly_blocked"] == 0
    assert [i["sentence"] for i in imp["items"]] == [
        "web-prod-1 -> db-prod-1 5432/tcp becomes allowed by ruleset billing-prod rule 1"]
    [w] = imp["widened"]
    assert (w["ruleset"], w["rule"], w["rule_id"], w["every_workload"], w["needs_confirmation"]) == \
        ("billing-prod", 1, "ruleset/billing-prod/0", True, True)
    assert "db-prod-1" in w["added"] and "web-prod-1" in w["added"]
    refused = api.req("POST", "/policy/provision", json={"message": "billing"})
    assert refused.status_code == 409, refused.text
    message = refused.json()["message"]
    assert "newly allow 1 recorded connection" in message
    assert "ruleset billing-prod rule 1 is new and reaches" in message and "every app and environment" in message
    assert "proceed" not in message and "/api/" not in message  # human terms: each client says how to confirm

    # confined to its own (empty) app: nothing widens, nothing to confirm
    api.ok("PUT", "/rulesets/billing-prod", json={"name": "billing-prod", "scope": [{"labels": {"app": "shop",
           "env": "test"}}], "rules": [{"consumers": [{"labels": {"role": "web"}}],
                                      "providers": [{"labels": {"role": "db"}}], "services": ["postgres"]}]})
    assert api.ok("GET", "/policy/impact")["confirm"] == []
    api.ok("POST", "/policy/provision", 201, json={"message": "billing, confined"})

    # an existing rule reaching more workloads (the scope loses env=prod) needs confirmation even
    # without a recorded flow; removing a rule above another is not mistaken for a widening
    rs = api.ok("GET", "/rulesets/shop-prod")["body"]
    api.ok("PUT", "/rulesets/shop-prod", json={**rs, "rules": rs["rules"][1:]})
    assert api.ok("GET", "/policy/impact")["widened"] == []
    api.ok("PUT", "/rulesets/shop-prod", json={**rs, "scope": [{"labels": {"app": "shop"}}]})
    imp = api.ok("GET", "/policy/impact")
    texts = [w["sentence"] for w in imp["widened"] if w["needs_confirmation"]]
    assert any(t.startswith("ruleset shop-prod rule 3 now reaches") and "db-dev-1" in t for t in texts), texts
    refused = api.req("POST", "/policy/provision", json={"message": "wider"})
    assert refused.status_code == 409 and "ruleset shop-prod rule 3 now reaches" in refused.json()["message"]
    api.ok("POST", "/policy/provision", 201, json={"message": "wider"}, params={"proceed": "true"})
