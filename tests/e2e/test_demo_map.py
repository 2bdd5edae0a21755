"""``stockade demo`` as a newcomer runs it (root): the lab's real traffic fills the map and the Explorer.

The command runs as a child process exactly as typed (``stockade demo --port 0 --data-dir D``),
serving. Its own output gives the console URL, the owner's password and the CA; through that
public API the test checks what the newcomer sees: the estate's app groups on the map with
allowed and blocked connections, the drill-down of an edge naming the deciding rule of every
connection (and the hosts' reports agreeing with the reference evaluator), the Explorer listing
flows with verdicts and rules, and real agents (enrolled, converged) behind it all. The moonshot
time the demo prints (fresh controller -> enforced label policy on the hosts -> on the map) is
read back and must be under the 5 minutes promised. A browser then opens the map, clicks a
blocked edge and reads why. Ctrl-C ends the demo and takes the lab down.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.asyncutil import in_thread
from tests.e2e.harness import REPO, address_lock

pytestmark = pytest.mark.kernel

CONSOLE = re.compile(r"Console:\s+(\S+)/\s+\(log in as '([^']+)' with password (\S+)\)")
CA = re.compile(r"CA:\s+(\S+)")
MOONSHOT = re.compile(r"moonshot: .* in ([0-9.]+) s")
CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    lines: list[str]
    url: str
    api: httpx.Client

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def get(self, path: str, **params: Any) -> Any:
        r = self.api.get(path, params=params)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}\n{self.output[-3000:]}"
        return r.json()


def lab_address_free(addr: str = "10.70.0.1", port: int = 8443) -> bool:
    """Whether the estate's controller address is free (other e2e runs on this machine use it too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND, as the demo binds it
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    data = tmp_path_factory.mktemp("demo") / "data"
    # other e2e tests of this run carry the estate's addresses too: take turns (the harness's lock), then
    # wait for anything else on this machine (another checkout's run) to free the address
    lock = address_lock("10.70.0.1")
    lock.__enter__()
    deadline = time.monotonic() + 600
    while not lab_address_free():
        if time.monotonic() > deadline:
            lock.__exit__(None, None, None)  # never keep the address after failing to get it
            pytest.fail("10.70.0.1:8443 stayed busy (another lab on this machine)")
        time.sleep(2)
    # started as a shell starts a background job without job control: SIGINT ignored. The demo must still
    # stop on Ctrl-C (a demo that ignored it was killed after 60 s, leaving its lab to break later tests)
    proc = subprocess.Popen([sys.executable, "-m", "stockade.cli", "demo", "--port", "0", "--data-dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Serving; press Ctrl-C"):
                serving.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 400
        while not serving.wait(0.5):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-5000:]
        text = "".join(lines)
        console, ca = CONSOLE.search(text), CA.search(text)
        assert console and ca, text
        url, user, password = console.groups()
        api = httpx.Client(base_url=url + "/api/v1", headers={"Origin": url}, timeout=60,
                           verify=ssl.create_default_context(cafile=ca.group(1)))
        api.post("/auth/login", json={"username": user, "password": password}).raise_for_status()
        yield Demo(proc, lines, url, api)
        api.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        lock.__exit__(None, None, None)
    # Ctrl-C took the lab down: no agent of this demo is left running
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert not agents_of(data), agents_of(data)


def agents_of(data: Path) -> list[str]:
    """Command lines of running processes that use ``data`` (the demo's agents keep their state there)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "stockade.agent" in text and str(data) in text:
            found.append(text)
    return found


def test_the_demo_fills_the_map_with_allowed_and_blocked_connections(demo: Demo) -> None:
    out = demo.output
    assert "0 disagreements with the evaluator" in out, out
    moonshot = MOONSHOT.search(out)
    assert moonshot, out
    print(f"\nmoonshot: {moonshot.group(1)} s (load average {os.getloadavg()[0]:.1f})")
    assert float(moonshot.group(1)) < 300

    # real agents behind it: every workload's agent enrolled and converged
    agents = {a["workload"]: a for a in demo.get("/agents")}
    workloads = [w["name"] for w in demo.get("/workloads", limit=500)["items"]]
    assert len(workloads) >= 3 and set(workloads) <= set(agents)
    assert all(agents[w]["converged"] and agents[w]["applied_revision"] > 0 for w in workloads)

    m = demo.get("/flows/map")
    groups = {n["id"] for n in m["nodes"] if n["kind"] == "app-group"}
    assert {"group:app=shop,env=prod", "group:app=shop,env=dev"} <= groups
    edges = {(e["src"], e["dst"]): e for e in m["edges"]}
    assert sum(e["allowed"] for e in edges.values()) > 0 and sum(e["blocked"] for e in edges.values()) > 0
    # the dev app reaching into prod is blocked by the estate's deny rule
    dev_prod = edges[("group:app=shop,env=dev", "group:app=shop,env=prod")]
    assert dev_prod["blocked"] > 0
    # the drill-down of every edge: each connection has a verdict and the rule deciding it, and what the
    # hosts reported is what the reference evaluator says of the active policy
    for (src, dst), e in edges.items():
        conns = demo.get("/flows/map/edge", src=src, dst=dst)
        assert conns, (src, dst, e)
        for c in conns:
            assert c["reported"] == c["verdict"], c
            sides = [s for s in (c["outbound"], c["inbound"]) if s]
            assert all(s["rule_id"] for s in sides), c
    denied = demo.get("/flows/map/edge", src="group:app=shop,env=dev", dst="group:app=shop,env=prod")
    assert any(c["verdict"] == "blocked" and c["inbound"] and c["inbound"]["rule_id"].startswith("deny")
               for c in denied), denied

    # the Explorer: flows with verdicts and deciding rules
    for verdict in ("allowed", "blocked", "potentially-blocked"):
        page = demo.get("/flows", verdict=verdict, limit=50)
        assert page["items"], verdict
        assert all(f["verdict"] == verdict and f["rule_id"] and f["reporter"] for f in page["items"])


def test_a_browser_opens_the_map_and_clicks_a_blocked_edge(demo: Demo) -> None:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    from tests.browser.harness import launch_chromium

    cookie = demo.api.cookies.get("stockade_session")
    assert cookie
    edge = "group:app=shop,env=dev->group:app=shop,env=prod"
    def drive() -> None:  # a thread of its own: no asyncio loop (the browser layer's) in this one
        with playwright.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                ctx = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=demo.url,
                                          ignore_https_errors=True)
                ctx.set_default_timeout(20000)
                ctx.add_cookies([{"name": "stockade_session", "value": cookie, "url": demo.url}])
                page = ctx.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto("/#/map")
                playwright.expect(page.locator('[data-node="group:app=shop,env=prod"]')).to_be_visible()
                playwright.expect(page.locator(f'[data-edge="{edge}"]')).to_have_count(1)
                shots = Path(os.environ.get("STOCKADE_SCREENSHOTS", REPO / "out" / "screenshots"))
                shots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shots / "demo-map.png"))  # the newcomer's first map, as an artifact
                page.locator(f'[data-edge-hit="{edge}"]').dispatch_event("click")
                flows = page.locator("[data-role=edge-flows] table")
                playwright.expect(flows.locator('[data-verdict="blocked"]').first).to_be_visible()
                playwright.expect(flows).to_contain_text("deny")
                page.screenshot(path=str(shots / "demo-map-edge.png"), full_page=True)
                page.goto("/#/explorer")
                playwright.expect(page.locator("main table")).to_contain_text("db-prod-1")
                assert not errors, errors
            finally:
                browser.close()

    in_thread(drive, timeout=180, name="chromium")
