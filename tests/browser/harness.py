"""A live controller for the browser tests and benchmarks, in a subprocess.

The controller app (``serve_console.py``, or the ``stockade controller --insecure-http`` command
itself) runs on 127.0.0.1 with a random port and a throwaway data dir; the first-run owner
password is read from its output. The
:class:`Console` handle carries the URL, that credential, and an API client (an owner API key)
to seed the estate through the same public REST API the console uses.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import expect

CHROMIUM = Path(os.environ.get("STOCKADE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FIRST_RUN = re.compile(r"owner account '([^']+)' with password (\S+)")
REPO = Path(__file__).resolve().parents[2]


def chromium_skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Console:
    url: str
    username: str
    password: str
    api: httpx.Client  # base_url .../api/v1, owner API key
    data_dir: Path

    def session_cookie(self) -> str:
        """Log in through the API (as the console does) and return the session cookie value."""
        r = httpx.post(f"{self.url}/api/v1/auth/login", json={"username": self.username, "password": self.password})
        r.raise_for_status()
        return str(r.cookies["stockade_session"])

    def check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise AssertionError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text}")
        return r.json() if r.content else None

    def has_visibility(self) -> bool:
        """Whether this controller serves the visibility API (flows, map, impact)."""
        paths = self.check(self.api.get("/openapi.json"))["paths"]
        return "/api/v1/flows/map" in paths and "/api/v1/agents/{agent_id}/flows" in paths

    def get(self, path: str, **params: Any) -> Any:
        return self.check(self.api.get(path, params=params))

    def post(self, path: str, body: Any) -> Any:
        return self.check(self.api.post(path, json=body))

    def put(self, path: str, body: Any) -> Any:
        return self.check(self.api.put(path, json=body))


@contextmanager
def running_controller(cli: bool = False, extra_args: tuple[str, ...] = ()) -> Iterator[Console]:
    """Start a controller (``stockade controller --insecure-http`` with ``cli``) and yield a :class:`Console`."""
    data_dir = Path(tempfile.mkdtemp(prefix="stockade-console-"))
    port = free_port()
    log_path = data_dir / "controller.log"
    log = log_path.open("w")
    if cli:  # exactly what a user runs
        argv = [sys.executable, "-m", "stockade.cli", "controller", "--data-dir", str(data_dir / "data"),
                "--host", "127.0.0.1", "--port", str(port), "--insecure-http"]
    else:  # the same app, importing only the controller (faster, cheap argon2)
        argv = [sys.executable, str(Path(__file__).with_name("serve_console.py")), "--data", str(data_dir / "data"),
                "--port", str(port), *extra_args]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client: httpx.Client | None = None
    try:
        deadline = time.monotonic() + 60
        credential = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited with {proc.returncode}:\n{log_path.read_text()}")
            text = log_path.read_text()
            credential = credential or FIRST_RUN.search(text)
            if credential:
                try:
                    if httpx.get(f"{url}/api/v1/openapi.json", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"controller did not come up:\n{log_path.read_text()}")
        assert credential is not None
        user, password = credential.group(1), credential.group(2)
        with httpx.Client(base_url=f"{url}/api/v1", timeout=30, headers={"Origin": url}) as login:
            login.post("/auth/login", json={"username": user, "password": password}).raise_for_status()
            key = login.post("/api-keys", json={"name": "browser-tests", "role": "owner"})
            key.raise_for_status()
            token = key.json()["key"]
        client = httpx.Client(base_url=f"{url}/api/v1", timeout=60, headers={"Authorization": f"Bearer {token}"})
        yield Console(url, user, password, client, data_dir)
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


# ---- the estate the tests work on ----------------------------------------------------------

SERVICES = [
    {"name": "https", "ports": ["443/tcp"], "description": "web"},
    {"name": "ssh", "ports": ["22/tcp"]},
    {"name": "postgres", "ports": ["5432/tcp"]},
]


def workload(name: str, labels: dict[str, str], addr4: str, mode: str = "visibility") -> dict[str, Any]:
    return {"name": name, "labels": labels, "mode": mode,
            "interfaces": [{"name": "eth0", "addresses": [addr4]}]}


def seed_estate(c: Console) -> None:
    """A small estate (a shop in prod, the dev team's laptops, a new dev environment) and its traffic."""
    for s in SERVICES:
        c.post("/services", s)
    c.post("/ip-lists", {"name": "office", "include": ["203.0.113.0/24"]})
    estate = [
        workload("shop-web-1", {"role": "web", "app": "shop", "env": "prod", "loc": "eu"}, "10.1.0.11"),
        workload("shop-web-2", {"role": "web", "app": "shop", "env": "prod", "loc": "eu"}, "10.1.0.12"),
        workload("shop-db-1", {"role": "db", "app": "shop", "env": "prod", "loc": "eu"}, "10.1.0.21"),
        workload("dev-laptop-1", {"role": "workstation", "app": "devteam", "env": "corp"}, "10.9.0.11"),
        workload("dev-laptop-2", {"role": "workstation", "app": "devteam", "env": "corp"}, "10.9.0.12"),
        workload("newdev-web-1", {"role": "web", "app": "shop", "env": "dev"}, "10.2.0.11"),
        workload("newdev-db-1", {"role": "db", "app": "shop", "env": "staging"}, "10.2.0.21"),
    ]
    for w in estate:
        c.post("/workloads", w)
    c.post("/rulesets", {
        "name": "shop-prod",
        "scope": [{"labels": {"app": "shop", "env": "prod"}}],
        "rules": [{"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
                   "services": ["postgres"]}],
    })
    c.post("/policy/provision", {"message": "initial policy"})
    if not c.has_visibility():
        return
    # traffic reported by the hosts' agents (visibility mode)
    db = enroll(c, "shop-db-1")
    db.report([flow("10.1.0.11", "10.1.0.21", 5432, "allowed", "ruleset/shop-prod/0", count=40, ago=600),
               flow("10.1.0.12", "10.1.0.21", 5432, "allowed", "ruleset/shop-prod/0", count=35, ago=600)])
    web = enroll(c, "newdev-web-1")
    web.report([flow("10.9.0.11", "10.2.0.11", 443, "potentially-blocked", "default", count=6, ago=900),
                flow("10.9.0.12", "10.2.0.11", 22, "potentially-blocked", "default", count=2, ago=900)])
    shop = enroll(c, "shop-web-1")
    shop.report([flow("10.1.0.11", "198.51.100.7", 443, "potentially-blocked", "default", side="out", ago=700),
                 flow("203.0.113.9", "10.1.0.11", 443, "potentially-blocked", "default", count=12, ago=650)])


# ---- an agent's reports, through the agent protocol ---------------------------------------------


@dataclass
class SimulatedAgent:
    """An enrolled agent (no kernel): reports flows as the real agent does, with its own token."""

    console: Console
    agent_id: str
    token: str
    workload: str

    def report(self, records: list[list[Any]]) -> None:
        body = {"sent_at": time.time(), "dropped": 0, "records": records}
        r = httpx.post(f"{self.console.url}/api/v1/agents/{self.agent_id}/flows", json=body,
                       headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        assert r.status_code == 202, r.text


def enroll(c: Console, hostname: str, profile: str = "simulated") -> SimulatedAgent:
    """Enrol an agent for ``hostname`` (an existing workload of that name is adopted, with an adoption code)."""
    if not any(p["name"] == profile for p in c.get("/pairing-profiles")):
        c.post("/pairing-profiles", {"name": profile, "mode": "visibility"})
    existing = c.api.get(f"/workloads/{hostname}")
    # an existing workload is taken over only with an adoption code issued for it
    code = c.post(f"/pairing-profiles/{profile}/codes", {"workload": hostname} if existing.status_code == 200
                  else {})["code"]
    interfaces = existing.json()["body"]["interfaces"] if existing.status_code == 200 else []
    r = httpx.post(f"{c.url}/api/v1/agents/enroll", timeout=60,  # the agent reports its addresses on enrolment
                   json={"activation_code": code, "hostname": hostname, "interfaces": interfaces})
    assert r.status_code == 201, r.text
    out = r.json()
    return SimulatedAgent(c, out["agent_id"], out["token"], out["workload"])


def flow(src: str, dst: str, port: int, verdict: str, rule: str, count: int = 1, side: str = "in",
         ago: float = 0.0, proto: str = "tcp") -> list[Any]:
    """One record of the upload format (stockade.visibility.wire)."""
    now = time.time() - ago
    return [src, dst, proto, port, side, verdict, rule, count, round(now - 1, 3), round(now, 3)]


def pick(page: Any, combobox: Any, text: str, key: str) -> None:
    """Type ``text`` in a picker and choose the suggestion whose data-key is ``key`` with Enter."""
    for attempt in range(3):
        combobox.click()
        combobox.fill(text)
        listbox = page.locator(f"#{combobox.get_attribute('aria-controls')}")
        option = listbox.locator(f'[role=option][data-key="{key}"]')
        try:
            # a form that re-renders after the previous action (a chip removed, an error shown) may close
            # the suggestions just opened: type again rather than fail on the page's timing
            expect(option).to_be_visible(timeout=3000 if attempt < 2 else 5000)
            break
        except AssertionError:
            if attempt == 2:
                raise
            combobox.fill("")
    for _ in range(60):  # move the active option onto it with the keyboard
        if option.get_attribute("aria-selected") == "true":
            break
        combobox.press("ArrowDown")
    combobox.press("Enter")
