"""The console's main journeys in a real browser against a live controller.

Log in; find a workload and relabel it; write a rule with the label and service pickers; see
the draft's changes and the impact preview; provision; field-level errors from the API next to
their fields with nothing lost; a stale edit (412) keeps the edits; pairing profile and
activation code with the install command; display settings; keyboard use.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.harness import Console, pick

pytestmark = pytest.mark.browser


def provision_in_console(page: Any) -> None:
    """Click Provision; confirm in the dialog the console shows when the draft blocks or widens (issue 14)."""
    page.get_by_role("button", name="Provision", exact=True).click()
    dialog = page.get_by_role("dialog", name="Provision this version?")
    done = page.locator("[data-role=provisioned]")
    expect(dialog.or_(done)).to_be_visible()
    if dialog.is_visible():
        dialog.get_by_role("button", name="Provision anyway").click()
    expect(done).to_be_visible()


def test_login_form(anonymous_page: Any, console: Console) -> None:
    page = anonymous_page
    page.goto("/")
    expect(page.get_by_role("heading", name="Log in to Stockade")).to_be_visible()
    page.get_by_label("Username").fill(console.username)
    page.get_by_label("Password", exact=True).fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".form-errors h2")).to_have_text("Wrong user name or password")
    expect(page.get_by_label("Username")).to_have_value(console.username)  # nothing lost
    page.get_by_label("Password", exact=True).fill(console.password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Workloads")).to_be_visible()
    expect(page.locator("#session")).to_contain_text(console.username)
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in to Stockade")).to_be_visible()


def test_find_a_workload_and_relabel_it(page: Any, console: Console) -> None:
    page.goto("/#/workloads")
    rows = page.locator("table.data tbody tr")
    expect(rows).to_have_count(len(console.get("/workloads")["items"]))
    page.keyboard.press("/")  # the search shortcut
    page.keyboard.type("newdev")
    expect(rows).to_have_count(2)
    pick(page, page.get_by_role("combobox", name="Labels (all must match)", exact=True), "env=sta", "label:env=staging")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("newdev-db-1")
    assert "labels=env%3Dstaging" in page.url or "labels=env=staging" in page.url
    rows.first.get_by_role("link", name="newdev-db-1").click()

    expect(page.get_by_role("heading", name="newdev-db-1")).to_be_visible()
    labels = page.get_by_role("combobox", name="Labels", exact=True)
    pick(page, labels, "env=de", "label:env=dev")
    form = page.locator("form", has=labels)
    chosen = form.locator(".picker > .chips")
    expect(chosen.locator('[data-label="env=dev"]')).to_be_visible()
    expect(chosen.locator('[data-label="env=staging"]')).to_have_count(0)  # one value per key
    page.get_by_role("button", name="Save labels").click()
    expect(page.get_by_text(re.compile(r"Saved \(revision \d+\)"))).to_be_visible()
    assert console.get("/workloads/newdev-db-1")["body"]["labels"]["env"] == "dev"


def test_write_a_rule_with_pickers_preview_and_provision(page: Any, console: Console) -> None:
    page.goto("/#/rulesets/new")
    page.get_by_label("Name", exact=True).fill("dev-access")
    page.get_by_label("Description").fill("the dev team may reach the new dev environment")
    pick(page, page.get_by_role("combobox", name="Scope", exact=True), "env=dev", "label:env=dev")
    consumers = page.get_by_role("combobox", name="Consumers", exact=True)
    pick(page, consumers, "devteam", "label:app=devteam")
    page.get_by_label("Where consumers may be").select_option("global")
    providers = page.get_by_role("combobox", name="Providers", exact=True)
    # an address is not a label: nothing to pick, and a hint says where addresses go
    providers.fill("10.2.0.11")
    expect(page.get_by_text("Addresses are not labels")).to_be_visible()
    providers.press("Enter")
    expect(page.locator(".rule-card .picker > .chips .chip")).to_have_count(1)  # only app=devteam so far
    pick(page, providers, "role=web", "label:role=web")
    services = page.get_by_role("combobox", name="Services", exact=True)
    pick(page, services, "htt", "https")
    pick(page, services, "ssh", "ssh")
    sentence = page.locator(".rule-sentence")
    expect(sentence).to_contain_text("may reach")
    expect(sentence.locator('[data-label="app=devteam"]')).to_be_visible()
    page.get_by_role("button", name="Create in draft").click()
    expect(page.get_by_text(re.compile(r"Saved \(revision 1\)"))).to_be_visible()
    body = console.get("/rulesets/dev-access")["body"]
    assert body["scope"] == [{"labels": {"env": "dev"}}]
    rule = body["rules"][0]
    assert rule["consumers"] == [{"labels": {"app": "devteam"}}]
    assert rule["providers"] == [{"labels": {"role": "web"}}]
    assert sorted(rule["services"]) == ["https", "ssh"]
    assert rule["consumers_scope"] == "global"

    page.get_by_role("link", name="Review the draft and provision →").click()
    expect(page.get_by_role("heading", name="Review and provision")).to_be_visible()
    change = page.locator('[data-change="ruleset:dev-access"]')
    expect(change).to_contain_text("added")
    impact = page.locator("section", has=page.get_by_role("heading", name="Impact preview"))
    expect(impact.locator("p").first).to_be_visible()
    before = console.get("/policy/versions", limit=1)["items"][0]["number"]
    page.get_by_label("Message").fill("dev team may reach the new dev environment")
    page.get_by_role("button", name="Provision").click()
    # the draft newly allows recorded connections (dev laptops -> newdev-web-1): the console asks first
    dialog = page.get_by_role("dialog", name="Provision this version?")
    expect(dialog).to_contain_text("newly allow")
    dialog.get_by_role("button", name="Provision anyway").click()
    expect(page.get_by_text(f"Version {before + 1} provisioned.")).to_be_visible()
    latest = console.get("/policy/versions", limit=1)["items"][0]
    assert latest["number"] == before + 1
    assert latest["message"] == "dev team may reach the new dev environment"
    assert "newdev-web-1" in latest["affected_workloads"]


def test_api_field_errors_show_next_to_fields_and_nothing_is_lost(page: Any) -> None:
    page.goto("/#/rulesets/new")
    name = page.get_by_label("Name", exact=True)
    name.fill("bad name!")
    pick(page, page.get_by_role("combobox", name="Scope", exact=True), "env=prod", "label:env=prod")
    pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "role=web", "label:role=web")
    pick(page, page.get_by_role("combobox", name="Providers", exact=True), "role=db", "label:role=db")
    page.get_by_role("button", name="Create in draft").click()
    name_error = page.locator('.field-error[data-for="name"]')
    expect(name_error).to_be_visible()
    expect(name).to_have_attribute("aria-invalid", "true")
    services_error = page.locator('.field-error[data-for^="rules.0.services"]')
    expect(services_error).to_be_visible()
    # what was typed and picked is all still there
    expect(name).to_have_value("bad name!")
    expect(page.locator('.rule-card .picker > .chips [data-label="role=web"]')).to_be_visible()
    expect(page.locator('.rule-card .picker > .chips [data-label="role=db"]')).to_be_visible()
    # fix and save
    name.fill("good-name")
    pick(page, page.get_by_role("combobox", name="Services", exact=True), "postgres", "postgres")
    page.get_by_role("button", name="Create in draft").click()
    expect(page.get_by_text(re.compile(r"Saved \(revision 1\)"))).to_be_visible()
    expect(page.locator(".field-error")).to_have_count(0)


def test_a_stale_edit_is_refused_and_keeps_the_edits(page: Any, console: Console) -> None:
    page.goto("/#/workloads/shop-web-2")
    labels = page.get_by_role("combobox", name="Labels", exact=True)
    expect(labels).to_be_visible()  # the page holds the workload's ETag now
    # someone else changes the workload meanwhile
    w = console.get("/workloads/shop-web-2")["body"]
    console.put("/workloads/shop-web-2", {**w, "description": "changed elsewhere"})
    pick(page, labels, "role=d", "label:role=db")
    page.get_by_role("button", name="Save labels").click()
    expect(page.locator(".form-errors")).to_contain_text("Changed by someone else")
    form = page.locator("form", has=labels)
    expect(form.locator('.picker > .chips [data-label="role=db"]')).to_be_visible()
    assert console.get("/workloads/shop-web-2")["body"]["labels"]["role"] == "web"


def test_pairing_profile_activation_code_and_install_command(page: Any, console: Console) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=console.url)
    page.goto("/#/agents")
    form = page.locator("form", has=page.get_by_role("heading", name="New pairing profile"))
    form.get_by_label("Name", exact=True).fill("dev-hosts")
    preset = form.get_by_role("combobox", name="Labels for enrolled workloads", exact=True)
    pick(page, preset, "env=dev", "label:env=dev")
    pick(page, preset, "app=shop", "label:app=shop")
    form.get_by_role("button", name="Create profile").click()
    row = page.locator("tr", has=page.get_by_text("dev-hosts", exact=True))
    expect(row.locator('[data-label="env=dev"]')).to_be_visible()
    row.get_by_role("button", name="Create an activation code for dev-hosts").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    code = dialog.locator('[data-role="code"]').inner_text().strip()
    command = dialog.locator('[data-role="install-command"]').inner_text().strip()
    assert code.startswith("act_")
    assert command == (f"echo {code} | sudo stockade agent install --controller {console.url} "
                       "--activation-code-file - --start")  # never an argument: visible in ps
    dialog.get_by_role("button", name="Copy").click()
    expect(dialog.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == command
    dialog.get_by_role("button", name="Done").click()
    expect(dialog).to_be_hidden()
    # the code really enrols a host with the profile's labels
    r = httpx.post(f"{console.url}/api/v1/agents/enroll", json={"activation_code": code, "hostname": "dev-box-7"})
    assert r.status_code == 201, r.text
    assert console.get("/workloads/dev-box-7")["body"]["labels"] == {"app": "shop", "env": "dev"}
    page.reload()
    expect(page.locator("table.data").first).to_contain_text("dev-box-7")


def test_display_settings_theme_and_colour_vision(page: Any) -> None:
    page.goto("/#/settings")
    html = page.locator("html")
    page.get_by_label("High contrast (dark)").check()
    expect(html).to_have_attribute("data-theme", "high-contrast")
    blocked = "getComputedStyle(document.documentElement).getPropertyValue('--verdict-blocked').trim()"
    assert page.evaluate(blocked).upper() == "#D55E00"
    page.get_by_label(re.compile("Enhanced for colour-vision deficiency")).check()
    expect(html).to_have_attribute("data-cvd", "enhanced")
    assert page.evaluate(blocked).upper() == "#CC4466"
    page.reload()  # kept in this browser
    expect(html).to_have_attribute("data-theme", "high-contrast")
    expect(html).to_have_attribute("data-cvd", "enhanced")
    # verdicts are never colour alone: every badge has an icon and its text
    for badge in page.locator(".verdict").all():
        assert badge.locator("svg use").count() == 1
        assert badge.inner_text().strip()
    page.get_by_label("Light").check()
    page.get_by_label(re.compile("Standard Okabe")).check()
    expect(html).to_have_attribute("data-theme", "light")


def test_keyboard_only_rule_editing(page: Any) -> None:
    page.goto("/#/rulesets/new")
    page.get_by_label("Name", exact=True).focus()
    page.keyboard.type("kbd-only")
    consumers = page.get_by_role("combobox", name="Consumers", exact=True)
    consumers.focus()
    page.keyboard.type("role=we")
    expect(consumers).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("Enter")
    chip = page.locator('.rule-card .picker > .chips [data-label="role=web"]')
    expect(chip).to_be_visible()
    page.keyboard.press("Backspace")  # empty input: removes the last chip
    expect(chip).to_have_count(0)
    page.keyboard.type("role=we")
    page.keyboard.press("Escape")
    expect(consumers).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("Enter")  # free text is never taken
    expect(chip).to_have_count(0)
