"""The map's colours as rendered, under every colour-vision deficiency Chromium emulates.

Chromium emulates protanopia, deuteranopia, tritanopia and achromatopsia
(``Emulation.setEmulatedVisionDeficiency``, applied to what is painted, screenshots included);
greyscale is CSS ``filter: grayscale(1)`` on the page. For each, in the light and the dark
scheme, the test screenshots the legend and the map's connection labels, reads the pixels and
finds each verdict's colour as painted (the dominant non-background colour of its legend line,
its legend icon and the icons on the connection labels), then requires every pair of verdicts to
keep a CIEDE2000 difference of at least :data:`MIN_DELTA_E`. 12 is the threshold of
``test_palette.py``: above the ~10 at which two small patches differ at a glance, with room for
the screenshot's rounding (under 1). Screenshots go to ``out/screenshots/map-<scheme>-<view>.png``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import new_context
from tests.browser.cvd import Image, as_rgb, decode_png, delta_e2000, dominant_colour, to_lab
from tests.browser.harness import Console, enroll, flow, workload

pytestmark = pytest.mark.browser

VERDICTS = ("allowed", "potentially-blocked", "blocked")
EMULATIONS = ("none", "protanopia", "deuteranopia", "tritanopia", "achromatopsia", "greyscale")
MIN_DELTA_E = 12.0
LEDGER = "group:app=ledger,env=qa"
VAULT = "group:app=vault,env=qa"
AUDIT = "group:app=audit,env=qa"
MIXED = f"{LEDGER}->{VAULT}"


@pytest.fixture(scope="session")
def mixed_estate(console: Console) -> None:
    """ledger -> vault: 3 allowed connections on 5432/tcp and 1 blocked on 22/tcp; ledger -> audit: potentially blocked.

    Idempotent (test_map_edges.py imports it too).
    """
    if not console.has_visibility():
        pytest.skip("this controller does not serve the visibility API (flows, map, impact)")
    if console.api.get("/workloads/vault-db-1").status_code == 200:
        return
    for w in (workload("ledger-web-1", {"role": "web", "app": "ledger", "env": "qa"}, "10.8.0.11"),
              workload("ledger-web-2", {"role": "web", "app": "ledger", "env": "qa"}, "10.8.0.12"),
              workload("ledger-web-3", {"role": "web", "app": "ledger", "env": "qa"}, "10.8.0.13"),
              workload("vault-db-1", {"role": "db", "app": "vault", "env": "qa"}, "10.8.1.21"),
              workload("audit-log-1", {"role": "log", "app": "audit", "env": "qa"}, "10.8.2.31")):
        console.post("/workloads", w)
    enroll(console, "vault-db-1").report(
        [flow(f"10.8.0.1{i}", "10.8.1.21", 5432, "allowed", "default", count=5, ago=300) for i in (1, 2, 3)]
        + [flow("10.8.0.11", "10.8.1.21", 22, "blocked", "default", count=2, ago=300)])
    enroll(console, "audit-log-1").report([flow("10.8.0.11", "10.8.2.31", 514, "potentially-blocked", "default",
                                                count=3, ago=300)])


def open_map(page: Any) -> Any:
    page.goto("/#/map")
    svg = page.locator("svg.map")
    expect(svg).to_have_attribute("data-ready", "true")
    expect(page.locator(f'[data-edge-label="{MIXED}"]')).to_be_visible()
    return svg


def boxes(page: Any) -> dict[str, list[dict[str, float]]]:
    """Per verdict, the boxes (CSS px) of the elements painted in its colour."""
    found: dict[str, list[dict[str, float]]] = page.evaluate("""([verdicts, ours]) => {
      const box = (el) => { const r = el.getBoundingClientRect(); return { x: r.x, y: r.y, w: r.width, h: r.height }; };
      // an edge label drawn faded (a busy map de-emphasises the ones not in focus) is not the palette's colour
      const opaque = (el) => { for (let n = el; n && n.nodeType === 1; n = n.parentNode) {
        if (parseFloat(getComputedStyle(n).opacity) < 1) return false; } return true; };
      // a label another label is drawn over (a busy shared map) shows that one's colours, not its own
      const onTop = (el) => { const r = el.getBoundingClientRect();
        const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        return hit !== null && (hit === el || el.contains(hit)); };
      // a map zoomed out to fit many groups draws icons a few pixels wide: all edge, no colour to read
      const big = (el) => { const r = el.getBoundingClientRect(); return r.width >= 9 && r.height >= 9; };
      const out = {};
      for (const v of verdicts) {
        out[v] = [
          ...[...document.querySelectorAll(`.map-legend .legend-line.v-${v}`)].map(box),
          ...[...document.querySelectorAll(`.map-legend .verdict.v-${v} .icon`)].map(box),
          ...[...document.querySelectorAll(`svg.map [data-edge-label^="${ours}"] .mix.v-${v} .mix-icon`)]
            .filter(opaque).filter(onTop).filter(big).slice(0, 2).map(box),
        ];
      }
      return out;
    }""", [list(VERDICTS), f"{LEDGER}->"])
    return found


def measured(shot: Image, b: dict[str, float]) -> tuple[int, int, int]:
    """The colour painted in box ``b``: its dominant colour other than the background beside it."""
    x0, y0 = int(b["x"]), int(b["y"])
    x1, y1 = math.ceil(b["x"] + b["w"]), math.ceil(b["y"] + b["h"])
    inner = shot.region(x0, y0, x1, y1)
    beside = shot.region(x0 - 5, y0 - 5, x0 - 1, y1 + 5) + shot.region(x1 + 1, y0 - 5, x1 + 5, y1 + 5)
    return dominant_colour(inner, beside or inner)


def steady_shot(page: Any) -> tuple[Image, dict[str, list[dict[str, float]]]]:
    """A screenshot and the boxes it shows: the map follows the event feed and may lay itself out
    again at any time (the worker's estate is shared), so the boxes are read before and after the
    screenshot and a shot taken while anything moved is taken again."""
    for _ in range(10):
        before = boxes(page)
        shot = decode_png(page.screenshot())
        if boxes(page) == before:
            return shot, before
        page.wait_for_timeout(300)
    raise AssertionError("the map kept moving: no steady screenshot in 10 tries")


def emulate(page: Any, cdp: Any, view: str) -> None:
    cdp.send("Emulation.setEmulatedVisionDeficiency", {"type": "none" if view == "greyscale" else view})
    # through the CSSOM: the console's Content-Security-Policy refuses inline <style>
    page.evaluate("(grey) => { document.body.style.filter = grey ? 'grayscale(1)' : ''; }", view == "greyscale")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_verdicts_stay_apart_under_every_emulation(browser: Any, console: Console, session_cookie: str,
                                                   mixed_estate: None, screenshots: Path, scheme: str) -> None:
    ctx = new_context(browser, console, session_cookie, color_scheme=scheme)
    try:
        page = ctx.new_page()
        open_map(page)
        assert page.evaluate("document.documentElement.dataset.theme") == scheme  # follows the system
        where = boxes(page)
        assert all(len(where[v]) >= 2 for v in VERDICTS), where
        cdp = ctx.new_cdp_session(page)
        typical: dict[str, tuple[int, int, int]] = {}
        failures: list[str] = []
        weakest: dict[str, float] = {}
        for view in EMULATIONS:
            emulate(page, cdp, view)
            page.screenshot(path=str(screenshots / f"map-{scheme}-{view}.png"))
            shot, where = steady_shot(page)
            assert all(len(where[v]) >= 2 for v in VERDICTS), where
            colours = {v: [measured(shot, b) for b in where[v]] for v in VERDICTS}
            if view == "none":
                typical = {v: colours[v][0] for v in VERDICTS}
            elif view != "greyscale":  # the emulation really applies to what is painted
                assert any(colours[v][0] != typical[v] for v in VERDICTS), (view, colours)
            if view in ("achromatopsia", "greyscale"):
                for v in VERDICTS:
                    r, g, b = colours[v][0]
                    assert max(r, g, b) - min(r, g, b) <= 3, (view, v, colours[v][0])
            for va, vb in itertools.combinations(VERDICTS, 2):
                for ca, cb in itertools.product(colours[va], colours[vb]):
                    de = delta_e2000(to_lab(as_rgb(ca)), to_lab(as_rgb(cb)))
                    if de < MIN_DELTA_E:
                        failures.append(f"{scheme}/{view}: {va} {ca} vs {vb} {cb}: ΔE00 {de:.1f}")
            weakest[view] = min(delta_e2000(to_lab(as_rgb(colours[va][0])), to_lab(as_rgb(colours[vb][0])))
                                for va, vb in itertools.combinations(VERDICTS, 2))
        emulate(page, cdp, "none")
        print(f"{scheme}: weakest pair per view (ΔE00, legend lines):", {k: round(v, 1) for k, v in weakest.items()})
        assert not failures, "\n".join(sorted(set(failures)))
    finally:
        ctx.close()
