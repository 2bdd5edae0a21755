"""Audit events: querying, agent liveness events, and syslog forwarding as JSON and CEF."""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.api.conftest import Api, make_settings

from stockade.controller.app import create_app
from stockade.controller.services.events import SyslogFormat, SyslogTarget


def test_event_query_filters_and_cursor(api: Api) -> None:
    for i in range(5):
        api.ok("POST", "/services", 201, json={"name": f"s{i}", "ports": [f"{1000 + i}/tcp"]})
    api.ok("PUT", "/services/s1", json={"name": "s1", "ports": ["2000/tcp"]})
    page = api.ok("GET", "/events", params={"kind": "service", "limit": 4})
    assert len(page["items"]) == 4 and page["next_cursor"]
    assert page["items"][0]["action"] == "service.update"  # newest first
    assert page["items"][0]["before"]["ports"] == ["1001/tcp"] and page["items"][0]["after"]["ports"] == ["2000/tcp"]
    rest = api.ok("GET", "/events", params={"kind": "service", "limit": 4, "cursor": page["next_cursor"]})
    assert len(rest["items"]) == 2 and rest["next_cursor"] is None
    mine = api.ok("GET", "/events", params={"action": "service.create", "name": "s3"})["items"]
    assert len(mine) == 1 and mine[0]["actor"].startswith("key:")


def test_agent_liveness_events(sqlite_api: Api) -> None:
    api = sqlite_api
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p"})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agent = api.client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": "h"}).json()
    api.ok("POST", f"/agents/{agent['agent_id']}/heartbeat", headers=api.headers(agent["token"]))
    dist = api.ctl.dist
    assert dist.check_liveness(60) == [(agent["agent_id"], True)]
    assert dist.check_liveness(60) == []
    dist.agents[agent["agent_id"]].last_heartbeat = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    assert dist.check_liveness(60) == [(agent["agent_id"], False)]
    actions = [e["action"] for e in api.ok("GET", "/events", params={"kind": "agent"})["items"]]
    assert actions[:2] == ["agent.offline", "agent.online"]
    assert api.ok("GET", f"/agents/{agent['agent_id']}")["status"] == "offline"


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    yield s
    s.close()


@pytest.mark.parametrize("fmt", [SyslogFormat.JSON, SyslogFormat.CEF])
def test_syslog_forwarding(tmp_path: Path, udp: socket.socket, fmt: SyslogFormat) -> None:
    target = SyslogTarget("127.0.0.1", udp.getsockname()[1], fmt)
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", syslog=target))
    with TestClient(app) as client:
        api = Api(client, app.state.controller)
        api.ok("POST", "/services", 201, json={"name": "web", "ports": ["80/tcp"]})
        lines = []
        while True:
            data = udp.recv(65535).decode()
            lines.append(data)
            if "service.create" in data:
                break
    line = lines[-1]
    assert line.startswith("<133>1 ") and " stockade - audit - " in line
    message = line.split(" audit - ", 1)[1]
    if fmt is SyslogFormat.JSON:
        event = json.loads(message)
        assert event["action"] == "service.create" and event["after"]["ports"] == ["80/tcp"]
    else:
        assert message.startswith("CEF:0|Stockade|Stockade|")
        assert "act=service.create" in message and "cs2=web" in message


def test_offline_grace_takes_addresses_out_of_peer_sets(sqlite_api: Api) -> None:
    api = sqlite_api
    api.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "r", "scope": "all", "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["pg"]}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    api.ok("POST", "/workloads", 201, json={"name": "db", "labels": {"role": "db"}})
    api.ok("POST", "/pairing-profiles", 201, json={"name": "web", "labels": {"role": "web"}})
    code = api.ok("POST", "/pairing-profiles/web/codes", 201)["code"]
    agent = api.client.post("/api/v1/agents/enroll", json={
        "activation_code": code, "hostname": "web-1", "interfaces": [{"name": "eth0", "addresses": ["10.3.0.1"]}]},
    ).json()
    token = api.headers(agent["token"])
    api.ok("POST", f"/agents/{agent['agent_id']}/heartbeat", headers=token)

    def db_members() -> set[str]:
        sets = api.ok("GET", "/workloads/db/host-policy")["policy"]["sets"]
        return {m for s in sets for m in s["members"]}

    dist = api.ctl.dist
    dist.check_liveness(60, grace=30)
    assert "10.3.0.1/32" in db_members()
    dist.agents[agent["agent_id"]].last_heartbeat = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=75)
    dist.check_liveness(60, grace=30)  # offline, still inside the grace
    assert "10.3.0.1/32" in db_members()
    dist.agents[agent["agent_id"]].last_heartbeat = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=95)
    dist.check_liveness(60, grace=30)
    assert "10.3.0.1/32" not in db_members()
    assert api.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.3.0.1"]  # kept
    api.ok("POST", f"/agents/{agent['agent_id']}/heartbeat", headers=token)
    dist.check_liveness(60, grace=30)
    assert "10.3.0.1/32" in db_members()
    actions = [e["action"] for e in api.ok("GET", "/events", params={"name": "web-1"})["items"]]
    assert "workload.departed" in actions and "workload.returned" in actions
