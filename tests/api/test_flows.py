"""Flow ingestion, the Explorer, the application map, suggestions and impact preview over the real app.

Runs on SQLite and on a throwaway PostgreSQL (the ``api`` fixture). Agents are enrolled for
workloads of the example estate and upload flow summaries in the wire format the agent uses.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from typing import Any

import pytest
from tests.api.conftest import Api

from stockade.controller.api.flows import active_policy
from stockade.controller.storage.flowstore import FlowFilter, FlowSettings, FlowStore
from stockade.paths import example_estate

NOW = time.time()


def estate_yaml() -> str:
    return "\n---\n".join(p.read_text() for p in sorted(example_estate().glob("*.yaml")))


def load_estate(api: Api) -> None:
    api.ok("PUT", "/policy/draft", content=estate_yaml(), headers={**api.owner, "Content-Type": "application/yaml"})
    api.ok("POST", "/policy/provision", 201, json={"message": "the example estate"})


def agent_for(api: Api, workload: str) -> tuple[str, dict[str, str]]:
    """Enrol an agent that adopts ``workload`` (an adoption code; reporting the addresses it already has)."""
    body = api.ok("GET", f"/workloads/{workload}")["body"]
    name = f"p-{workload}"
    api.ok("POST", "/pairing-profiles", 201, json={"name": name})
    code = api.ok("POST", f"/pairing-profiles/{name}/codes", 201, json={"workload": workload})["code"]
    r = api.client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": workload,
                                                       "interfaces": body["interfaces"]})
    assert r.status_code == 201, r.text
    return r.json()["agent_id"], api.headers(r.json()["token"])


def rec(src: str, dst: str, port: int | None, side: str, verdict: str, *, proto: str = "tcp", rule: str = "r",
        count: int = 1, t: float = NOW - 30) -> list[Any]:
    return [src, dst, proto, port, side, verdict, rule, count, t, t + 1]


def upload(api: Api, agent: tuple[str, dict[str, str]], records: list[list[Any]], *, dropped: int = 0,
           sent_at: float | None = None, status: int = 202) -> Any:
    aid, token = agent
    body = {"sent_at": time.time() if sent_at is None else sent_at, "dropped": dropped, "records": records}
    return api.ok("POST", f"/agents/{aid}/flows", status, headers=token, json=body)


@pytest.fixture
def estate(api: Api) -> Api:
    load_estate(api)
    return api


# ---- ingestion and the Explorer ----------------------------------------------------------------


def test_ingested_flows_are_resolved_to_workloads_and_labels(estate: Api) -> None:
    api = estate
    web, app = agent_for(api, "web-prod-1"), agent_for(api, "app-prod-1")
    assert upload(api, web, [rec("10.70.0.11", "10.70.0.21", 8080, "out", "allowed", rule="ruleset/shop-prod/1",
                                 count=3),
                             rec("fd70::11", "fd70::21", 8080, "out", "allowed", rule="ruleset/shop-prod/1"),
                             rec("10.70.0.200", "10.70.0.11", 443, "in", "allowed", rule="ruleset/shop-prod/0"),
                             rec("198.51.100.7", "10.70.0.11", 22, "in", "allowed", rule="failsafe:management")]
                  ) == {"accepted": 4}
    upload(api, app, [rec("10.70.0.11", "10.70.0.21", 8080, "in", "blocked", rule="default", count=3)])

    page = api.ok("GET", "/flows", params={"src_workload": "web-prod-1", "dst_workload": "app-prod-1"})
    items = page["items"]
    assert len(items) == 3 and page["next_cursor"] is None  # v4 both sides, v6 outbound
    v4_in = next(i for i in items if i["side"] == "in")
    assert v4_in["src"] == {"ip": "10.70.0.11", "workload": "web-prod-1", "ip_list": None,
                            "labels": {"app": "shop", "env": "prod", "loc": "lab", "role": "web"}}
    assert v4_in["dst"]["workload"] == "app-prod-1" and v4_in["dst"]["labels"]["role"] == "app"
    assert (v4_in["verdict"], v4_in["rule_id"], v4_in["reporter"], v4_in["count"]) == \
        ("blocked", "default", "app-prod-1", 3)
    assert v4_in["service"] == "8080/tcp"
    office = api.ok("GET", "/flows", params={"src_ip": "10.70.0.200"})["items"]
    assert office[0]["src"] == {"ip": "10.70.0.200", "workload": None, "labels": {}, "ip_list": "office"}

    # filters: labels (either end / one end), ip, port, verdict, side, time
    assert len(api.ok("GET", "/flows", params={"dst_labels": "role=app"})["items"]) == 3
    assert len(api.ok("GET", "/flows", params={"labels": "role=web,env=prod"})["items"]) == 5
    assert len(api.ok("GET", "/flows", params={"src_labels": "role=db"})["items"]) == 0
    assert len(api.ok("GET", "/flows", params={"ip": "fd70::21"})["items"]) == 1
    assert len(api.ok("GET", "/flows", params={"port": 22})["items"]) == 1
    assert len(api.ok("GET", "/flows", params={"verdict": ["blocked", "potentially-blocked"]})["items"]) == 1
    assert len(api.ok("GET", "/flows", params={"side": "in"})["items"]) == 3
    assert len(api.ok("GET", "/flows", params={"since": NOW + 3600})["items"]) == 0
    assert len(api.ok("GET", "/flows", params={"until": NOW - 3600})["items"]) == 0
    assert len(api.ok("GET", "/flows", params={"since": NOW - 120, "until": NOW})["items"]) == 5
    assert api.req("GET", "/flows", params={"ip": "not-an-ip"}).status_code == 422
    assert api.req("GET", "/flows", params={"labels": "role"}).status_code == 422

    # the same flow reported again in the same hour is one summary with the counts added
    upload(api, app, [rec("10.70.0.11", "10.70.0.21", 8080, "in", "blocked", rule="default", count=4)])
    (again,) = api.ok("GET", "/flows", params={"side": "in", "dst_workload": "app-prod-1"})["items"]
    assert again["count"] == 7

    # explain a recorded flow: the active policy allows web -> app on 8080 at both ends
    ex = api.ok("GET", f"/flows/{again['id']}/explain")
    assert ex["verdict"] == "allowed" and ex["reported"] == "blocked"
    assert ex["inbound"]["rule_id"] == "ruleset/shop-prod/1" and ex["reported_inbound_rule"] == "default"
    assert api.req("GET", "/flows/1.2/explain").status_code == 404


def test_upload_validation_and_identity(estate: Api) -> None:
    api = estate
    web = agent_for(api, "web-prod-1")
    db = agent_for(api, "db-prod-1")
    bad = [
        rec("10.70.0.11", "fd70::21", 80, "out", "allowed"),  # mixed families
        rec("10.70.0.11", "10.70.0.21", 70000, "out", "allowed"),
        rec("10.70.0.11", "10.70.0.21", 80, "sideways", "allowed"),
        rec("10.70.0.11", "10.70.0.21", 80, "out", "maybe"),
        rec("10.70.0.11", "10.70.0.21", 80, "out", "allowed", count=0),
        rec("nope", "10.70.0.21", 80, "out", "allowed"),
        rec("10.70.0.11", "10.70.0.21", 80, "out", "allowed", proto="dccp"),
        rec("10.70.0.11", "10.70.0.21", 80.0, "out", "allowed"),  # type: ignore[arg-type]
        rec("10.70.0.11", "10.70.0.21", True, "out", "allowed"),
        ["10.70.0.11"],
    ]
    for r in bad:
        out = upload(api, web, [rec("10.70.0.11", "10.70.0.21", 80, "out", "allowed"), r], status=422)
        assert out["issues"][0]["field"] == "records[1]"
    assert api.ok("GET", "/flows")["items"] == []  # a refused upload stores nothing
    aid, token = web
    assert api.req("POST", f"/agents/{db[0]}/flows", headers=token, json={"records": []}).status_code == 403
    assert api.req("POST", f"/agents/{aid}/flows", json={"records": []}).status_code == 403  # owner key: no
    assert api.req("POST", f"/agents/{aid}/flows", headers=token, content=b"{").status_code == 422
    assert api.req("POST", f"/agents/{aid}/flows", headers=token,
                   json={"records": [rec("10.0.0.1", "10.0.0.2", 1, "out", "allowed")] * 10001}).status_code == 422
    # the agent's clock is ten minutes slow: times are corrected by its send time
    upload(api, web, [rec("10.70.0.11", "10.70.0.31", 5432, "out", "allowed", t=NOW - 600)], sent_at=time.time() - 600)
    (f,) = api.ok("GET", "/flows", params={"port": 5432})["items"]
    assert abs(datetime.fromisoformat(f["first_seen"]).timestamp() - NOW) < 5


def test_pagination_and_csv_export(estate: Api) -> None:
    api = estate
    web = agent_for(api, "web-prod-1")
    records = [rec("10.70.0.11", f"198.51.100.{i % 200}", 1000 + i, "out", "potentially-blocked", rule="default")
               for i in range(450)]
    upload(api, web, records)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100, "src_workload": "web-prod-1"}
        if cursor:
            params["cursor"] = cursor
        page = api.ok("GET", "/flows", params=params)
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 450
    assert api.req("GET", "/flows", params={"cursor": "garbage"}).status_code == 422
    r = api.req("GET", "/flows/export", params={"port": 1007})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 1
    assert rows[0]["src_workload"] == "web-prod-1" and rows[0]["dst_ip"] == "198.51.100.7"
    assert rows[0]["src_labels"] == "app=shop,env=prod,loc=lab,role=web"
    assert rows[0]["dst_ip_list"] == "anywhere" and rows[0]["verdict"] == "potentially-blocked"
    full = list(csv.DictReader(io.StringIO(api.req("GET", "/flows/export").text)))
    assert len(full) == 450


def test_dropped_counts_are_recorded(estate: Api) -> None:
    api = estate
    web = agent_for(api, "web-prod-1")
    upload(api, web, [rec("10.70.0.11", "10.70.0.21", 8080, "out", "allowed")], dropped=17)
    upload(api, web, [], dropped=17)
    (stats,) = api.ok("GET", "/flows/stats")
    assert (stats["workload"], stats["records"], stats["batches"], stats["dropped"]) == ("web-prod-1", 1, 2, 17)


# ---- map, suggestions, impact ----------------------------------------------------------------------


def traffic(api: Api) -> None:
    web, app, mon = agent_for(api, "web-prod-1"), agent_for(api, "app-prod-1"), agent_for(api, "mon-1")
    upload(api, web, [rec("10.70.0.11", "10.70.0.21", 8080, "out", "allowed", count=5),
                      rec("10.70.0.200", "10.70.0.11", 443, "in", "allowed", count=2),
                      rec("10.70.0.50", "10.70.0.11", 9100, "in", "allowed")])
    upload(api, app, [rec("10.70.0.11", "10.70.0.21", 8080, "in", "allowed", count=5),
                      rec("10.70.0.21", "10.70.0.31", 5432, "out", "allowed", count=9)])
    upload(api, mon, [rec("10.70.0.50", "10.70.0.11", 9100, "out", "allowed"),
                      rec("10.70.0.50", "10.70.0.21", 9100, "out", "allowed")])


def test_application_map_and_drill_down(estate: Api) -> None:
    api = estate
    traffic(api)
    m = api.ok("GET", "/flows/map")
    nodes = {n["id"]: n for n in m["nodes"]}
    assert nodes["group:app=shop,env=prod"]["workloads"] == ["app-prod-1", "db-prod-1", "web-prod-1", "web-prod-2"]
    assert nodes["iplist:office"]["kind"] == "ip-list"
    edges = {(e["src"], e["dst"]): e for e in m["edges"]}
    prod = edges[("group:app=shop,env=prod", "group:app=shop,env=prod")]
    assert (prod["connections"], prod["count"], prod["allowed"]) == (2, 14, 2)  # both sides counted once
    assert prod["services"] == ["5432/tcp", "8080/tcp"]
    assert edges[("group:app=ops,env=prod", "group:app=shop,env=prod")]["connections"] == 2
    by_role = api.ok("GET", "/flows/map", params={"keys": "role"})
    assert {n["name"] for n in by_role["nodes"] if n["kind"] == "app-group"} == {"web", "app", "db", "monitoring"}
    drill = api.ok("GET", "/flows/map/edge", params={"src": "group:app=ops,env=prod",
                                                      "dst": "group:app=shop,env=prod"})
    assert {d["flow"]["dst"]["workload"] for d in drill} == {"web-prod-1", "app-prod-1"}
    assert all(d["inbound"]["rule_id"] == "ruleset/monitoring/0" for d in drill)
    assert api.req("GET", "/flows/map", params={"keys": ""}).status_code == 422


def test_suggestions_and_accept_into_the_draft(estate: Api) -> None:
    api = estate
    traffic(api)
    # in a draft without shop-prod's rules, the shop's traffic needs new rules
    api.ok("DELETE", "/rulesets/shop-prod", 204)
    s = api.ok("GET", "/flows/suggestions", params={"group": "app=shop,env=prod"})
    assert s["ruleset"] == "sugg-shop-prod" and s["scope"] == {"labels": {"app": "shop", "env": "prod"}}
    services = {r["service"] for r in s["rules"]}
    assert {"app-http", "https", "postgres"} <= services
    https = next(r for r in s["rules"] if r["service"] == "https")
    assert https["consumers"] == [{"ip_list": "office"}] and https["providers"] == [{"labels": {"role": "web"}}]
    assert s["already_allowed"] == 2  # monitoring's scrapes: the monitoring ruleset allows them

    ro = api.key("read-only")
    assert api.req("POST", "/flows/suggestions/accept", headers=ro, json={"group": "app=shop,env=prod"}).status_code \
        == 403
    assert api.req("GET", "/flows/suggestions", headers=ro, params={"group": "app=shop,env=prod"}).status_code == 200
    admin = api.key("admin")
    out = api.ok("POST", "/flows/suggestions/accept", 201, headers=admin,
                 json={"group": "app=shop,env=prod", "rules": [https["id"]]})
    assert out == {"ruleset": "sugg-shop-prod", "services": [], "ip_lists": [], "rules": 1}
    rs = api.ok("GET", "/rulesets/sugg-shop-prod")["body"]
    assert rs["rules"][0]["services"] == ["https"]
    again = api.ok("GET", "/flows/suggestions", params={"group": "app=shop,env=prod"})
    assert "https" not in {r["service"] for r in again["rules"]}  # the draft allows it now
    assert api.req("POST", "/flows/suggestions/accept", json={"group": "app=shop,env=prod",
                                                             "rules": ["nosuch"]}).status_code == 404
    assert api.req("GET", "/flows/suggestions", params={"group": "app=nosuch"}).status_code == 404


def test_impact_preview_and_the_provision_guard(estate: Api) -> None:
    api = estate
    traffic(api)
    assert api.ok("GET", "/policy/impact")["evaluated"] == 5 and api.ok("GET", "/policy/impact")["items"] == []
    # the draft drops web -> app: exactly that connection becomes newly blocked
    rs = api.ok("GET", "/rulesets/shop-prod")["body"]
    rs["rules"] = [r for r in rs["rules"] if r["services"] != ["app-http"]]
    api.ok("PUT", "/rulesets/shop-prod", json=rs)
    imp = api.ok("GET", "/policy/impact")
    assert imp["newly_blocked"] == 1 and len(imp["items"]) == 1
    item = imp["items"][0]
    assert (item["src"], item["dst"], item["port"], item["before"], item["after"], item["count"]) == \
        ("10.70.0.11", "10.70.0.21", 8080, "allowed", "blocked", 5)
    assert "app-prod-1:allow:ruleset/shop-prod/1" in item["before_rules"]
    refused = api.req("POST", "/policy/provision", json={"message": "cut"})
    assert refused.status_code == 409 and "newly block 1" in refused.json()["message"]
    v = api.ok("POST", "/policy/provision", 201, params={"proceed": "true"}, json={"message": "cut"})
    assert v["impact"]["newly_blocked"] == 1
    assert api.ok("GET", "/policy/impact")["items"] == []  # the draft is the active version now


# ---- retention ---------------------------------------------------------------------------------------


def test_retention_by_age_and_size(api: Api) -> None:
    fs = FlowStore(api.ctl.engine, FlowSettings(max_age_hours=2, max_rows=3))
    load_estate(api)
    policy = active_policy(api.ctl)
    now = time.time()
    old = [rec("10.70.0.11", "10.70.0.21", p, "out", "allowed", t=now - 5 * 3600) for p in (1, 2)]
    mid = [rec("10.70.0.11", "10.70.0.21", p, "out", "allowed", t=now - 3600) for p in (3, 4)]
    new = [rec("10.70.0.11", "10.70.0.21", p, "out", "allowed", t=now - 10) for p in (5, 6)]
    fs.ingest("a1", "web-prod-1", {"sent_at": now, "records": old + mid + new}, policy, now)
    fs.compact(wait=True)
    assert len(fs.aggregate(FlowFilter(since_ms=0), now)) == 6
    assert fs.prune(now) == 4  # two too old, then the oldest remaining hour for size
    ports = sorted(r[5] for r in fs.aggregate(FlowFilter(since_ms=0), now))
    assert ports == [5, 6]


def test_pages_across_days_newest_first(api: Api) -> None:
    fs = FlowStore(api.ctl.engine)
    load_estate(api)
    policy = active_policy(api.ctl)
    now = time.time()
    records = [rec("10.70.0.11", "10.70.0.21", 100 * day + k, "out", "allowed", t=now - day * 86400 - 60)
               for day in range(5) for k in range(3)]
    fs.ingest("a1", "web-prod-1", {"sent_at": now, "records": records}, policy, now)
    seen: list[int] = []
    cursor = None
    while True:
        page, cursor = fs.query(FlowFilter(src_ip="10.70.0.11"), cursor=cursor, limit=4, now=now)
        seen += [r.key.port or 0 for r in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(100 * day + k for day in range(5) for k in range(3))
    assert [p // 100 for p in seen] == sorted(p // 100 for p in seen)  # newest day first
    few, _ = fs.query(FlowFilter(port=402), cursor=None, limit=10, now=now)  # four days back
    assert [r.key.port for r in few] == [402]
