"""The map's connections and layout, as a user meets them (issue 14, item 13).

* A connection's label shows a count per verdict (3 allowed + 1 blocked, not only "blocked")
  and its services; the line keeps the worst verdict's colour and dash.
* Connections are reachable from the keyboard: Tab to a group, the arrow keys to the
  connection, Enter opens its detail; the detail table is not clipped.
* Groups stay put when a group appears, on the open map and after a reload.
* ``prefers-color-scheme: dark`` gives the dark theme.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import new_context
from tests.browser.cvd import contrast_ratio, parse_hex, relative_luminance
from tests.browser.harness import Console, workload
from tests.browser.test_map_colour import LEDGER, MIXED, VAULT, mixed_estate, open_map

pytestmark = pytest.mark.browser
__all__ = ["mixed_estate"]  # the fixture, shared with test_map_colour.py


def test_an_edge_shows_a_count_per_verdict_and_its_services(page: Any, mixed_estate: None) -> None:
    open_map(page)
    label = page.locator(f'[data-edge-label="{MIXED}"]')
    expect(label.locator('[data-mix="allowed"]')).to_have_text("3")
    expect(label.locator('[data-mix="blocked"]')).to_have_text("1")
    expect(label.locator('[data-mix="potentially-blocked"]')).to_have_count(0)
    expect(label.locator(".edge-services")).to_have_text("22/tcp, 5432/tcp")
    name = label.get_attribute("aria-label") or ""
    assert "3 allowed" in name and "1 blocked" in name and "5432/tcp" in name, name
    # the line: the worst verdict, by colour and dash
    line = page.locator(f'[data-edge="{MIXED}"]')
    expect(line).to_have_attribute("data-verdict", "blocked")
    assert page.evaluate("(el) => getComputedStyle(el).strokeDasharray", line.element_handle()) not in ("none", "")


def test_an_edge_from_the_keyboard_and_its_detail_unclipped(page: Any, mixed_estate: None, screenshots: Path) -> None:
    svg = open_map(page)
    svg.focus()
    expect(svg).to_be_focused()
    page.keyboard.press("Tab")
    first = page.evaluate("document.activeElement.dataset.node")
    assert first, "Tab goes to the first group"
    # arrows walk the groups, then the connections
    for _ in range(200):
        page.keyboard.press("ArrowRight")
        if page.evaluate("document.activeElement.dataset.edgeLabel") == MIXED:
            break
    else:
        pytest.fail("the arrow keys never reached the ledger -> vault connection")
    page.keyboard.press("Enter")
    side = page.locator(".map-side")
    expect(side.locator("h2")).to_have_text("ledger/qa → vault/qa")
    expect(side.locator("[data-role=edge-mix]")).to_contain_text("× 3")
    expect(side.locator("[data-role=edge-mix]")).to_contain_text("× 1")
    expect(side.locator("[data-role=edge-services]")).to_contain_text("22/tcp, 5432/tcp")
    table = page.locator("[data-role=edge-flows] table")
    expect(table.locator("tbody tr")).to_have_count(4)
    table.scroll_into_view_if_needed()
    # nothing clipped: the table fits its panel and the window, every column is visible
    fit = page.evaluate("""() => {
      const t = document.querySelector("[data-role=edge-flows] table");
      const panel = t.closest(".edge-detail");
      const p = panel.getBoundingClientRect(); const r = t.getBoundingClientRect();
      const cells = [...t.querySelectorAll("th")].map((c) => c.getBoundingClientRect());
      return { tableRight: r.right, panelRight: p.right, scroll: panel.scrollWidth, client: panel.clientWidth,
               window: document.documentElement.clientWidth, narrowest: Math.min(...cells.map((c) => c.width)) };
    }""")
    assert fit["tableRight"] <= fit["panelRight"] + 0.5, fit
    assert fit["scroll"] <= fit["client"], fit
    assert fit["panelRight"] <= fit["window"], fit
    assert fit["narrowest"] > 20, fit
    page.screenshot(path=str(screenshots / "map-edge-detail.png"), full_page=True)
    # Enter on a group from the keyboard still opens the group
    page.locator(f'[data-node="{VAULT}"]').focus()
    page.keyboard.press("Enter")
    expect(side.locator("h2")).to_contain_text("vault/qa")


def node_positions(page: Any) -> dict[str, str]:
    return dict(page.evaluate("""() => [...document.querySelectorAll("svg.map [data-node]")]
      .map((g) => [g.dataset.node, g.getAttribute("transform")])"""))


def test_groups_stay_put_when_a_group_appears(page: Any, console: Console, mixed_estate: None) -> None:
    open_map(page)
    before = node_positions(page)
    assert LEDGER in before and VAULT in before
    app = f"newapp{uuid.uuid4().hex[:6]}"
    console.post("/workloads", workload(f"{app}-1", {"role": "web", "app": app, "env": "qa"}, "10.8.9.9"))
    try:
        new = f"group:app={app},env=qa"
        expect(page.locator(f'[data-node="{new}"]')).to_be_visible()  # the open map follows the event feed
        after = node_positions(page)
        assert {k: after[k] for k in before} == before  # nothing moved
        # and after a reload (positions remembered in this browser), the same picture
        page.reload()
        open_map(page)
        expect(page.locator(f'[data-node="{new}"]')).to_be_visible()
        reloaded = node_positions(page)
        assert {k: reloaded[k] for k in after} == after
    finally:
        console.api.delete(f"/workloads/{app}-1")


def test_dark_colour_scheme_is_honoured(browser: Any, console: Console, session_cookie: str,
                                        mixed_estate: None, screenshots: Path) -> None:
    ctx = new_context(browser, console, session_cookie, color_scheme="dark")
    try:
        page = ctx.new_page()
        open_map(page)
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        colours = page.evaluate("""() => {
          const hex = (n) => Number(n).toString(16).padStart(2, "0");
          const rgb = (c) => "#" + c.match(/\\d+/g).slice(0, 3).map(hex).join("");
          const cs = (sel) => getComputedStyle(document.querySelector(sel));
          return { body: rgb(cs("body").backgroundColor), text: rgb(cs("body").color),
                   map: rgb(cs(".map-wrap").backgroundColor), node: rgb(cs("svg.map .node rect").fill),
                   label: rgb(cs("svg.map .edge-label-bg").fill) };
        }""")
        for where in ("body", "map", "node", "label"):
            assert relative_luminance(parse_hex(colours[where])) < 0.05, colours
        assert contrast_ratio(parse_hex(colours["text"]), parse_hex(colours["body"])) >= 7, colours
        page.screenshot(path=str(screenshots / "map-dark.png"))
        # the system switches to light and back: the console follows without a reload
        page.emulate_media(color_scheme="light")
        expect(page.locator("html")).to_have_attribute("data-theme", "light")
        page.emulate_media(color_scheme="dark")
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        # an explicit choice in the display settings still wins over the system
        page.goto("/#/settings")
        page.get_by_label("Light", exact=True).check()
        expect(page.locator("html")).to_have_attribute("data-theme", "light")
        page.get_by_label("Dark", exact=True).check()
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    finally:
        ctx.close()


def test_remembered_places_that_collide_are_laid_out_again(page: Any, mixed_estate: None) -> None:
    """Two groups remembered at one spot (from visits that never saw both) do not overlap."""
    page.add_init_script(f"""window.localStorage.setItem("stockade.map.positions",
        JSON.stringify({{"{LEDGER}": [0, 0], "{VAULT}": [0, 0]}}));""")
    open_map(page)
    a = page.locator(f'[data-node="{LEDGER}"] rect').bounding_box()
    b = page.locator(f'[data-node="{VAULT}"] rect').bounding_box()
    assert a and b
    apart = (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
             or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])
    assert apart, (a, b)
    assert node_positions(page)[LEDGER] == "translate(-75.0 -23.0)"  # the first keeps its remembered place
