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
