"""Console benchmark: the application map in headless chromium at 1,000 workloads / 50 groups / 2,000 edges.

One controller (the same app as ``stockade controller --insecure-http``, SQLite, 127.0.0.1) with
a generated estate: 25 apps x {prod, dev} = 50 app groups of 20 workloads (1,000), and 2,000
distinct directed group-to-group connections (70 % allowed, 20 % potentially blocked, 10 %
blocked), reported through the agent protocol by one enrolled agent per destination group.
Debian's chromium (``/usr/bin/chromium``, headless) drives the console.

Rows:

* **first render**: a fresh browser context (cold cache, logged in) opens ``/#/map``; measured
  from navigation start to the end of the first map drawing with every edge (the page's own
  ``performance.now()``: HTML, ES modules, the API calls and layout + SVG included), and the
  drawing alone (layout + SVG build). Median and max of ``--runs`` runs. Target <= 1.5 s.
* **relabel shows on the open map**: the map is open; a workload's ``env`` label is changed
  through the REST API; timed from just before the API call until the map shows the workload's
  new group with its new workload count (no reload: the console follows the audit event
  feed). Median and max of ``--relabels``. Target <= 2 s.
* the controller's ``GET /flows/map`` latency for the same estate, for reference.

    python bench/console.py [--runs 5] [--relabels 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser.harness import (
    CHROMIUM,
    Console,
    enroll,
    flow,
    launch_chromium,
    running_controller,
)

APPS = 25
ENVS = ("prod", "dev")
PER_GROUP = 20
EDGES = 2000
ROLES = ("web", "api", "db", "cache")
PORTS = (443, 5432, 6379, 8080, 8443)
TARGET_FIRST_RENDER = 1.5
TARGET_RELABEL = 2.0


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def groups() -> list[tuple[str, str]]:
    return [(f"app{a:02d}", env) for a in range(APPS) for env in ENVS]


def address(g: int, i: int) -> str:
    return f"10.{100 + g // 200}.{g % 200}.{10 + i}"


def build_estate(c: Console) -> dict[str, Any]:
    gs = groups()
    bodies = []
    for g, (app, env) in enumerate(gs):
        for i in range(PER_GROUP):
            bodies.append({"name": f"{app}-{env}-{i:02d}", "mode": "visibility",
                           "labels": {"role": ROLES[i % len(ROLES)], "app": app, "env": env},
                           "interfaces": [{"name": "eth0", "addresses": [address(g, i)]}]})
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda b: c.post("/workloads", b), bodies))
    created = time.monotonic() - t0
    pairs = sorted(((s, d) for s in range(len(gs)) for d in range(len(gs)) if s != d), key=lambda p: _h(f"{p}"))
    chosen = pairs[:EDGES]
    inbound: dict[int, list[list[Any]]] = {}
    for n, (s, d) in enumerate(chosen):
        r = _h(f"edge{n}") % 10
        verdict, rule = ("allowed", "ruleset/bench/0") if r < 7 else \
            ("potentially-blocked", "default") if r < 9 else ("blocked", "deny/bench")
        i, j = _h(f"src{n}") % PER_GROUP, _h(f"dst{n}") % PER_GROUP
        inbound.setdefault(d, []).append(flow(address(s, i), address(d, j), PORTS[n % len(PORTS)], verdict, rule,
                                              count=1 + n % 7, ago=120))
    t0 = time.monotonic()
    for d, records in sorted(inbound.items()):
        app, env = gs[d]
        enroll(c, f"{app}-{env}-00", profile="bench").report(records)
    reported = time.monotonic() - t0
    return {"workloads": len(bodies), "groups": len(gs), "edges": len(chosen), "create_s": created,
            "report_s": reported}


def map_api_latency(c: Console, n: int = 5) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        m = c.get("/flows/map", keys="app,env")
        out.append(time.perf_counter() - t0)
    assert len(m["edges"]) == EDGES, len(m["edges"])
    return out


MAP_DRAWN = "(n) => { const s = document.querySelector('svg.map'); return s && Number(s.dataset.edges) >= n; }"


def first_render(browser: Any, c: Console, cookie: str, screenshot: Path | None = None) -> tuple[float, float]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=c.url)
    ctx.add_cookies([{"name": "stockade_session", "value": cookie, "url": c.url}])
    page = ctx.new_page()
    try:
        page.goto("/#/map")
        page.wait_for_function(MAP_DRAWN, arg=EDGES, timeout=60000)
        drawn_at = float(page.evaluate("Number(document.querySelector('svg.map').dataset.drawnAt)"))
        draw_ms = float(page.evaluate("Number(document.querySelector('svg.map').dataset.renderMs)"))
        if screenshot is not None:
            page.screenshot(path=str(screenshot))
        return drawn_at / 1000, draw_ms / 1000
    finally:
        ctx.close()


def relabels(browser: Any, c: Console, cookie: str, n: int) -> list[float]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=c.url)
    ctx.add_cookies([{"name": "stockade_session", "value": cookie, "url": c.url}])
    page = ctx.new_page()
    out = []
    try:
        page.goto("/#/map")
        page.wait_for_function(MAP_DRAWN, arg=EDGES, timeout=60000)
        page.wait_for_timeout(1500)  # the event-feed watcher is running
        for k in range(n):
            app = f"app{(3 * k) % APPS:02d}"
            name = f"{app}-prod-{5 + k:02d}"
            body = c.get(f"/workloads/{name}")["body"]
            target = f"group:app={app},env=dev"
            want = PER_GROUP + 1
            t0 = time.perf_counter()
            c.put(f"/workloads/{name}", {**body, "labels": {**body["labels"], "env": "dev"}})
            page.wait_for_function(
                "([id, want]) => { const g = document.querySelector(`[data-node=\"${id}\"]`);"
                " return g && g.getAttribute('aria-label').includes(`${want} workloads`); }",
                arg=[target, want], timeout=30000, polling=20)
            out.append(time.perf_counter() - t0)
            c.put(f"/workloads/{name}", body)  # back, for the next round
            page.wait_for_function(
                "([id, want]) => { const g = document.querySelector(`[data-node=\"${id}\"]`);"
                " return g && g.getAttribute('aria-label').includes(`${want} workloads`); }",
                arg=[target, PER_GROUP], timeout=30000, polling=50)
        return out
    finally:
        ctx.close()


def row(name: str, values: list[float], target: float | None) -> dict[str, Any]:
    med, worst = statistics.median(values), max(values)
    verdict = "" if target is None else ("PASS" if worst <= target else "FAIL")
    target_text = f"<= {target:.1f} s" if target else ""
    print(f"  {name:<44} median {med * 1000:8.0f} ms   max {worst * 1000:8.0f} ms   {target_text:<9} {verdict}")
    return {"name": name, "median_s": med, "max_s": worst, "runs": len(values), "target_s": target, "verdict": verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--relabels", type=int, default=6)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--screenshot", type=Path, help="save the map as drawn (PNG)")
    args = ap.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with running_controller() as c:
        if not c.has_visibility():
            sys.exit("this controller does not serve the visibility API (flows, map): no traffic to draw")
        estate = build_estate(c)
        print(f"estate: {estate['workloads']} workloads, {estate['groups']} groups, {estate['edges']} edges "
              f"(created in {estate['create_s']:.1f} s, flows reported in {estate['report_s']:.1f} s)")
        api = map_api_latency(c)
        cookie = c.session_cookie()
        rows = [row("GET /flows/map (controller, reference)", api, None)]
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                first_render(browser, c, cookie, args.screenshot)  # warms the controller once; not counted
                runs = [first_render(browser, c, cookie) for _ in range(args.runs)]
                rows.append(row("map first render (navigation -> drawn)", [r[0] for r in runs], TARGET_FIRST_RENDER))
                rows.append(row("  of which layout + SVG drawing", [r[1] for r in runs], None))
                rows.append(row("relabel -> shown on the open map", relabels(browser, c, cookie, args.relabels),
                                TARGET_RELABEL))
            finally:
                browser.close()
    if args.json:
        args.json.write_text(json.dumps({"estate": estate, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
