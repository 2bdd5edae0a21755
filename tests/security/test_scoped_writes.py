"""Issue 12 item 3: a label-scoped principal cannot change policy outside its scope, on any write path.

The rule is checked on compiled effect (:mod:`stockade.controller.services.scope`): a write by a
principal scoped to ``app=ops`` is refused (403, naming one affected workload outside the scope)
when it would change the HostPolicy of a workload outside ``app=ops``, and leaves the draft (and
the inventory, and the active version) unchanged. For every write route a scoped principal can
reach, one write that stays inside is accepted and writes that reach outside are refused.
Runs on SQLite and PostgreSQL (the ``api`` fixture of ``tests/api/conftest.py``).

The example estate is the shop (``app=shop``, prod and dev) plus ``mon-1`` (``app=ops``, role
monitoring); ``ops-db-1`` (``app=ops``, role db) is added here, so the ops scope holds two hosts.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from fastapi.routing import APIRoute

from stockade.compiler import Compiler
from stockade.controller.api.flows import active_policy
from stockade.controller.services import codec
from stockade.controller.services.auth import Permission
from stockade.controller.services.scope import (
    SCOPE_CHECKED_ROUTES,
    changed_objects,
    fast_path_applies,
    first_rule_change,
)
from stockade.model.labels import Label
from stockade.model.rules import AllowRule, ConsumerScope, Ruleset
from stockade.model.selectors import ALL_WORKLOADS, IPListSelector, LabelSelector, Selector
from stockade.model.workloads import Workload
from stockade.paths import example_estate
from stockade.policyfile import load_documents
from tests.api.conftest import Api

YAML = {"Content-Type": "application/yaml"}
SHOP = {"web-prod-1", "web-prod-2", "app-prod-1", "db-prod-1", "web-dev-1", "app-dev-1", "db-dev-1"}
OPS_DB: dict[str, Any] = {"name": "ops-db-1", "labels": {"role": "db", "app": "ops", "env": "prod", "loc": "lab"},
          "interfaces": [{"name": "eth0", "addresses": ["10.70.0.61", "fd70::61"]}], "mode": "full"}


def estate_yaml() -> str:
    return "\n---\n".join(p.read_text() for p in sorted(example_estate().glob("*.yaml")))


def ruleset(name: str, *rules: dict[str, Any], scope: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "scope": [scope or {"labels": {"app": "ops"}}], "rules": list(rules)}


def rule(consumers: list[Any], providers: list[Any], services: list[str], glob: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"consumers": consumers, "providers": providers, "services": services}
    if glob:
        out["consumers_scope"] = "global"
    return out


class Estate:
    """The provisioned example estate plus ops-db-1, an ops manager and a scoped admin."""

    def __init__(self, client: Api) -> None:
        self.api = client
        client.ok("PUT", "/policy/draft", content=estate_yaml(), headers={**client.owner, **YAML})
        client.ok("POST", "/workloads", 201, json=OPS_DB)
        client.ok("POST", "/policy/provision", 201, json={"message": "the example estate"})
        self.mgr = client.key("ruleset-manager", ["app=ops"])
        self.admin = client.key("admin", ["app=ops"])  # a scoped admin reaches every WRITE route

    def state(self) -> tuple[str, Any, Any]:
        """Draft (with inventory) as YAML, the active version number and the compiled revisions."""
        draft = self.api.client.get("/api/v1/policy/draft", headers=self.api.owner).text
        versions = self.api.ok("GET", "/policy/versions")["items"][0]["number"]
        return draft, versions, dict(self.api.ctl.dist.revisions)

    def refused(self, method: str, path: str, who: dict[str, str], outside_now: bool = True, **kw: Any) -> str:
        """Assert the write is refused for its effect outside the scope and changed nothing; returns
        the workload the refusal names (outside the scope now, unless the write would move it out)."""
        before = self.state()
        r = self.api.req(method, path, headers=who, **kw)
        assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text}"
        message: str = r.json()["message"]
        assert "outside your scope (app=ops)" in message, message
        named = message.split("policy of workload '", 1)[1].split("'", 1)[0]
        if outside_now:
            labels = self.api.ok("GET", f"/workloads/{named}")["body"]["labels"]
            assert labels.get("app") != "ops", f"{message}: {named} is inside the scope"
        assert self.state() == before, "a refused write changed the draft, the inventory or the active version"
        return named

    def accepted(self, method: str, path: str, who: dict[str, str], status: int = 200, **kw: Any) -> Any:
        r = self.api.req(method, path, headers=who, **kw)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None


@pytest.fixture
def estate(api: Api) -> Estate:
    return Estate(api)


def host_rules(client: Api, workload: str) -> set[str]:
    hp = client.ok("GET", f"/workloads/{workload}/host-policy")["policy"]
    return {r["rule_id"] for r in hp["rules"]}


# ---- the attack from the issue ------------------------------------------------------------------


def test_issue_12_ops_manager_cannot_open_shop_to_anywhere(estate: Estate) -> None:
    """Regression: an app=ops ruleset-manager wrote a ruleset giving `all` (global consumers) an
    outbound allow to 0.0.0.0/0; after provisioning web-prod-1 (app=shop) had the rule."""
    attack = ruleset("ops-egress", rule([{"all": True}], [{"ip_list": "anywhere"}], ["any"], glob=True))
    named = estate.refused("POST", "/rulesets", estate.mgr, json=attack)
    assert named in SHOP
    assert estate.api.req("GET", "/rulesets/ops-egress").status_code == 404
    # nothing reached the draft, so provisioning has nothing to do and web-prod-1 is untouched
    assert estate.api.req("POST", "/policy/provision", json={"message": "m"}).status_code == 409
    assert not any(r.startswith("ruleset/ops-egress") for r in host_rules(estate.api, "web-prod-1"))
    # the same rule confined to the scope is the manager's to write
    inside = ruleset("ops-egress", rule([{"all": True}], [{"ip_list": "anywhere"}], ["any"]))
    estate.accepted("POST", "/rulesets", estate.mgr, 201, json=inside)


# ---- ruleset create / replace / delete (ruleset-manager and scoped admin) ------------------------

INSIDE_RULES = [
    rule([{"labels": {"role": "monitoring"}}], [{"labels": {"role": "db"}}], ["postgres"]),
    rule([{"ip_list": "office"}], [{"labels": {"role": "db"}}], ["postgres"], glob=True),  # IP-list consumers
    rule([{"labels": {"role": "monitoring"}}], [{"ip_list": "anywhere"}], ["https"]),  # intra outbound to IPs
    rule([{"labels": {"role": "monitoring"}}], [{"labels": {"role": "db"}}], ["ping"], glob=True),  # only ops match
]
OUTSIDE_RULES = {
    "global-all": rule([{"all": True}], [{"labels": {"role": "db"}}], ["postgres"], glob=True),
    "global-shop": rule([{"labels": {"app": "shop"}}], [{"labels": {"role": "db"}}], ["postgres"], glob=True),
    "global-shop-to-ips": rule([{"labels": {"app": "shop"}}], [{"ip_list": "anywhere"}], ["https"], glob=True),
    "label-group": rule([{"label_groups": ["non-prod"]}], [{"labels": {"role": "db"}}], ["postgres"], glob=True),
    "excluded-role": rule([{"labels": {"env": "prod"}, "exclude": {"role": "db"}}], [{"labels": {"role": "db"}}],
                          ["postgres"], glob=True),
}


@pytest.mark.parametrize("who", ["mgr", "admin"])
def test_ruleset_writes_inside_accepted_outside_refused(estate: Estate, who: str) -> None:
    cred = getattr(estate, who)
    for i, r in enumerate(INSIDE_RULES):
        estate.accepted("POST", "/rulesets", cred, 201, json=ruleset(f"in-{i}", r))
    for name, r in OUTSIDE_RULES.items():
        assert estate.refused("POST", "/rulesets", cred, json=ruleset(f"out-{name}", r)) in SHOP, name
        # replacing an accepted in-scope ruleset with it: refused, the old body stays
        old = estate.api.ok("GET", "/rulesets/in-0")["body"]
        estate.refused("PUT", "/rulesets/in-0", cred, json=ruleset("in-0", INSIDE_RULES[0], r))
        assert estate.api.ok("GET", "/rulesets/in-0")["body"] == old
    estate.accepted("PUT", "/rulesets/in-0", cred, json=ruleset("in-0", INSIDE_RULES[0], INSIDE_RULES[2]))
    estate.accepted("DELETE", "/rulesets/in-1", cred, 204)


def test_deleting_or_editing_a_ruleset_that_reaches_outside_is_refused(estate: Estate) -> None:
    # an unscoped admin wrote an ops ruleset that lets the shop in (ownership: it lies in app=ops)
    shop_in = ruleset("ops-from-shop", rule([{"labels": {"app": "shop", "role": "app"}}],
                                            [{"labels": {"role": "db"}}], ["postgres"], glob=True))
    estate.api.ok("POST", "/rulesets", 201, json=shop_in)
    assert estate.refused("DELETE", "/rulesets/ops-from-shop", estate.mgr) in {"app-prod-1", "app-dev-1"}
    edited = {**shop_in, "rules": [{**shop_in["rules"][0], "services": ["https"]}]}
    estate.refused("PUT", "/rulesets/ops-from-shop", estate.mgr, json=edited)
    # changing only what the providers (inside) see is fine: a description, an added in-scope rule
    estate.accepted("PUT", "/rulesets/ops-from-shop", estate.mgr,
                    json={**shop_in, "rules": [*shop_in["rules"], INSIDE_RULES[0]]})


def test_extra_scope_consumer_relabelled_out_of_scope(estate: Estate) -> None:
    """A global rule whose consumers matched only ops hosts when written reaches the shop after
    mon-1 is relabelled app=shop: from then on the manager may not change or delete it."""
    mon = ruleset("ops-mon", rule([{"labels": {"role": "monitoring"}}], [{"labels": {"role": "db"}}],
                                  ["postgres"], glob=True))
    estate.accepted("POST", "/rulesets", estate.mgr, 201, json=mon)
    body = estate.api.ok("GET", "/workloads/mon-1")["body"]
    estate.api.ok("PUT", "/workloads/mon-1", json={**body, "labels": {**body["labels"], "app": "shop"}})
    edited = {**mon, "rules": [{**mon["rules"][0], "services": ["https"]}]}
    assert estate.refused("PUT", "/rulesets/ops-mon", estate.mgr, json=edited) == "mon-1"
    assert estate.refused("DELETE", "/rulesets/ops-mon", estate.mgr) == "mon-1"


# ---- the other policy kinds (a scoped admin can write them; a ruleset-manager cannot) -----------


def test_deny_rules(estate: Estate) -> None:
    assert estate.api.req("POST", "/deny-rules", headers=estate.mgr, json={}).status_code == 403  # by role
    inside = {"name": "ops-no-smb-out", "consumers": [{"labels": {"app": "ops"}}],
              "providers": [{"ip_list": "anywhere"}], "services": ["smb"]}
    estate.accepted("POST", "/deny-rules", estate.admin, 201, json=inside)
    everyone = {**inside, "name": "all-no-smb-out", "consumers": [{"all": True}]}
    assert estate.refused("POST", "/deny-rules", estate.admin, json=everyone) in SHOP
    prod_in = {**inside, "name": "prod-in", "consumers": [{"ip_list": "anywhere"}],
               "providers": [{"labels": {"env": "prod"}}]}
    estate.refused("POST", "/deny-rules", estate.admin, json=prod_in)
    estate.refused("PUT", "/deny-rules/ops-no-smb-out", estate.admin, json={**inside, "consumers": [{"all": True}]})
    estate.refused("DELETE", "/deny-rules/no-smb", estate.admin)
    estate.accepted("DELETE", "/deny-rules/ops-no-smb-out", estate.admin, 204)


def test_services_ip_lists_label_groups_failsafe(estate: Estate) -> None:
    a = estate.admin
    # new objects change nothing until an (in-scope) rule uses them
    estate.accepted("POST", "/services", a, 201, json={"name": "ops-metrics", "ports": ["9090/tcp"]})
    estate.accepted("POST", "/ip-lists", a, 201, json={"name": "ops-net", "include": ["192.0.2.0/24"]})
    estate.accepted("POST", "/label-groups", a, 201, json={"name": "ops-tiers", "key": "role", "values": ["db"]})
    estate.accepted("POST", "/rulesets", estate.mgr, 201,
                    json=ruleset("ops-metrics", rule([{"ip_list": "ops-net"}], [{"label_groups": ["ops-tiers"]}],
                                                     ["ops-metrics"], glob=True)))
    estate.accepted("PUT", "/services/ops-metrics", a, json={"name": "ops-metrics", "ports": ["9091/tcp"]})
    estate.accepted("PUT", "/ip-lists/ops-net", a, json={"name": "ops-net", "include": ["192.0.2.0/25"]})
    # a stored service named "any" replaces the built-in one every `any` rule means
    assert estate.refused("POST", "/services", a, json={"name": "any", "ports": ["1/tcp"]}) in SHOP
    # objects the shop's rules use
    assert estate.refused("PUT", "/services/postgres", a, json={"name": "postgres", "ports": ["5433/tcp"]}) in SHOP
    estate.refused("PUT", "/ip-lists/office", a, json={"name": "office", "include": ["10.70.0.0/24"]})
    estate.refused("PUT", "/label-groups/non-prod", a,
                   json={"name": "non-prod", "key": "env", "values": ["dev", "test", "prod"]})
    # judged by effect: no workload is env=test, so narrowing the group changes no host
    estate.accepted("PUT", "/label-groups/non-prod", a, json={"name": "non-prod", "key": "env", "values": ["dev"]})
    failsafe = estate.api.ok("GET", "/failsafe/default")["body"]
    estate.refused("PUT", "/failsafe/default", a, json={**failsafe, "management": ["22/tcp", "2222/tcp"]})
    estate.accepted("PUT", "/failsafe/default", a, json=failsafe)  # unchanged


# ---- inventory: workloads, modes, label keys (take effect at once) --------------------------------


def test_workload_writes(estate: Estate) -> None:
    a = estate.admin
    bare: dict[str, Any] = {"name": "ops-cache-1", "labels": {"role": "db", "app": "ops", "env": "dev", "loc": "lab"}}
    estate.accepted("POST", "/workloads", a, 201, json=bare)  # no address: no peer set changes
    estate.accepted("PUT", "/workloads/ops-db-1/mode", a, json={"mode": "selective"})
    estate.accepted("POST", "/label-keys", a, 201, json={"name": "tier", "values": []})
    # an address joins the `all` set the override-deny no-smb gives every host
    addressed = {**bare, "name": "ops-cache-2", "interfaces": [{"name": "eth0", "addresses": ["10.70.0.62"]}]}
    assert estate.refused("POST", "/workloads", a, json=addressed) in SHOP
    estate.refused("PUT", "/workloads/web-prod-1/mode", a, json={"mode": "idle"})
    shop = {**bare, "name": "shop-cache-1", "labels": {**bare["labels"], "app": "shop"}}
    assert estate.refused("POST", "/workloads", a, outside_now=False, json=shop) == "shop-cache-1"
    moved = {**OPS_DB, "labels": {**OPS_DB["labels"], "app": "shop"}, "mode": "selective"}
    estate.refused("PUT", "/workloads/ops-db-1", a, outside_now=False, json=moved)
    estate.refused("DELETE", "/workloads/ops-db-1", a)  # its addresses leave the shop's peer sets
    estate.accepted("DELETE", "/workloads/ops-cache-1", a, 204)


# ---- bulk: PUT /policy/draft, accepted suggestions -------------------------------------------------

OPS_RULESET_YAML = """apiVersion: stockade.io/v1
kind: Ruleset
name: ops-yaml
scope:
  - labels: {app: ops}
rules:
  - consumers: [%s]
    consumers_scope: global
    providers: [{labels: {role: db}}]
    services: [postgres]
"""


def test_policy_import(estate: Estate) -> None:
    def put(text: str) -> Any:
        return {"content": text, "headers": {**estate.admin, **YAML}}

    inside = estate_yaml() + "\n---\n" + OPS_RULESET_YAML % "{ip_list: office}"
    r = estate.api.req("PUT", "/policy/draft", **put(inside))
    assert r.status_code == 200, r.text
    assert estate.api.req("GET", "/rulesets/ops-yaml").status_code == 200
    outside = estate_yaml() + "\n---\n" + OPS_RULESET_YAML % "all"
    before = estate.state()
    r = estate.api.req("PUT", "/policy/draft", **put(outside))
    assert r.status_code == 403 and "outside your scope" in r.json()["message"], r.text
    assert estate.state() == before
    relabel = inside.replace("labels: {role: web, app: shop, env: prod, loc: lab}",
                             "labels: {role: app, app: shop, env: prod, loc: lab}", 1)
    r = estate.api.req("PUT", "/policy/draft", **put(relabel))
    assert r.status_code == 403 and "outside your scope" in r.json()["message"], r.text
    assert estate.state() == before
    assert estate.api.req("PUT", "/policy/draft", headers={**estate.mgr, **YAML}, content=inside).status_code == 403


def _flows_into_ops_db(estate: Estate) -> None:
    client = estate.api
    client.ok("GET", "/flows/suggestions", params={"group": "app=ops,env=prod"})  # makes the flow store
    fs = client.client.app.state.flowstore  # type: ignore[attr-defined]
    t = time.time() - 30
    records = [["10.70.0.200", "10.70.0.61", "tcp", 5432, "in", "blocked", "r", 3, t, t + 1],
               ["10.70.0.21", "10.70.0.61", "tcp", 5432, "in", "blocked", "r", 2, t, t + 1]]
    fs.ingest("ops-db-agent", "ops-db-1", {"sent_at": time.time(), "dropped": 0, "records": records},
              active_policy(client.ctl), time.time())


def test_accepted_suggestions(estate: Estate) -> None:
    _flows_into_ops_db(estate)
    s = estate.api.ok("GET", "/flows/suggestions", params={"group": "app=ops,env=prod"})
    by_consumer = {str(r["consumers"]): r["id"] for r in s["rules"]}
    office = next(i for c, i in by_consumer.items() if "office" in c)
    shop = next(i for c, i in by_consumer.items() if "shop" in c)
    body = {"group": "app=ops,env=prod"}
    assert estate.api.req("POST", "/flows/suggestions/accept", headers=estate.mgr, json=body).status_code == 403
    assert estate.refused("POST", "/flows/suggestions/accept", estate.admin, json={**body, "rules": [shop]}) \
        == "app-prod-1"
    estate.accepted("POST", "/flows/suggestions/accept", estate.admin, 201, json={**body, "rules": [office]})


# ---- provision and rollback --------------------------------------------------------------------------


def test_provision_and_rollback(estate: Estate) -> None:
    c, a = estate.api, estate.admin
    # ruleset-managers cannot provision at all (role); a scoped admin only what stays inside
    assert c.req("POST", "/policy/provision", headers=estate.mgr, json={"message": "m"}).status_code == 403
    c.ok("PUT", "/rulesets/shop-dev", json={**c.ok("GET", "/rulesets/shop-dev")["body"], "rules": []})
    assert estate.refused("POST", "/policy/provision", a, json={"message": "m"}) in {"web-dev-1", "app-dev-1",
                                                                                      "db-dev-1"}
    c.ok("POST", "/policy/provision", 201, json={"message": "the owner provisions the shop change"})  # v2
    estate.accepted("POST", "/rulesets", estate.mgr, 201, json=ruleset("ops-1", INSIDE_RULES[0]))
    estate.accepted("POST", "/policy/provision", a, 201, json={"message": "ops only"})  # v3
    assert any(r.startswith("ruleset/ops-1/") for r in host_rules(c, "ops-db-1"))
    estate.refused("POST", "/policy/rollback", a, json={"version": 1, "message": "m"})  # shop-dev comes back
    estate.accepted("POST", "/policy/rollback", a, 201, json={"version": 2, "message": "drop ops-1"})  # v4
    assert not any(r.startswith("ruleset/ops-1/") for r in host_rules(c, "ops-db-1"))
    # a rollback also resets the draft: a pending shop edit there is someone else's, so refused
    c.ok("PUT", "/rulesets/shop-prod", json={**c.ok("GET", "/rulesets/shop-prod")["body"], "rules": []})
    estate.refused("POST", "/policy/rollback", a, json={"version": 3, "message": "m"})


# ---- every write route is either scope-checked (and exercised above) or closed to scoped principals ----

EXERCISED = {
    ("POST", "/rulesets"), ("PUT", "/rulesets/{name}"), ("DELETE", "/rulesets/{name}"),
    ("POST", "/deny-rules"), ("PUT", "/deny-rules/{name}"), ("DELETE", "/deny-rules/{name}"),
    ("POST", "/services"), ("PUT", "/services/{name}"), ("POST", "/ip-lists"), ("PUT", "/ip-lists/{name}"),
    ("POST", "/label-groups"), ("PUT", "/label-groups/{name}"), ("PUT", "/failsafe/{name}"),
    ("POST", "/workloads"), ("PUT", "/workloads/{name}"), ("DELETE", "/workloads/{name}"),
    ("PUT", "/workloads/{name}/mode"), ("POST", "/label-keys"), ("PUT", "/policy/draft"),
    ("POST", "/flows/suggestions/accept"), ("POST", "/policy/provision"), ("POST", "/policy/rollback"),
}
SAME_HANDLER = {  # generated by the one CRUD skeleton as the exercised ones (objects.py)
    ("DELETE", "/services/{name}"), ("DELETE", "/ip-lists/{name}"), ("DELETE", "/label-groups/{name}"),
    ("POST", "/failsafe"), ("DELETE", "/failsafe/{name}"), ("PUT", "/label-keys/{name}"),
    ("DELETE", "/label-keys/{name}"),
    # resolved Kubernetes NetworkPolicies: inventory like workloads (tests/api/test_network_policies.py)
    ("POST", "/network-policies"), ("PUT", "/network-policies/{name}"), ("DELETE", "/network-policies/{name}"),
}


def _write_routes(client: Api) -> list[tuple[str, str, Permission]]:
    out = []
    for prefix, router in client.client.app.state.routers:  # type: ignore[attr-defined]
        for route in router.routes:
            assert isinstance(route, APIRoute)
            perms = [p for p in (getattr(d.call, "permission", None) for d in route.dependant.dependencies) if p]
            for method in route.methods or ():
                if perms and perms[0] not in (Permission.PUBLIC, Permission.READ, Permission.AGENT):
                    out.append((method, (prefix + route.path).removeprefix("/api/v1"), perms[0]))
    return out


def test_every_write_route_is_scope_checked_or_closed(estate: Estate) -> None:
    routes = _write_routes(estate.api)
    found = {(m, p) for m, p, _ in routes}
    assert found >= SCOPE_CHECKED_ROUTES, SCOPE_CHECKED_ROUTES - found
    assert SCOPE_CHECKED_ROUTES == EXERCISED | SAME_HANDLER
    # a ruleset-manager's only write routes are checked ones
    assert {(m, p) for m, p, perm in routes if perm is Permission.WRITE_RULESETS} <= EXERCISED
    owner = estate.api.key("owner", ["app=ops"])  # even an owner is confined by a scope
    for method, path, perm in sorted(routes, key=str):
        if (method, path) in SCOPE_CHECKED_ROUTES:
            continue
        url = "/api/v1" + path.replace("{", "x").replace("}", "")
        for who in (owner, estate.admin) if perm is Permission.WRITE else (owner,):
            r = estate.api.client.request(method, url, headers=who, json={})
            assert r.status_code == 403 and "label-scoped" in r.json()["message"], (method, path, r.text)


# ---- the fast path is the compiler (pure; no database) ----------------------------------------------


def _random_selector(rng: random.Random, workload_side: bool) -> Selector:
    pick = rng.random()
    if pick < 0.15:
        return ALL_WORKLOADS
    if pick < 0.3 or (not workload_side and pick < 0.45):
        return IPListSelector(rng.choice(["office", "anywhere"]))
    labels = [Label("role", rng.choice(["web", "app", "db", "monitoring"])), Label("env", rng.choice(["prod", "dev"])),
              Label("app", rng.choice(["shop", "ops"]))]
    require = tuple(sorted(rng.sample(labels, rng.randint(1, 2))))
    groups = ("non-prod",) if rng.random() < 0.2 else ()
    return LabelSelector(require, groups, ())


def _random_ruleset(rng: random.Random, name: str) -> Ruleset:
    scope = LabelSelector(tuple(sorted({Label("app", "ops"), *rng.sample([Label("env", "prod"), Label("role", "db")],
                                                                          rng.randint(0, 1))})))
    rules = tuple(
        AllowRule(consumers=(_random_selector(rng, True),), providers=(_random_selector(rng, False),),
                  services=(rng.choice(["https", "postgres", "ping", "any"]),),
                  consumers_scope=rng.choice(list(ConsumerScope)))
        for _ in range(rng.randint(0, 3))
    )
    return Ruleset(name, (scope,), rules)


def test_fast_path_equals_full_compile() -> None:
    """For random ruleset writes, the fast path names a changed workload exactly when a full
    compile of before and after differs for it (each workload judged alone)."""
    text = "\n---\n".join(p.read_text() for p in sorted(example_estate().glob("*.yaml")))
    policy = load_documents(text, "estate")
    ops = Workload("ops-db-1", frozenset({Label("role", "db"), Label("app", "ops"), Label("env", "prod")}))
    base = codec.objects_of_policy(policy)
    inventory = {"workload": {**base["workload"], "ops-db-1": codec.KIND_BY_NAME["workload"].canonical(
        {"name": ops.name, "labels": {lab.key: lab.value for lab in ops.labels}})}, "label_key": base["label_key"]}
    rng = random.Random(12)
    checked = differing = 0
    for i in range(150):
        before = {k: dict(v) for k, v in base.items() if k not in inventory}
        before["ruleset"]["ops-x"] = codec.ruleset_to(_random_ruleset(rng, "ops-x"))
        after = {k: dict(v) for k, v in before.items()}
        if i % 5 == 0:
            del after["ruleset"]["ops-x"]
        else:
            after["ruleset"]["ops-x"] = codec.ruleset_to(_random_ruleset(rng, "ops-x"))
        changed = changed_objects(before, after)
        if not changed:
            continue
        assert fast_path_applies(changed, before)
        full_before = Compiler(codec.build_policy({**before, **inventory}))
        full_after = Compiler(codec.build_policy({**after, **inventory}))
        for name in full_before.workload_names:
            w = full_before.policy.workloads[full_before.workload_names.index(name)]
            full = full_before.host_policy(name) != full_after.host_policy(name)
            fast = first_rule_change(before, after, changed, [w]) is not None
            assert fast == full, (i, name, before["ruleset"]["ops-x"], after["ruleset"].get("ops-x"))
            checked += 1
            differing += full
    assert checked > 1000 and differing > 100
