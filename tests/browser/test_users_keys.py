"""The Users and API keys pages, as an owner uses them, and hidden from everyone else.

Through the console only (the API is used to check the effect, as another client would see it):
an owner creates a user (a too-short password is refused beside its field), changes the user's
role, scope and password, disables and re-enables it, deletes it; creates an API key whose secret
is shown once with a working copy button, uses that key, revokes it and sees it refused. An
admin sees neither nav entry and gets a plain "owners only" page. axe-core finds no serious
violation on either page, nor in the dialog showing a new key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import checked_page, new_context
from tests.browser.harness import Console
from tests.browser.test_a11y import fetch_axe, run_axe, settle

pytestmark = pytest.mark.browser


def login_status(console: Console, user: str, password: str) -> int:
    return httpx.post(f"{console.url}/api/v1/auth/login", json={"username": user, "password": password}).status_code


def nav(page: Any) -> Any:
    return page.locator("#nav")


def test_an_owner_manages_a_user_from_create_to_delete(page: Any, console: Console) -> None:
    page.goto("/#/users")
    expect(page.get_by_role("heading", name="Users", exact=True).first).to_be_visible()
    expect(nav(page).get_by_role("link", name="Users")).to_be_visible()
    expect(nav(page).get_by_role("link", name="API keys")).to_be_visible()
    expect(page.locator(f'[data-user="{console.username}"]')).to_contain_text("owner")

    form = page.locator("form", has=page.get_by_role("heading", name="New user"))
    form.get_by_label("Username").fill("alice-ops")
    form.get_by_label("Password").fill("short")
    form.get_by_role("button", name="Create user").click()
    # refused beside the password field, and nothing is created
    expect(form.locator('.field-error[data-for="password"]')).to_be_visible()
    expect(form.get_by_label("Password")).to_have_attribute("aria-invalid", "true")
    assert all(u["username"] != "alice-ops" for u in console.get("/users"))

    form.get_by_label("Password").fill("first-password-123")
    form.get_by_label("Role").select_option("read-only")
    form.get_by_role("button", name="Create user").click()
    row = page.locator('[data-user="alice-ops"]')
    expect(row).to_contain_text("read-only")
    assert login_status(console, "alice-ops", "first-password-123") == 200

    # role, scope and password in one edit
    row.get_by_role("button", name="Edit alice-ops").click()
    dialog = page.locator("[data-role=edit-user]")
    dialog.get_by_label("Role").select_option("ruleset-manager")
    dialog.get_by_label("Scope (labels, for ruleset managers)").fill("app=shop, env=prod")
    dialog.get_by_label("New password (optional)").fill("second-password-456")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_have_count(0)
    expect(row).to_contain_text("ruleset-manager")
    expect(row).to_contain_text("app=shop, env=prod")
    alice = next(u for u in console.get("/users") if u["username"] == "alice-ops")
    assert alice["role"] == "ruleset-manager" and alice["scope"] == ["app=shop", "env=prod"]
    assert login_status(console, "alice-ops", "first-password-123") == 401
    assert login_status(console, "alice-ops", "second-password-456") == 200

    # disable (after a confirmation), then enable again
    row.get_by_role("button", name="Disable alice-ops").click()
    page.locator("dialog.confirm").get_by_role("button", name="Disable").click()
    expect(row).to_contain_text("disabled")
    assert login_status(console, "alice-ops", "second-password-456") in (401, 403)
    row.get_by_role("button", name="Enable alice-ops").click()
    expect(row).not_to_contain_text("disabled")
    assert login_status(console, "alice-ops", "second-password-456") == 200

    # cancel keeps the user; delete removes it
    row.get_by_role("button", name="Delete alice-ops").click()
    page.locator("dialog.confirm").get_by_role("button", name="Cancel").click()
    expect(row).to_be_visible()
    row.get_by_role("button", name="Delete alice-ops").click()
    page.locator("dialog.confirm").get_by_role("button", name="Delete user").click()
    expect(page.locator('[data-user="alice-ops"]')).to_have_count(0)
    assert console.api.get("/users/alice-ops").status_code == 404
    actions = [e["action"] for e in console.get("/events", limit=200)["items"]
               if e["kind"] == "user" and e["name"] == "alice-ops"]
    assert {"user.create", "user.update", "user.delete"} <= set(actions)


def test_an_owner_creates_copies_uses_and_revokes_an_api_key(page: Any, console: Console) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto("/#/keys")
    expect(page.get_by_role("heading", name="API keys", exact=True).first).to_be_visible()
    form = page.locator("form", has=page.get_by_role("heading", name="New API key"))
    form.get_by_label("Name").fill("bad name!")
    form.get_by_role("button", name="Create key").click()
    expect(form.locator('.field-error[data-for="name"]')).to_be_visible()

    form.get_by_label("Name").fill("ci-deploy")
    form.get_by_label("Role").select_option("read-only")
    form.get_by_role("button", name="Create key").click()
    dialog = page.locator("[data-role=api-key-secret]")
    expect(dialog).to_contain_text("Shown once")
    secret = dialog.locator("[data-role=api-key]").inner_text().strip()
    assert secret.startswith("stk_")
    dialog.get_by_role("button", name="Copy").click()
    expect(dialog.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == secret

    bearer = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{console.url}/api/v1/workloads", headers=bearer).status_code == 200
    assert httpx.get(f"{console.url}/api/v1/users", headers=bearer).status_code == 403  # read-only key
    dialog.get_by_role("button", name="Done").click()
    expect(dialog).to_have_count(0)
    assert secret not in page.content()  # shown once: gone with the dialog

    key_id = next(k["id"] for k in console.get("/api-keys") if k["name"] == "ci-deploy" and not k["revoked_at"])
    row = page.locator(f'[data-key="{key_id}"]')
    expect(row).to_contain_text("active")
    row.get_by_role("button", name="Revoke").click()
    page.locator("dialog.confirm").get_by_role("button", name="Revoke key").click()
    expect(row).to_contain_text("revoked")
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    assert httpx.get(f"{console.url}/api/v1/workloads", headers=bearer).status_code == 401


@pytest.fixture
def admin_page(browser: Any, console: Console) -> Iterator[Any]:
    if all(u["username"] != "ada-admin" for u in console.get("/users")):
        console.post("/users", {"username": "ada-admin", "password": "admin-password-789", "role": "admin"})
    r = httpx.post(f"{console.url}/api/v1/auth/login", json={"username": "ada-admin", "password": "admin-password-789"})
    r.raise_for_status()
    yield from checked_page(browser, console, str(r.cookies["stockade_session"]))


def test_other_roles_see_no_users_or_keys(admin_page: Any) -> None:
    page = admin_page
    page.goto("/#/workloads")
    expect(nav(page).get_by_role("link", name="Workloads")).to_be_visible()
    expect(nav(page).get_by_role("link", name="Users")).to_have_count(0)
    expect(nav(page).get_by_role("link", name="API keys")).to_have_count(0)
    for route, what in (("/#/users", "users"), ("/#/keys", "api keys")):
        page.goto(route)
        expect(page.locator("#view .notice")).to_contain_text(f"Only owners manage {what}")
        expect(page.locator("#view table")).to_have_count(0)


@pytest.fixture
def axe_context(browser: Any, console: Console, session_cookie: str) -> Iterator[Any]:
    ctx = new_context(browser, console, session_cookie, bypass_csp=True)  # only to inject axe-core
    try:
        yield ctx
    finally:
        ctx.close()


def test_no_serious_axe_violation_on_users_and_keys(axe_context: Any, screenshots: Path) -> None:
    source = fetch_axe()
    page = axe_context.new_page()
    failures = []
    for name, route, heading in (("users", "#/users", "Users"), ("keys", "#/keys", "API keys")):
        page.goto(f"/{route}")
        settle(page, heading)
        page.screenshot(path=str(screenshots / f"light-{name}.png"), full_page=True)
        failures += [(name, v) for v in run_axe(page, source) if v["impact"] in ("serious", "critical")]
    form = page.locator("form", has=page.get_by_role("heading", name="New API key"))
    form.get_by_label("Name").fill("axe-check")
    form.get_by_role("button", name="Create key").click()
    expect(page.locator("[data-role=api-key-secret]")).to_be_visible()
    page.screenshot(path=str(screenshots / "light-key-secret.png"))
    failures += [("key-secret", v) for v in run_axe(page, source) if v["impact"] in ("serious", "critical")]
    assert not failures, "\n".join(f"{n}: {v['id']} ({v['impact']}): {v['help']}\n    " + "\n    ".join(v["nodes"])
                                   for n, v in failures)


SLOW_PAGES = ("workloads", "labels", "rulesets", "deny-rules", "objects", "map", "explorer", "policy", "versions",
              "agents", "events")  # every page that loads data (settings loads none: nothing to race)


@pytest.mark.parametrize("left", SLOW_PAGES)
def test_a_page_left_before_its_data_arrives_writes_nothing_into_the_next(admin_page: Any, left: str) -> None:
    """Every page, left while its API calls are still out, must not write into the page that replaced it
    (under load, the workloads list's table once landed under the users page's notice)."""
    page = admin_page
    page.goto("/#/users")
    expect(page.locator("#view .notice")).to_contain_text("Only owners manage users")
    held: list[Any] = []

    def hold(route: Any) -> None:
        held.append(route)

    page.route("**/api/v1/**", hold)  # hold every API call of the page about to be left
    page.evaluate(f"location.hash = '#/{left}'")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(20)
    assert held, f"#/{left} made no API call: nothing to race"
    page.evaluate("location.hash = '#/keys'")
    expect(page.locator("#view .notice")).to_contain_text("Only owners manage api keys")
    released = len(held)
    for route in held[:released]:  # the left page's data arrives now, after it was left
        route.continue_()
    page.wait_for_timeout(1000)
    expect(page.locator("#view h1")).to_have_count(1)
    expect(page.locator("#view h1")).to_have_text("API keys")
    expect(page.locator("#view table")).to_have_count(0)
    expect(page.locator("#view [role=search], #view form, #view svg")).to_have_count(0)
