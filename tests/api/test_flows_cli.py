"""``stockade flows``, ``stockade suggest`` and ``stockade policy impact`` against a live controller process."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tests.api.test_cli import ESTATE, Live


def test_flows_suggest_and_impact_commands(tmp_path: Path) -> None:
    live = Live(False, tmp_path / "data")
    try:
        with httpx.Client(base_url=live.base + "/api/v1", timeout=30, headers={"Origin": live.base}) as c:
            c.post("/auth/login", json={"username": "admin", "password": live.password()})
            token = c.post("/api-keys", json={"name": "cli", "role": "admin"}).json()["key"]
            c.cookies.clear()
            c.headers["Authorization"] = f"Bearer {token}"
            text = "\n---\n".join(p.read_text() for p in sorted(ESTATE.glob("*.yaml")))
            assert c.put("/policy/draft", content=text, headers={"Content-Type": "application/yaml"}).is_success
            assert c.post("/policy/provision", json={"message": "estate"}).status_code == 201
            body = c.get("/workloads/app-prod-1").json()["body"]
            assert c.post("/pairing-profiles", json={"name": "p"}).status_code == 201
            code = c.post("/pairing-profiles/p/codes", json={"workload": "app-prod-1"}).json()["code"]  # adoption
            agent = c.post("/agents/enroll", json={"activation_code": code, "hostname": "app-prod-1",
                                                   "interfaces": body["interfaces"]}).json()
            t = time.time() - 10
            records: list[list[Any]] = [
                ["10.70.0.11", "10.70.0.21", "tcp", 8080, "in", "allowed", "ruleset/shop-prod/1", 4, t, t],
                ["10.70.0.12", "10.70.0.21", "tcp", 8080, "in", "allowed", "ruleset/shop-prod/1", 1, t, t],
                ["10.70.0.200", "10.70.0.21", "tcp", 8080, "in", "blocked", "default", 2, t, t],
            ]
            r = c.post(f"/agents/{agent['agent_id']}/flows", json={"sent_at": time.time(), "records": records},
                       headers={"Authorization": f"Bearer {agent['token']}"})
            assert r.status_code == 202, r.text
            # the draft loses web -> app
            rs = c.get("/rulesets/shop-prod").json()["body"]
            rs["rules"] = [x for x in rs["rules"] if x["services"] != ["app-http"]]
            assert c.put("/rulesets/shop-prod", json=rs).is_success

        env = {**os.environ, "STOCKADE_CONTROLLER": live.base, "STOCKADE_API_KEY": token}
        cli = [sys.executable, "-m", "stockade.cli"]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, check=False)

        table = run("flows", "--dst-workload", "app-prod-1", "--since", "1h")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["LAST", "SEEN", "SOURCE"] and len(lines) == 4
        assert any("web-prod-1" in x and "8080/tcp" in x and "allowed" in x for x in lines)
        assert any("10.70.0.200 (office)" in x and "blocked" in x for x in lines)
        only = run("flows", "--verdict", "blocked")
        assert len(only.stdout.splitlines()) == 2
        exported = run("flows", "--csv", "--src-labels", "role=web")
        rows = list(csv.DictReader(io.StringIO(exported.stdout)))
        assert {r["src_workload"] for r in rows} == {"web-prod-1", "web-prod-2"}

        impact = run("policy", "impact")
        assert impact.returncode == 3, impact.stdout + impact.stderr  # newly blocked flows: non-zero
        assert "2 newly blocked" in impact.stdout and "10.70.0.11 -> 10.70.0.21 8080/tcp" in impact.stdout
        refused = run("policy", "provision", "-m", "cut")
        assert refused.returncode == 7 and "newly block 2" in refused.stderr  # 7: the controller refused it

        sugg = run("suggest", "--app", "shop", "--env", "prod")
        assert sugg.returncode == 0, sugg.stderr
        # web and the office reach app on the same port set: one rule with both consumers
        assert "{role=web} | iplist:office -> {role=app} on app-http (8080/tcp): 3 connection(s)" in sugg.stdout
        accepted = run("suggest", "--app", "shop", "--env", "prod", "--accept")
        assert accepted.returncode == 0 and "accepted 1 rule(s)" in accepted.stdout, accepted.stdout + accepted.stderr
        after = run("policy", "impact")
        assert after.returncode == 0 and "0 newly blocked" in after.stdout and "1 newly allowed" in after.stdout
        widening = run("policy", "provision", "-m", "with suggestions")  # newly allows: confirm it (issue 14)
        assert widening.returncode == 7 and "newly allow 1" in widening.stderr and "--proceed" in widening.stderr
        assert "?proceed" not in widening.stderr
        assert run("policy", "provision", "-m", "with suggestions", "--proceed").returncode == 0
        assert run("suggest").returncode == 2  # no group named
    finally:
        live.stop()
