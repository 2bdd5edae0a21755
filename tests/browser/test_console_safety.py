"""Issue 14, safety first, through the console as a user drives it.

* Text left unfinished in a label picker (``app=billing``, not an allowed value of ``app``) is an
  error beside the field when saving, never dropped into an empty scope (which on main saved a
  ruleset governing every workload). An empty scope is an error too; "All workloads" is a choice
  in the list, shown with a warning, and saved as the explicit ``"all"``.
* The picker says why a label can't be picked; an owner can add the value to the key from the
  picker and from the Labels page; a read-only user and a ruleset-manager get the reason without
  the action.
* A login failure shows login messages, not "Could not save" (its own controller with a low
  login rate limit, to reach "Too many attempts").

This module runs its own controller (label key ``app`` restricted to the estate's values), so the
restriction does not leak into other browser tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import checked_page, new_context
from tests.browser.harness import Console, pick, running_controller, seed_estate

pytestmark = pytest.mark.browser

PASSWORD = "correct-horse-battery"


@pytest.fixture(scope="module")
def estate() -> Iterator[Console]:
    with running_controller() as c:
        seed_estate(c)
        c.put("/label-keys/app", {"name": "app", "values": ["devteam", "shop"]})
        c.post("/users", {"username": "reader", "password": PASSWORD, "role": "read-only"})
        c.post("/users", {"username": "shopmgr", "password": PASSWORD, "role": "ruleset-manager",
                          "scope": ["app=shop"]})
        yield c


def _page_as(browser: Any, c: Console, username: str | None = None) -> Iterator[Any]:
    import httpx

    cookie = None
    if username is None:
        cookie = c.session_cookie()
    else:
        r = httpx.post(f"{c.url}/api/v1/auth/login", json={"username": username, "password": PASSWORD})
        r.raise_for_status()
        cookie = str(r.cookies["stockade_session"])
    yield from checked_page(browser, c, cookie)


@pytest.fixture
def owner_page(browser: Any, estate: Console) -> Iterator[Any]:
    yield from _page_as(browser, estate)


@pytest.fixture
def reader_page(browser: Any, estate: Console) -> Iterator[Any]:
    yield from _page_as(browser, estate, "reader")


@pytest.fixture
def manager_page(browser: Any, estate: Console) -> Iterator[Any]:
    yield from _page_as(browser, estate, "shopmgr")


def _scope(page: Any) -> Any:
    return page.get_by_role("combobox", name="Scope", exact=True)


def _fill_rule(page: Any) -> None:
    pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "role=web", "label:role=web")
    pick(page, page.get_by_role("combobox", name="Providers", exact=True), "role=db", "label:role=db")
    pick(page, page.get_by_role("combobox", name="Services", exact=True), "postgres", "postgres")


def test_unfinished_picker_text_is_an_error_and_an_empty_scope_is_never_all(owner_page: Any, estate: Console,
                                                                             screenshots: Path) -> None:
    page = owner_page
    page.goto("/#/rulesets/new")
    page.get_by_label("Name", exact=True).fill("billing-prod")
    scope = _scope(page)
    scope.click()
    scope.fill("app=billing")  # typed, never picked (billing is not an allowed value of app)
    _fill_rule(page)
    page.get_by_role("button", name="Create in draft").click()
    scope_field = page.locator('.field:has(> .label strong:text-is("Scope"))')
    error = scope_field.locator(".field-error")
    expect(error).to_contain_text("“app=billing” was not saved")
    expect(error).to_contain_text("billing is not an allowed value of app")
    expect(scope).to_have_attribute("aria-invalid", "true")
    expect(scope).to_have_value("app=billing")  # nothing typed is lost
    page.screenshot(path=str(screenshots / "ruleset-unfinished-label.png"), full_page=True)
    assert estate.api.get("/rulesets/billing-prod").status_code == 404

    # clearing the text leaves an empty scope: still an error, never "every workload"
    scope.fill("")
    page.get_by_role("button", name="Create in draft").click()
    expect(scope_field.locator(".field-error")).to_contain_text("Nothing chosen")
    expect(scope_field.locator(".field-error")).to_contain_text("All workloads")
    assert estate.api.get("/rulesets/billing-prod").status_code == 404

    # an empty rule side is an error too
    consumers_chip = page.locator(".rule-card .selector-list").first.locator('[data-label="role=web"] button')
    consumers_chip.click()
    pick(page, scope, "app=shop", "label:app=shop")
    page.get_by_role("button", name="Create in draft").click()
    expect(page.locator(".rule-card .field-error").first).to_contain_text("Nothing chosen")
    assert estate.api.get("/rulesets/billing-prod").status_code == 404
    pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "role=web", "label:role=web")

    # "All workloads" is an explicit choice, with a visible warning, saved as "all"
    scope_field.get_by_label("Selector 1 kind").select_option("all")
    warning = scope_field.locator('[data-role="all-warning"]')
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("governs every workload")
    page.screenshot(path=str(screenshots / "ruleset-all-workloads.png"), full_page=True)
    page.get_by_role("button", name="Create in draft").click()
    expect(page.get_by_text(re.compile(r"Saved \(revision \d+\)"))).to_be_visible()
    assert estate.get("/rulesets/billing-prod")["body"]["scope"] == "all"
    page.reload()
    expect(page.locator('.field:has(> .label strong:text-is("Scope")) [data-role="all-warning"]')).to_be_visible()
    estate.api.delete("/rulesets/billing-prod")


def test_unfinished_label_on_a_new_workload_is_an_error(owner_page: Any, estate: Console) -> None:
    page = owner_page
    page.goto("/#/workloads/new")
    page.get_by_label("Name", exact=True).fill("billing-web-1")
    labels = page.get_by_role("combobox", name="Labels", exact=True)
    pick(page, labels, "role=web", "label:role=web")
    labels.fill("app=billing")
    page.get_by_role("button", name=re.compile("^(Create|Add|Save)")).first.click()
    expect(page.locator(".field-error")).to_contain_text("billing is not an allowed value of app")
    assert estate.api.get("/workloads/billing-web-1").status_code == 404


def test_picker_says_why_and_an_owner_adds_the_value(owner_page: Any, estate: Console, screenshots: Path) -> None:
    page = owner_page
    page.goto("/#/rulesets/new")
    scope = _scope(page)
    scope.click()
    scope.fill("app=billing")
    listbox = page.locator(f"#{scope.get_attribute('aria-controls')}")
    expect(listbox).to_contain_text("app=billing: billing is not an allowed value of app.")
    add = listbox.locator('[role=option][data-key="add-value:app=billing"]')
    expect(add).to_contain_text("Add “billing” to the allowed values of app")
    page.screenshot(path=str(screenshots / "picker-not-allowed-value.png"))
    add.click()
    expect(page.locator('.picker [data-label="app=billing"]').first).to_be_visible()
    assert "billing" in estate.get("/label-keys/app")["body"]["values"]

    # and from the Labels page
    page.goto("/#/labels")
    form = page.get_by_role("form", name="Add an allowed value to app")
    form.get_by_label("New allowed value of app").fill("crm")
    form.get_by_role("button", name="Add value").click()
    expect(page.locator('[data-allowed="app"]')).to_contain_text("crm")
    assert "crm" in estate.get("/label-keys/app")["body"]["values"]


def test_read_only_and_ruleset_manager_get_the_reason_without_the_action(reader_page: Any, manager_page: Any) -> None:
    # a read-only user: the workload filter explains, offers nothing
    reader_page.goto("/#/workloads")
    flt = reader_page.get_by_role("combobox", name="Labels (all must match)", exact=True)
    flt.click()
    flt.fill("app=payroll")
    listbox = reader_page.locator(f"#{flt.get_attribute('aria-controls')}")
    expect(listbox).to_contain_text("payroll is not an allowed value of app")
    expect(listbox).to_contain_text("An owner or admin can add it")
    expect(listbox.locator('[data-key^="add-value:"]')).to_have_count(0)
    reader_page.goto("/#/labels")
    expect(reader_page.get_by_text("Only owners and admins can declare keys or add allowed values.")).to_be_visible()
    expect(reader_page.get_by_role("button", name="Add value")).to_have_count(0)

    # a ruleset-manager writes rulesets but not label keys: the reason, no action
    page = manager_page
    page.goto("/#/rulesets/new")
    scope = _scope(page)
    scope.click()
    scope.fill("app=payroll")
    listbox = page.locator(f"#{scope.get_attribute('aria-controls')}")
    expect(listbox).to_contain_text("payroll is not an allowed value of app")
    expect(listbox.locator('[data-key^="add-value:"]')).to_have_count(0)


def test_login_failures_say_what_went_wrong(browser: Any) -> None:
    with running_controller(extra_args=("--login-limit", "3")) as c:  # the harness used one attempt
        ctx = new_context(browser, c, None)
        page = ctx.new_page()
        try:
            page.goto("/")
            page.get_by_label("Username").fill(c.username)
            page.get_by_label("Password", exact=True).fill("not-the-password")
            page.get_by_role("button", name="Log in").click()
            summary = page.locator(".form-errors")
            expect(summary.locator("h2")).to_have_text("Wrong user name or password")
            expect(summary).not_to_contain_text("Could not save")
            expect(page.get_by_role("heading", name="Log in to Stockade")).to_be_visible()
            page.get_by_role("button", name="Log in").click()
            expect(summary.locator("h2")).to_have_text("Wrong user name or password")
            page.get_by_label("Password", exact=True).fill(c.password)  # right, but too late
            page.get_by_role("button", name="Log in").click()
            expect(summary.locator("h2")).to_have_text(re.compile(r"^Too many attempts, try again in \d+ s$"))
            expect(summary).not_to_contain_text("Could not save")
        finally:
            ctx.close()


def test_provisioning_a_widening_asks_first_and_says_it_in_words(owner_page: Any, estate: Console,
                                                                   screenshots: Path) -> None:
    page = owner_page
    page.goto("/#/rulesets/new")
    page.get_by_label("Name", exact=True).fill("billing-all")
    scope_field = page.locator('.field:has(> .label strong:text-is("Scope"))')
    scope_field.get_by_label("Selector 1 kind").select_option("all")
    pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "role=workstation", "label:role=workstation")
    pick(page, page.get_by_role("combobox", name="Providers", exact=True), "role=web", "label:role=web")
    pick(page, page.get_by_role("combobox", name="Services", exact=True), "https", "https")
    page.get_by_role("button", name="Create in draft").click()
    page.get_by_role("link", name="Review the draft and provision →").click()

    # the preview says, in words, what the draft newly allows and which rule reaches more workloads
    allowed = page.locator('[data-role="impact-panel"] [data-role="impact-allowed"]')
    expect(allowed).to_contain_text(
        "dev-laptop-1 -> newdev-web-1 443/tcp becomes allowed by ruleset billing-all rule 1")
    widened = page.locator('[data-role="impact-panel"] [data-role="impact-widened"]')
    expect(widened).to_contain_text("ruleset billing-all rule 1 is new and reaches")
    expect(widened).to_contain_text("every app and environment")

    before = estate.get("/policy/versions", limit=1)["items"][0]["number"]
    page.get_by_label("Message").fill("billing for everyone")
    page.get_by_role("button", name="Provision").click()
    dialog = page.get_by_role("dialog", name="Provision this version?")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("newly allow 1 recorded connection")
    expect(dialog.locator('[data-role="impact-allowed"]')).to_contain_text("dev-laptop-1 -> newdev-web-1 443/tcp")
    expect(dialog).not_to_contain_text("proceed")
    page.screenshot(path=str(screenshots / "provision-confirm-widening.png"))
    dialog.get_by_role("button", name="Cancel").click()
    expect(page.locator('[data-role="not-provisioned"]')).to_be_visible()
    assert estate.get("/policy/versions", limit=1)["items"][0]["number"] == before

    page.get_by_role("button", name="Provision").click()
    dialog.get_by_role("button", name="Provision anyway").click()
    expect(page.get_by_text(f"Version {before + 1} provisioned.")).to_be_visible()
    expect(page.locator("body")).not_to_contain_text("proceed=true")
    expect(page.locator("body")).not_to_contain_text("Could not save")
