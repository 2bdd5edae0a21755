"""Login hardening: forwarded addresses only from trusted proxies, per-account backoff, audit of
failures, and a password change ending the user's other sessions.

The forwarded-header tests run the real ``stockade controller`` command (its HTTP server is where
``X-Forwarded-For`` used to be believed from anyone on the host); the rest run the app in-process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from stockade.controller.forwarded import TrustedProxies
from stockade.controller.services.auth import LockoutPolicy
from stockade.errors import ValidationError
from tests.api.conftest import Api
from tests.browser.harness import free_port

PASSWORD = "correct horse battery staple"


# ---- forwarded headers -------------------------------------------------------------------------------


@contextmanager
def controller(tmp: Path, *extra: str) -> Iterator[tuple[str, str]]:
    """``stockade controller --insecure-http`` on 127.0.0.1: yields (base URL, owner password)."""
    port = free_port()
    log = tmp / "controller.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stockade.cli", "controller", "--data-dir", str(tmp / "data"),
                                 "--port", str(port), "--insecure-http", *extra], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            found = re.search(r"owner account 'admin' with password (\S+)", log.read_text())
            try:
                if found and httpx.get(base + "/api/v1/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield base, found.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def attempts(base: str, n: int) -> list[int]:
    """n failed logins from this host, each claiming another X-Forwarded-For and another username."""
    with httpx.Client(base_url=base + "/api/v1", timeout=30) as c:
        return [c.post("/auth/login", json={"username": f"guess{i}", "password": "wrong"},
                       headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(n)]


def test_spoofed_forwarded_for_does_not_dodge_the_login_limit(tmp_path: Path) -> None:
    """Default limit: 10 attempts a minute per client; the header must not make us 12 clients."""
    with controller(tmp_path) as (base, _):
        codes = attempts(base, 12)
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]


def test_forwarded_for_is_believed_from_a_trusted_proxy(tmp_path: Path) -> None:
    with controller(tmp_path, "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "10.0.0.0/8") as (base, password):
        assert attempts(base, 12) == [401] * 12  # twelve clients behind the proxy
        with httpx.Client(base_url=base + "/api/v1", timeout=30, headers={"Origin": base}) as c:
            assert c.post("/auth/login", json={"username": "admin", "password": password}).status_code == 200
            failed = c.get("/events", params={"action": "auth.login_failed", "name": "guess3"}).json()["items"]
    assert [e["after"]["client"] for e in failed] == ["198.51.100.3"]


def test_bad_trusted_proxy_flag_is_refused(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "stockade.cli", "controller", "--data-dir", str(tmp_path),
                        "--trusted-proxy", "not-an-address"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "trusted_proxies[0]" in r.stderr and "not-an-address" in r.stderr


def test_client_address_walks_forwarded_for_from_the_right() -> None:
    proxies = TrustedProxies.parse(["10.0.0.0/8", "2001:db8::/32"])
    xff = {"x-forwarded-for": "203.0.113.66, 192.0.2.7, 10.0.0.2"}  # client-written, real client, inner proxy
    assert proxies.client_host("10.0.0.1", xff) == "192.0.2.7"
    assert proxies.client_host("192.0.2.200", xff) == "192.0.2.200"  # not a proxy: header ignored
    assert proxies.client_host("2001:db8::1", {"x-forwarded-for": "[2001:db9::5]:443"}) == "2001:db9::5"
    assert proxies.client_host("10.0.0.1", {"x-forwarded-for": "bogus"}) == "10.0.0.1"
    assert proxies.client_host("10.0.0.1", {}) == "10.0.0.1"
    assert TrustedProxies().client_host("127.0.0.1", xff) == "127.0.0.1"  # nobody trusted by default
    with pytest.raises(ValidationError, match=r"trusted_proxies\[1\]"):
        TrustedProxies.parse(["10.0.0.1", "10.0.0.0/99"])


# ---- per-account backoff ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def login(c: TestClient, username: str, password: str) -> int:
    return c.post("/api/v1/auth/login", json={"username": username, "password": password}).status_code


def test_account_backs_off_after_repeated_failures(sqlite_api: Api) -> None:
    api = sqlite_api
    clock = Clock()
    api.ctl.login_throttle.clock = clock
    api.ok("POST", "/users", 201, json={"username": "bob", "password": PASSWORD, "role": "read-only"})
    c = api.client
    assert [login(c, "bob", "guess") for _ in range(5)] == [401] * 5
    locked = c.post("/api/v1/auth/login", json={"username": "bob", "password": PASSWORD})
    assert locked.status_code == 429 and "failed logins for this account" in locked.json()["message"]
    assert login(c, "carol-does-not-exist", "guess") == 401  # other accounts unaffected
    clock.now += 31  # first lock: 30 s
    assert login(c, "bob", "guess") == 401  # the sixth failure: locked for 60 s now
    clock.now += 31
    assert login(c, "bob", PASSWORD) == 429
    clock.now += 30
    assert login(c, "bob", PASSWORD) == 200  # and a success resets the count
    c.cookies.clear()
    assert [login(c, "bob", "guess") for _ in range(4)] == [401] * 4
    # an unknown username locks the same way (the answer does not reveal which accounts exist)
    assert [login(c, "nobody", "guess") for _ in range(6)] == [401] * 5 + [429]
    failed = api.ok("GET", "/events", params={"action": "auth.login_failed", "name": "bob", "limit": 100})["items"]
    assert len(failed) == 5 + 1 + 1 + 1 + 4
    assert {e["after"]["client"] for e in failed} == {"testclient"}
    assert {e["after"]["reason"] for e in failed} == {"wrong username or password", "account locked"}
    assert max(e["after"]["locked_seconds"] for e in failed) == 60


def test_backoff_doubles_to_a_cap() -> None:
    policy = LockoutPolicy(free_failures=3, base_seconds=10, max_seconds=100)
    assert [policy.lock_for(n) for n in range(1, 9)] == [0, 0, 10, 20, 40, 80, 100, 100]


# ---- a password change ends the other sessions -----------------------------------------------------


def session(api: Api, username: str, password: str) -> TestClient:
    c = TestClient(api.client.app, headers={"Origin": "http://testserver"})
    assert login(c, username, password) == 200
    return c


def test_password_change_by_the_owner_ends_every_session_of_the_user(api: Api) -> None:
    api.ok("POST", "/users", 201, json={"username": "bob", "password": PASSWORD, "role": "read-only"})
    phone, laptop = session(api, "bob", PASSWORD), session(api, "bob", PASSWORD)
    assert phone.get("/api/v1/auth/whoami").status_code == 200
    changed = api.ok("PUT", "/users/bob", json={"password": PASSWORD + " 2"})
    assert changed["username"] == "bob"
    assert phone.get("/api/v1/auth/whoami").status_code == 401
    assert laptop.get("/api/v1/auth/whoami").status_code == 401
    event = api.ok("GET", "/events", params={"action": "user.update", "name": "bob"})["items"][0]
    assert event["after"]["sessions_ended"] == 2
    assert session(api, "bob", PASSWORD + " 2").get("/api/v1/auth/whoami").status_code == 200


def test_own_password_change_keeps_the_current_session_only(api: Api) -> None:
    assert api.ctl.first_run_credential is not None
    user, password = api.ctl.first_run_credential
    here, elsewhere = session(api, user, password), session(api, user, password)
    r: Any = here.put(f"/api/v1/users/{user}", json={"password": PASSWORD})
    assert r.status_code == 200, r.text
    assert here.get("/api/v1/auth/whoami").status_code == 200
    assert elsewhere.get("/api/v1/auth/whoami").status_code == 401
    # a role or scope change needs no logout: it is read on every request
    assert api.req("GET", "/workloads").status_code == 200
