"""Accessibility: axe-core on every main page, in the light and the high-contrast themes, with
a screenshot of each page saved under the test output (``out/screenshots``).

axe-core comes from the npm registry at test time (``npm pack axe-core@4``), cached outside the
repository and never committed; the test skips, saying so, only when npm cannot fetch it. The
pages are checked as rendered (after their data loaded), and no violation of impact
"serious" or "critical" is allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import new_context
from tests.browser.harness import Console

pytestmark = pytest.mark.browser

AXE_SPEC = "axe-core@4"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stockade-tests" / "axe-core"

MAIN_PAGES = [
    ("login", "#/login", "Log in to Stockade"),
    ("workloads", "#/workloads", "Workloads"),
    ("workload", "#/workloads/shop-web-1", "shop-web-1"),
    ("labels", "#/labels", "Labels"),
    ("rulesets", "#/rulesets", "Rulesets"),
    ("ruleset-editor", "#/rulesets/shop-prod", "Ruleset shop-prod"),
    ("deny-rules", "#/deny-rules", "Deny rules"),
    ("deny-editor", "#/deny-rules/new", "New deny rule"),
    ("objects", "#/objects", "Services & IP lists"),
    ("map", "#/map", "Application map"),
    ("explorer", "#/explorer", "Explorer"),
    ("provision", "#/policy", "Review and provision"),
    ("versions", "#/versions", "Policy versions"),
    ("version", "#/versions/1", "Version 1"),
    ("agents", "#/agents", "Agents and pairing"),
    ("events", "#/events", "Events"),
    ("settings", "#/settings", "Display settings"),
]
THEMES = [("light", "standard"), ("high-contrast", "enhanced")]


def fetch_axe() -> str:
    target = CACHE / "axe.min.js"
    if target.exists():
        return target.read_text()
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch axe-core from the npm registry")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", AXE_SPEC, "--pack-destination", tmp, "--silent"], check=True,
                           capture_output=True, timeout=180, cwd=tmp)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"the npm registry is unreachable, axe-core not fetched: {exc}")
        tarball = next(Path(tmp).glob("axe-core-*.tgz"))
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/axe.min.js")
            assert member is not None
            source = member.read().decode()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_text(source)
    partial.replace(target)
    return source


@pytest.fixture(scope="session")
def axe_source() -> str:
    return fetch_axe()


@pytest.fixture
def a11y_context(browser: Any, console: Console, session_cookie: str) -> Iterator[Any]:
    # the console's CSP forbids inline scripts; only this test context may inject axe-core
    ctx = new_context(browser, console, session_cookie, bypass_csp=True)
    try:
        yield ctx
    finally:
        ctx.close()


def settle(page: Any, heading: str) -> None:
    expect(page.get_by_role("heading", name=heading).first).to_be_visible()
    expect(page.locator("#view")).not_to_have_attribute("aria-busy", "true")  # the page has its data
    page.wait_for_load_state("networkidle")


def run_axe(page: Any, source: str) -> list[dict[str, Any]]:
    page.add_script_tag(content=source)
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 5).map(n => n.target.join(' ') + ' :: ' + n.failureSummary)}));
    }""")
    return list(result)


@pytest.mark.parametrize(("theme", "cvd"), THEMES)
def test_no_serious_axe_violation_on_any_main_page(a11y_context: Any, axe_source: str, screenshots: Path,
                                                   console: Console, session_cookie: str, theme: str,
                                                   cvd: str) -> None:
    page = a11y_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    settings = json.dumps({"theme": theme, "cvd": cvd})
    page.add_init_script(f"localStorage.setItem('stockade.display', {json.dumps(settings)})")
    failures = []
    for name, route, heading in MAIN_PAGES:
        if name == "login":
            a11y_context.clear_cookies()
        page.goto(f"/{route}")
        settle(page, heading)
        assert page.evaluate("document.documentElement.dataset.theme") == theme
        page.screenshot(path=str(screenshots / f"{theme}-{name}.png"), full_page=True)
        bad = [v for v in run_axe(page, axe_source) if v["impact"] in ("serious", "critical")]
        if bad:
            failures.append((name, bad))
        if name == "login":
            a11y_context.add_cookies([{"name": "stockade_session", "value": session_cookie, "url": console.url}])
    assert not errors, errors
    assert not failures, "\n".join(f"{name}: {v['id']} ({v['impact']}): {v['help']}\n    " + "\n    ".join(v["nodes"])
                                   for name, bad in failures for v in bad)
