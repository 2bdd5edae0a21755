"""``stockade controller`` as a real process (TLS and plain HTTP) and the policy-as-code commands."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ESTATE = Path(__file__).resolve().parents[2] / "examples" / "estate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Live:
    def __init__(self, tls: bool, data_dir: Path) -> None:
        self.port = _free_port()
        args = [sys.executable, "-m", "stockade.cli", "controller", "--data-dir", str(data_dir),
                "--port", str(self.port)]
        if not tls:
            args.append("--insecure-http")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        while not any(line.startswith("Metrics:") for line in self.lines):
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("controller exited:\n" + "".join(self.lines))
            self.lines.append(line)
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = True
        if tls:
            self.verify = ssl.create_default_context(cafile=str(data_dir / "tls" / "ca.pem"))
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.base + "/api/v1/openapi.json", verify=self.verify, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def password(self) -> str:
        for line in self.lines:
            m = re.search(r"owner account 'admin' with password (\S+)", line)
            if m:
                return m.group(1)
        raise AssertionError("no first-run credential printed:\n" + "".join(self.lines))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def live_tls(tmp_path: Path) -> Iterator[Live]:
    live = Live(True, tmp_path / "data")
    yield live
    live.stop()


def test_tls_controller_first_run(live_tls: Live, tmp_path: Path) -> None:
    text = "".join(live_tls.lines)
    assert "CA certificate:" in text and f"https://127.0.0.1:{live_tls.port}/api/v1" in text
    with httpx.Client(base_url=live_tls.base, verify=live_tls.verify) as c:
        r = c.post("/api/v1/auth/login", json={"username": "admin", "password": live_tls.password()})
        assert r.status_code == 200
        assert c.get("/api/v1/auth/whoami").json()["role"] == "owner"
    with pytest.raises(httpx.TransportError):  # not trusted without the controller's CA
        httpx.get(live_tls.base + "/api/v1/openapi.json", verify=True, timeout=5)
    key = (tmp_path / "data" / "tls" / "server.key").stat().st_mode & 0o777
    assert key == 0o600


def test_policy_apply_diff_provision(tmp_path: Path) -> None:
    live = Live(False, tmp_path / "data")
    try:
        with httpx.Client(base_url=live.base, headers={"Origin": live.base}) as c:
            c.post("/api/v1/auth/login", json={"username": "admin", "password": live.password()})
            token = c.post("/api/v1/api-keys", json={"name": "cli", "role": "admin"}).json()["key"]
        env = {**os.environ, "STOCKADE_CONTROLLER": live.base, "STOCKADE_API_KEY": token}
        cli = [sys.executable, "-m", "stockade.cli", "policy"]
        diff = subprocess.run([*cli, "diff", "-f", str(ESTATE)], env=env, capture_output=True, text=True, check=False)
        assert diff.returncode == 1, diff.stderr  # a difference, as diff(1) says it
        assert "+ draft ruleset" in diff.stdout and "would change" in diff.stdout
        applied = subprocess.run([*cli, "apply", "-f", str(ESTATE)], env=env, capture_output=True, text=True,
                                 check=False)
        assert applied.returncode == 0, applied.stderr
        again = subprocess.run([*cli, "diff", "-f", str(ESTATE)], env=env, capture_output=True, text=True,
                               check=False)
        assert "0 object(s) would change" in again.stdout and again.returncode == 0, again.stderr
        prov = subprocess.run([*cli, "provision", "-m", "from git"], env=env, capture_output=True, text=True,
                              check=False)
        assert prov.returncode == 0 and prov.stdout.startswith("version 1:"), prov.stdout + prov.stderr
        bad = tmp_path / "bad.yaml"
        bad.write_text("apiVersion: stockade.io/v1\nkind: Service\nname: s\nports: [70000/tcp]\n")
        refused = subprocess.run([*cli, "apply", "-f", str(bad)], env=env, capture_output=True, text=True,
                                 check=False)
        assert refused.returncode == 1 and "bad.yaml:4" in refused.stderr
    finally:
        live.stop()
