"""``encrypt: true`` in the console, through the user's path (issue 20).

An operator opens the shop's ruleset, ticks "Encrypt" on its rule (the sentence says so), saves
and provisions; the ruleset list says which rules encrypt; reopening and saving the ruleset keeps
the flag (the editor used to drop it: a re-save sent the rule in the clear). Once both ends have
registered WireGuard keys, "Why?" on a recorded flow in the Explorer says "encrypted (WireGuard)
by ruleset shop-prod rule 1". A controller of its own: provisioning here must not change the estate
the other browser modules share.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import checked_page
from tests.browser.harness import Console, enroll, flow, running_controller, seed_estate
from tests.browser.test_console import provision_in_console

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def enc_console() -> Iterator[Console]:
    with running_controller() as c:
        seed_estate(c)
        yield c


@pytest.fixture
def enc_page(browser: Any, enc_console: Console) -> Iterator[Any]:
    yield from checked_page(browser, enc_console, enc_console.session_cookie())


def register_key(c: Console, hostname: str) -> Any:
    """Enrol a simulated agent for ``hostname`` (the seed's agent revoked first) and register a
    WireGuard public key as the agent does."""
    for a in c.get("/agents", workload=hostname):
        if not a["revoked"]:
            c.check(c.api.post(f"/agents/{a['id']}/revoke"))
    agent = enroll(c, hostname)
    key = base64.b64encode(os.urandom(32)).decode()
    r = httpx.put(f"{c.url}/api/v1/agents/{agent.agent_id}/wireguard-key", json={"public_key": key},
                  headers={"Authorization": f"Bearer {agent.token}"}, timeout=60)
    assert r.status_code == 204, r.text
    return agent


def test_encrypt_a_rule_see_it_listed_kept_and_explained(enc_page: Any, enc_console: Console) -> None:
    page, c = enc_page, enc_console
    page.goto("/#/rulesets/shop-prod")
    card = page.locator(".rule-card").first
    sentence = card.locator(".rule-sentence")
    expect(sentence).to_contain_text("may reach")
    expect(sentence.locator("[data-role=rule-encrypted]")).to_have_count(0)
    card.get_by_label(re.compile("^Encrypt: only through WireGuard")).check()
    expect(sentence.locator("[data-role=rule-encrypted]")).to_contain_text("encrypted (WireGuard)")
    page.get_by_role("button", name="Save to draft").click()
    expect(page.get_by_text(re.compile(r"Saved \(revision \d+\)"))).to_be_visible()
    body = c.get("/rulesets/shop-prod")["body"]
    assert body["rules"][0]["encrypt"] is True and "encrypt" not in body
    assert body["rules"][0]["services"] == ["postgres"]  # nothing else lost

    # the list says which rules encrypt
    page.goto("/#/rulesets")
    row = page.locator("table.data tbody tr", has=page.get_by_role("link", name="shop-prod"))
    expect(row.locator("[data-role=ruleset-encrypted]")).to_contain_text("WireGuard: rule 1")

    # reopened, the box is ticked, and a re-save keeps encrypt (the editor used to drop it)
    page.goto("/#/rulesets/shop-prod")
    box = page.locator(".rule-card").first.get_by_label(re.compile("^Encrypt: only through WireGuard"))
    expect(box).to_be_checked()
    page.get_by_label("Description").fill("shop: web to db, encrypted")
    page.get_by_role("button", name="Save to draft").click()
    expect(page.get_by_text(re.compile(r"Saved \(revision \d+\)"))).to_be_visible()
    assert c.get("/rulesets/shop-prod")["body"]["rules"][0]["encrypt"] is True

    page.goto("/#/policy")
    page.get_by_label("Message").fill("encrypt the shop's database traffic")
    provision_in_console(page)

    if not c.has_visibility():
        return
    # both ends hold a key: the evaluator says encrypted, and "Why?" shows it with the deciding rule
    register_key(c, "shop-web-2")
    db = register_key(c, "shop-db-1")
    db.report([flow("10.1.0.12", "10.1.0.21", 5432, "allowed", "ruleset/shop-prod/0", count=3)])
    page.goto("/#/explorer")
    why = page.get_by_role("button", name=re.compile(r"^Why\? Explain the flow from shop-web-2 to shop-db-1")).first
    why.click()
    panel = page.locator("section", has=page.get_by_role("heading", name=re.compile("^Why: shop-web-2")))
    badge = panel.locator("[data-role=encrypted]")
    expect(badge).to_contain_text("encrypted (WireGuard)")
    expect(badge).to_contain_text("by ruleset shop-prod rule 1")
    expect(panel.locator("table")).to_contain_text("encrypted (WireGuard)")


def test_the_map_draws_a_lock_on_connections_the_policy_encrypts(enc_page: Any, enc_console: Console) -> None:
    """The map's edge says "encrypted" by a lock in its label, a heavier line and its accessible name
    (never by colour alone); an edge the policy leaves in the clear has none. Builds on the state the
    test above leaves (rule 1 of shop-prod encrypts, shop-web-2 and shop-db-1 hold keys, a flow)."""
    page, c = enc_page, enc_console
    if not c.has_visibility():
        pytest.skip("the controller has no flow store")
    if not c.get("/rulesets/shop-prod")["body"]["rules"][0].get("encrypt"):
        pytest.skip("needs the state test_encrypt_a_rule_see_it_listed_kept_and_explained leaves (run the module)")
    edges = c.get("/flows/map", keys="app,env")["edges"]
    locked = [e for e in edges if e["encrypted"]]
    clear = [e for e in edges if not e["encrypted"] and e["connections"]]
    assert len(locked) == 1 and clear, edges
    # web-2 -> db:5432 encrypts; web-1 has no key, so its connection is no encrypted one
    assert 0 < locked[0]["encrypted"] < locked[0]["connections"]
    page.goto("/#/map")
    expect(page.locator("svg.map")).to_have_attribute("data-ready", "true")
    key = f'{locked[0]["src"]}->{locked[0]["dst"]}'
    label = page.locator(f'[data-edge-label="{key}"]')
    expect(label.locator("[data-role=edge-lock]")).to_have_count(1)
    expect(label).to_have_attribute("aria-label", re.compile(
        rf"encrypted \(WireGuard\): {locked[0]['encrypted']} of {locked[0]['connections']} connections"))
    line = page.locator(f'path.edge[data-edge="{key}"]')
    expect(line).to_have_class(re.compile(r"\bencrypted\b"))
    expect(line).to_have_attribute("data-encrypted", str(locked[0]["encrypted"]))
    for e in clear:
        other = f'{e["src"]}->{e["dst"]}'
        expect(page.locator(f'[data-edge-label="{other}"] [data-role=edge-lock]')).to_have_count(0)
        expect(page.locator(f'path.edge[data-edge="{other}"]')).not_to_have_class(re.compile(r"\bencrypted\b"))
