"""What a pod-churn batch costs the controller (issue 15's churn, issue 19's Kubernetes estate), on
SQLite and PostgreSQL.

Proved by counting what reaches the database and the compiler, not by timing:

* ``POST /workload-batches`` costs a fixed number of statements whatever its size, the audit rows
  included; it was about nine per workload;
* creating and deleting many pods in one batch is ONE compiler pass and one revision (one delta)
  per affected host, not one per pod;
* a heartbeat alone rewrites an agent's row at most every few seconds (a node's long-poll marks
  its pods alive several times a second);
* deletes go before upserts: a new pod may take the address of a pod the same batch deletes
  (Kubernetes recycles pod IPs), which the per-workload path refused with a 409.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from tests.api.conftest import Api, make_settings
from tests.api.statements import Statements

from stockade.compiler.delta import UpdateKind
from stockade.controller.app import create_app
from stockade.controller.services import distribution
from stockade.controller.services.events import SyslogFormat, SyslogTarget
from stockade.controller.storage.db import AgentRow


def _pod(name: str, app: str, role: str, addr: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app": app, "role": role}, "mode": "full",
            "interfaces": [{"name": "eth0", "addresses": [addr]}]}


def _estate(api: Api, apps: int) -> None:
    """Namespaces-worth of pods: per app two db pods, web pods may reach them on 5432/tcp."""
    api.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    for a in range(apps):
        api.ok("POST", "/rulesets", 201, json={"name": f"app-{a}", "scope": [{"labels": {"app": f"a{a}"}}], "rules": [
            {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
             "services": ["pg"]}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "t"})
    api.ok("POST", "/workload-batches", json={"upsert": [
        _pod(f"db-{a}-{k}", f"a{a}", "db", f"10.6.{a}.{k + 1}") for a in range(apps) for k in range(2)]})


def _churn(first: int, count: int, apps: int) -> list[dict[str, Any]]:
    return [_pod(f"web-{i}", f"a{i % apps}", "web", f"10.7.{i // 250}.{i % 250 + 1}")
            for i in range(first, first + count)]


def _batch_statements(api: Api, apps: int, size: int, first: int) -> list[str]:
    """Statements of one batch that creates ``size`` pods, deletes ``size`` and relabels one db pod."""
    old = [p["name"] for p in _churn(first - size, size, apps)]
    db0 = api.ok("GET", "/workloads/db-0-0")["body"]
    moved = {**db0, "interfaces": [{"name": "eth0", "addresses": [f"10.6.99.{first % 250 + 1}"]}]}
    with Statements(api) as st:
        api.ok("POST", "/workload-batches", json={"upsert": [*_churn(first, size, apps), moved], "delete": old})
    return st.seen


def test_a_batch_costs_the_same_statements_at_any_size(quiet_api: Api) -> None:
    api = quiet_api
    apps = 5
    _estate(api, apps)
    api.ok("POST", "/workload-batches", json={"upsert": _churn(0, 4, apps)})
    small = _batch_statements(api, apps, 4, 4)
    api.ok("POST", "/workload-batches", json={"upsert": _churn(100, 60, apps)})
    large = _batch_statements(api, apps, 60, 160)
    shape = [s[:60] for s in small], [s[:60] for s in large]
    assert len(small) == len(large), "\n".join(map(str, shape))  # 4 or 60 pods each way: the same statements
    assert len(large) < 30, large
    assert len([s for s in large if s.upper().startswith("INSERT INTO EVENTS")]) == 1  # 121 audit rows
    events = api.ok("GET", "/events", params={"limit": 500, "kind": "workload"})["items"]
    assert sum(1 for e in events if e["name"].startswith("web-1")) >= 60 + 60  # still one row per write
    assert api.ok("GET", "/workloads/web-219")["body"]["labels"] == {"app": "a4", "role": "web"}
    assert api.req("GET", "/workloads/web-159").status_code == 404


def test_many_pods_in_one_batch_are_one_compiler_pass_and_one_revision_per_host(quiet_api: Api) -> None:
    api = quiet_api
    apps = 10
    _estate(api, apps)
    api.ok("POST", "/workload-batches", json={"upsert": _churn(0, 500, apps)})
    dist = api.ctl.dist
    before = dict(dist.revisions)
    passes: list[int] = []
    real = dist.compiler.apply_set_changes  # the compiler pass (host_deltas fans it out)

    def counted(changes: Any) -> Any:
        passes.append(len(changes))
        return real(changes)

    dist.compiler.apply_set_changes = counted  # type: ignore[method-assign]
    try:  # 500 creates and 500 deletes of web pods: each db pod gains 50 peers and loses 50
        api.ok("POST", "/workload-batches", json={"upsert": _churn(500, 500, apps),
                                                  "delete": [f"web-{i}" for i in range(500)]})
    finally:
        del dist.compiler.apply_set_changes
    assert passes == [1000]
    dbs = [f"db-{a}-{k}" for a in range(apps) for k in range(2)]
    assert {n: dist.revisions[n] for n in dbs} == {n: before[n] + 1 for n in dbs}  # one revision each
    upd = dist.fetch(dbs[0], before[dbs[0]])
    assert (upd.kind, upd.base, upd.revision) == (UpdateKind.DELTA, before[dbs[0]], before[dbs[0]] + 1)
    added = {str(n) for d in upd.set_deltas for n in d.added}
    removed = {str(n) for d in upd.set_deltas for n in d.removed}
    assert len(added) == len(removed) == 50  # its 50 new peers and 50 gone ones, as set members
    assert not any(n in dist.revisions for n in (f"web-{i}" for i in range(500)))


def test_a_new_pod_may_take_the_address_of_a_pod_deleted_in_the_same_batch(quiet_api: Api) -> None:
    api = quiet_api
    _estate(api, 1)
    api.ok("POST", "/workload-batches", json={"upsert": _churn(0, 2, 1)})
    recycled = _pod("web-new", "a0", "web", "10.7.0.1")  # web-0's address
    got = api.ok("POST", "/workload-batches", json={"upsert": [recycled], "delete": ["web-0"]})
    assert got == {"created": ["web-new"], "replaced": [], "deleted": ["web-0"]}
    hp = str(api.ok("GET", "/workloads/db-0-0/host-policy")["policy"])
    assert "10.7.0.1/32" in hp
    # still refused: an address a workload outside the batch holds, or one another upsert takes
    r = api.req("POST", "/workload-batches", json={"upsert": [_pod("web-x", "a0", "web", "10.7.0.2"),
                                                              _pod("web-y", "a0", "web", "10.7.0.9")]})
    assert r.status_code == 409 and "web-1" in r.text
    r = api.req("POST", "/workload-batches", json={"upsert": [_pod("web-x", "a0", "web", "10.7.0.8"),
                                                              _pod("web-y", "a0", "web", "10.7.0.8")]})
    assert r.status_code == 409 and "web-x" in r.text
    assert api.req("GET", "/workloads/web-x").status_code == 404


def test_an_unchanged_body_in_a_batch_writes_nothing(quiet_api: Api) -> None:
    api = quiet_api
    _estate(api, 1)
    api.ok("POST", "/workload-batches", json={"upsert": _churn(0, 2, 1)})
    stored = api.ok("GET", "/workloads/web-0")
    rev = api.ctl.dist.revisions["db-0-0"]
    got = api.ok("POST", "/workload-batches", json={"upsert": [stored["body"], *_churn(5, 1, 1)]})
    assert got == {"created": ["web-5"], "replaced": ["web-0"], "deleted": []}
    assert api.ok("GET", "/workloads/web-0")["revision"] == stored["revision"]
    updates = [e for e in api.ok("GET", "/events", params={"limit": 500, "name": "web-0"})["items"]]
    assert [e["action"] for e in updates] == ["workload.create"]
    assert api.ctl.dist.revisions["db-0-0"] == rev + 1  # web-5 only


def test_a_batch_s_audit_rows_are_forwarded_with_their_stored_ids(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(5)
        target = SyslogTarget("127.0.0.1", udp.getsockname()[1], SyslogFormat.JSON)
        app = create_app(make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", syslog=target))
        with TestClient(app) as client:
            api = Api(client, app.state.controller)
            _estate(api, 1)
            api.ok("POST", "/workload-batches", json={"upsert": _churn(0, 3, 1)})
            api.ok("POST", "/workload-batches", json={"upsert": _churn(3, 2, 1), "delete": ["web-0", "web-1"]})
            sent: dict[tuple[str, str], int] = {}
            while len([k for k in sent if k[1] in ("web-0", "web-1", "web-3", "web-4")]) < 6:
                e = json.loads(udp.recv(65535).decode().split(" audit - ", 1)[1])
                if e["kind"] == "workload" and e["name"].startswith("web-"):
                    sent[(e["action"], e["name"])] = e["id"]
            stored = {(e["action"], e["name"]): e["id"]
                      for e in api.ok("GET", "/events", params={"limit": 500, "kind": "workload"})["items"]}
    assert {k: stored[k] for k in sent} == sent
    assert ("workload.delete", "web-1") in sent and ("workload.create", "web-4") in sent


def test_heartbeats_alone_rewrite_an_agent_row_at_most_every_few_seconds(quiet_api: Api) -> None:
    """A node's long-poll is its pods' heartbeat, several times a second under churn: every flush
    rewrote every pod's row (10,000 at 10,000 pods). Acks are still written at the next flush."""
    api = quiet_api
    _estate(api, 1)
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "mode": "full", "code_max_uses": 10})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agents = [api.client.post("/api/v1/agents/enroll", json={
        "activation_code": code, "hostname": f"n{i}", "interfaces": []}).json()["agent_id"] for i in range(3)]
    dist = api.ctl.dist
    dist.flush()
    for a in agents:
        dist.agent_heartbeat(a)
    assert dist.flush() == 3  # the first heartbeat is written
    for _ in range(5):
        for a in agents:
            dist.agent_heartbeat(a)
        assert dist.flush() == 0  # alive in memory; the row is seconds old at most
    dist.agent_ack(agents[0], dist.revisions[dist.agents[agents[0]].workload] + 7)
    assert dist.flush() == 1  # an ack is not held back
    live = dist.agents[agents[1]]
    assert live.stored_heartbeat is not None and live.last_heartbeat is not None
    live.stored_heartbeat = live.stored_heartbeat - dt.timedelta(seconds=distribution.HEARTBEAT_WRITE)
    dist.agent_heartbeat(agents[1])
    assert dist.flush() == 1  # a stored heartbeat that old is rewritten
    with api.ctl.sessions() as db:
        stored = db.get(AgentRow, agents[1])
        assert stored is not None and stored.last_heartbeat is not None
        assert abs((stored.last_heartbeat.replace(tzinfo=dt.UTC) - live.last_heartbeat).total_seconds()) < 1e-3


def test_many_agents_coming_online_at_once_are_one_audit_insert(quiet_api: Api) -> None:
    """A node's pods (or a fleet after a restart) flip together: SQLite inserted one audit row per
    statement, a write lock held for as many statements, while the churn's batches waited."""
    api = quiet_api
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "mode": "full", "code_max_uses": 10})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agents = [api.client.post("/api/v1/agents/enroll", json={
        "activation_code": code, "hostname": f"n{i}", "interfaces": []}).json()["agent_id"] for i in range(6)]
    dist = api.ctl.dist
    for a in agents:
        dist.agent_heartbeat(a)
    with Statements(api) as st:
        assert sorted(dist.check_liveness(60)) == sorted((a, True) for a in agents)
    assert len([s for s in st.seen if s.upper().startswith("INSERT INTO EVENTS")]) == 1
    online = api.ok("GET", "/events", params={"action": "agent.online", "limit": 50})["items"]
    assert sorted(e["name"] for e in online) == sorted(agents)


def test_liveness_events_not_written_are_recorded_by_the_next_round(quiet_api: Api) -> None:
    """The flips were kept in memory when their INSERT failed ("database is locked" under a 10,000-pod
    set-up): the agents stayed online in memory and their ``agent.online`` events were never written."""
    api = quiet_api
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "mode": "full", "code_max_uses": 10})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agents = [api.client.post("/api/v1/agents/enroll", json={
        "activation_code": code, "hostname": f"n{i}", "interfaces": []}).json()["agent_id"] for i in range(3)]
    dist = api.ctl.dist
    for a in agents:
        dist.agent_heartbeat(a)
    real = dist.sessions

    def locked() -> Any:
        raise OperationalError("INSERT INTO events", {}, Exception("database is locked"))

    dist.sessions = type("Locked", (), {"begin": staticmethod(locked)})()
    try:
        with pytest.raises(OperationalError):
            dist.check_liveness(60)
    finally:
        dist.sessions = real
    assert sorted(dist.check_liveness(60)) == sorted((a, True) for a in agents)
    online = api.ok("GET", "/events", params={"action": "agent.online", "limit": 50})["items"]
    assert sorted(e["name"] for e in online) == sorted(agents)
