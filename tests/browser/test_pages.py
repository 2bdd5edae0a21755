"""The other pages' journeys: deny and override-deny rules, versions and rollback, events,
label groups, a new workload with a bad address (the API's reason beside the field), and the
map driven from the keyboard.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.harness import Console, pick

pytestmark = pytest.mark.browser


def test_override_deny_rule(page: Any, console: Console) -> None:
    page.goto("/#/deny-rules/new")
    page.get_by_label("Name", exact=True).fill("no-ssh-into-prod-db")
    pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "env=dev", "label:env=dev")
    pick(page, page.get_by_role("combobox", name="Providers", exact=True), "role=db", "label:role=db")
    pick(page, page.get_by_role("combobox", name="Services", exact=True), "ssh", "ssh")
    page.get_by_label(re.compile("Override deny")).check()
    expect(page.locator(".rule-sentence")).to_contain_text("can never reach (override deny)")
    page.get_by_role("button", name="Create in draft").click()
    expect(page.get_by_role("link", name="Review the draft and provision →")).to_be_visible()
    body = console.get("/deny-rules/no-ssh-into-prod-db")["body"]
    assert body["override"] is True and body["services"] == ["ssh"]
    page.get_by_role("link", name="← Deny rules").click()
    row = page.locator("tr", has=page.get_by_role("link", name="no-ssh-into-prod-db"))
    expect(row.locator('[data-verdict="blocked"]')).to_contain_text("Override deny")
    console.api.delete("/deny-rules/no-ssh-into-prod-db")


def test_rollback_provisions_an_old_version_again(page: Any, console: Console) -> None:
    console.post("/services", {"name": "rollback-probe", "ports": ["7777/tcp"]})
    # confirmed (proceed): whatever other tests left in the draft may widen or block
    latest = console.check(console.api.post("/policy/provision", json={"message": "a version to roll back from"},
                                            params={"proceed": "true"}))["number"]
    assert latest >= 2
    page.goto("/#/versions")
    page.get_by_role("link", name="#1", exact=True).click()
    expect(page.get_by_role("heading", name=re.compile("^Version 1"))).to_be_visible()
    page.get_by_role("button", name="Roll back to version 1").click()
    expect(page.get_by_role("heading", name=f"Version {latest + 1} (active)")).to_be_visible()
    v = console.get(f"/policy/versions/{latest + 1}")
    assert v["rollback_of"] == 1 and v["message"] == "Roll back to version 1"
    assert "rollback-probe" not in {s["name"] for s in console.get("/services", version="active")["items"]}


def test_events_filtered_by_action(page: Any, console: Console) -> None:
    w = console.get("/workloads/shop-db-1")["body"]
    console.put("/workloads/shop-db-1", {**w, "description": "events test"})
    page.goto("/#/events")
    page.get_by_label("Action").fill("workload.update")
    rows = page.locator("table.data tbody tr")
    expect(rows.filter(has_not_text="workload.update")).to_have_count(0)  # the filter applied
    expect(rows.first).to_contain_text("shop-db-1")


def test_label_group(page: Any, console: Console) -> None:
    page.goto("/#/labels")
    form = page.locator("form", has=page.get_by_role("heading", name="New label group (draft)"))
    form.get_by_label("Group name").fill("not-prod")
    form.get_by_label("Key").select_option("env")
    form.get_by_role("checkbox", name="env: dev").check()
    # "corp" (the dev laptops) is never relabelled; test_console moves newdev-db-1 off "staging"
    form.get_by_role("checkbox", name="env: corp").check()
    form.get_by_role("button", name="Add group").click()
    expect(page.locator('[data-group="not-prod"]').first).to_be_visible()
    assert sorted(console.get("/label-groups/not-prod")["body"]["values"]) == ["corp", "dev"]
    # usable in pickers at once
    page.goto("/#/rulesets/new")
    pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "not-prod", "group:not-prod")
    console.api.delete("/label-groups/not-prod")


def test_bad_address_shows_the_api_reason_beside_the_field(page: Any, console: Console) -> None:
    page.goto("/#/workloads/new")
    page.get_by_label("Name", exact=True).fill("typo-host")
    addresses = page.get_by_label("Addresses (comma separated)")
    addresses.fill("10.5.0.7, 10.5.0.300")
    page.get_by_role("button", name="Create workload").click()
    error = page.locator('.field-error[data-for="interfaces.0.addresses.1"]')
    expect(error).to_contain_text("10.5.0.300")
    expect(addresses).to_have_attribute("aria-invalid", "true")
    expect(addresses).to_have_value("10.5.0.7, 10.5.0.300")  # nothing lost
    addresses.fill("10.5.0.7")
    page.get_by_role("button", name="Create workload").click()
    expect(page.get_by_role("heading", name="typo-host")).to_be_visible()
    console.api.delete("/workloads/typo-host")


def _scale(transform: str) -> float:
    m = re.search(r"scale\(([\d.]+)\)", transform)
    assert m is not None, transform
    return float(m.group(1))


def slow_first_events_call(page: Any, seconds: float = 0.6) -> None:
    """Hold the map page's first audit-feed request back, as a loaded machine does.

    The map is drawn before that request, the page finishes (and moves the focus to its heading)
    after it: a test that pressed keys once the groups were visible lost them to the heading.
    """
    calls = [0]

    def handler(route: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            time.sleep(seconds)
        route.continue_()

    page.route(re.compile(r"/api/v1/events(\?|$)"), handler)


def test_map_from_the_keyboard(page: Any) -> None:
    slow_first_events_call(page)
    page.goto("/#/map")
    svg = page.locator("svg.map")
    # the map announces when it is drawn and its key handlers are attached (and the page has
    # finished moving the focus to its heading): wait on that, never on a redraw
    expect(svg).to_have_attribute("data-ready", "true")
    expect(page.locator("#view")).not_to_have_attribute("aria-busy", "true")
    svg.focus()
    expect(svg).to_be_focused()
    viewport = page.locator("svg.map g.viewport")
    before = viewport.get_attribute("transform")
    page.keyboard.press("+")  # handled synchronously: the transform is new once the key is in
    zoomed = viewport.get_attribute("transform")
    assert _scale(zoomed) > _scale(before), (before, zoomed)
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("0")  # fit again
    page.keyboard.press("Tab")  # onto the first group
    focused = page.evaluate("document.activeElement.dataset.node")
    assert focused and focused.startswith(("group:", "iplist:", "internet"))
    page.keyboard.press("Enter")
    expect(page.locator(".map-side h2")).not_to_have_text("Details")
    # hide the allowed connections, then show them again
    toggle = page.get_by_role("button", name=re.compile("Allowed")).first
    toggle.click()
    expect(svg).to_have_class(re.compile("hide-allowed"))
    toggle.click()
    expect(svg).not_to_have_class(re.compile("hide-allowed"))
