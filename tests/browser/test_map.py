"""The application map and the Explorer against recorded traffic.

Flows are reported through the agent protocol by an enrolled agent (no kernel here: the
records are the ones a visibility-mode host would send). The journey: a potentially blocked
edge on the map; its flows and deciding rule; the draft view shows it allowed once a rule is
in the draft; provision from the console; the hosts' new reports turn the edge allowed on the
map; a relabel shows on the open map; the Explorer finds the flows, explains one and exports CSV.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.harness import Console, enroll, flow, pick, workload

pytestmark = pytest.mark.browser

OPS = "group:app=ops,env=qa"
BILLING = "group:app=billing,env=qa"
EDGE = f"{OPS}->{BILLING}"


@pytest.fixture(scope="module")
def qa_estate(console: Console) -> Any:
    if not console.has_visibility():
        pytest.skip("this controller does not serve the visibility API (flows, map, impact)")
    if not any(s["name"] == "billing-api" for s in console.get("/services")["items"]):
        console.post("/services", {"name": "billing-api", "ports": ["8443/tcp"]})
    for w in (workload("ops-box-1", {"role": "admin", "app": "ops", "env": "qa"}, "10.7.0.11"),
              workload("qa-api-1", {"role": "api", "app": "billing", "env": "qa"}, "10.7.1.11"),
              workload("qa-api-2", {"role": "api", "app": "billing", "env": "qa"}, "10.7.1.12")):
        console.post("/workloads", w)
    agent = enroll(console, "qa-api-1")
    # two hours ago: the map reads hourly rollups, so "since the active version" must not share their hour
    agent.report([flow("10.7.0.11", "10.7.1.11", 8443, "potentially-blocked", "default", count=4, ago=7200)])
    return agent


def edge_verdict(page: Any) -> Any:
    return page.locator(f'[data-edge="{EDGE}"]')


def test_edge_from_potentially_blocked_to_allowed(page: Any, console: Console, qa_estate: Any) -> None:
    page.goto("/#/map")
    expect(edge_verdict(page)).to_have_attribute("data-verdict", "potentially-blocked")
    # a group: its workloads
    page.locator(f'[data-node="{BILLING}"]').click()
    expect(page.locator("[data-role=group-workloads]")).to_contain_text("qa-api-1")
    # an edge: its flows and the rule deciding each
    page.locator(f'[data-edge-hit="{EDGE}"]').dispatch_event("click")
    flows = page.locator("[data-role=edge-flows] table")
    expect(flows).to_contain_text("10.7.0.11")
    expect(flows.locator('[data-verdict="potentially-blocked"]').first).to_be_visible()
    expect(flows).to_contain_text("default")

    # a rule in the draft: the draft view decides the edge's flows as allowed
    console.post("/rulesets", {
        "name": "qa-access", "scope": [{"labels": {"app": "billing", "env": "qa"}}],
        "rules": [{"consumers": [{"labels": {"app": "ops"}}], "providers": [{"labels": {"role": "api"}}],
                   "services": ["billing-api"], "consumers_scope": "global"}],
    })
    page.get_by_role("button", name="Draft").click()
    expect(edge_verdict(page)).to_have_attribute("data-verdict", "allowed")
    expect(page.locator("[data-role=map-status]")).to_contain_text("the draft changes")
    page.get_by_role("button", name="Reported").click()
    expect(edge_verdict(page)).to_have_attribute("data-verdict", "potentially-blocked")

    # provision from the console; the impact preview lists the flow as newly allowed
    page.goto("/#/policy")
    summary = page.locator("[data-role=impact-summary]")
    expect(summary).to_contain_text("newly allowed: 1")
    expect(page.locator("[data-role=impact] table")).to_contain_text("ops-box-1")
    page.get_by_label("Message").fill("ops may reach the billing API in qa")
    page.get_by_role("button", name="Provision", exact=True).click()
    dialog = page.get_by_role("dialog", name="Provision this version?")  # it widens: the console asks first
    expect(dialog.locator('[data-role="impact-allowed"]')).to_contain_text("ops-box-1")
    dialog.get_by_role("button", name="Provision anyway").click()
    expect(page.locator("[data-role=provisioned]")).to_be_visible()

    # the host now reports those connections allowed, by the new rule
    qa_estate.report([flow("10.7.0.11", "10.7.1.11", 8443, "allowed", "ruleset/qa-access/0", count=2)])
    page.locator("[data-role=provisioned]").get_by_role("link", name="Watch the map").click()
    expect(page.get_by_label("Traffic:")).to_have_value("version")
    expect(edge_verdict(page)).to_have_attribute("data-verdict", "allowed")
    page.locator(f'[data-edge-hit="{EDGE}"]').dispatch_event("click")
    flows = page.locator("[data-role=edge-flows] table")
    expect(flows.get_by_role("link", name="ruleset qa-access rule 1").first).to_be_visible()
    # over the whole day the worst report still shows: the earlier would-be blocks
    page.get_by_label("Traffic:").select_option("24h")
    expect(edge_verdict(page)).to_have_attribute("data-verdict", "potentially-blocked")


def test_relabel_shows_on_the_open_map(page: Any, console: Console, qa_estate: Any) -> None:
    page.goto("/#/map")
    billing = page.locator(f'[data-node="{BILLING}"]')
    expect(billing).to_be_visible()
    w = console.get("/workloads/qa-api-2")["body"]
    console.put("/workloads/qa-api-2", {**w, "labels": {**w["labels"], "env": "uat"}})
    moved = page.locator('[data-node="group:app=billing,env=uat"]')
    expect(moved).to_be_visible(timeout=3000)  # the map follows the event feed, no reload
    moved.click()
    expect(page.locator("[data-role=group-workloads]")).to_contain_text("qa-api-2")
    console.put("/workloads/qa-api-2", w)


def test_explorer_search_explain_and_csv(page: Any, console: Console, qa_estate: Any) -> None:
    page.goto("/#/explorer")
    # choose the suggestion itself: Enter before the suggestions arrive would search for nothing
    pick(page, page.get_by_role("combobox", name="Source labels", exact=True), "app=op", "label:app=ops")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table.data tbody tr")
    expect(rows.filter(has_not_text="ops-box-1")).to_have_count(0)  # the search applied
    expect(rows.first).to_contain_text("10.7.0.11")
    page.get_by_role("button", name=re.compile(r"^Why\? Explain the flow from ops-box-1 to qa-api-1")).first.click()
    why = page.locator("section", has=page.get_by_role("heading", name="Why: ops-box-1 → qa-api-1 on 8443/tcp"))
    expect(why).to_be_visible()
    expect(why.get_by_role("link", name="ruleset qa-access rule 1").first).to_be_visible()
    href = page.get_by_role("link", name="Export CSV").get_attribute("href")
    assert href and href.startswith("/api/v1/flows/export?") and "src_labels=app%3Dops" in href
    body = page.request.get(href)
    assert body.ok
    table = list(csv.DictReader(io.StringIO(body.text())))
    assert table and all(row["src_workload"] == "ops-box-1" for row in table)
    assert {row["verdict"] for row in table} == {"potentially-blocked", "allowed"}


def test_rule_suggestions_from_a_group_traffic(page: Any, console: Console, qa_estate: Any) -> None:
    for w in (workload("crm-app-1", {"role": "app", "app": "crm", "env": "qa"}, "10.7.2.11"),
              workload("crm-db-1", {"role": "db", "app": "crm", "env": "qa"}, "10.7.2.21")):
        console.post("/workloads", w)
    enroll(console, "crm-db-1").report([flow("10.7.2.11", "10.7.2.21", 5432, "potentially-blocked", "default",
                                             count=9)])
    page.goto("/#/map")
    page.locator('[data-node="group:app=crm,env=qa"]').click()
    page.get_by_role("button", name="Suggest rules from this traffic").click()
    box = page.locator("[data-role=suggestions]")
    expect(box.locator('[data-label="role=app"]').first).to_be_visible()
    expect(box.locator('[data-label="role=db"]').first).to_be_visible()
    box.get_by_role("button", name="Add the chosen rules to the draft").click()
    expect(box.locator(".notice")).to_contain_text("added to the draft")
    name = box.locator(".notice a").first.inner_text()
    rules = console.get(f"/rulesets/{name}")["body"]["rules"]
    assert any(r["consumers"] == [{"labels": {"role": "app"}}] and r["providers"] == [{"labels": {"role": "db"}}]
               for r in rules), rules
