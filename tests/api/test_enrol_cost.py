"""What one enrolment costs inside the change lock (issue 18: 5,000 agents took 286 s to enrol on
3 replicas, about 57 ms each, serialised by the change lock), on SQLite and PostgreSQL.

Proved by counting the statements that reach the database, not by timing:

* one enrolment sends a fixed, small set of statements: the code and its profile in one read,
  the name's agent and workload in one read (the workload was read three times), no side-table
  ``DELETE`` of a row just created, no unit-of-work flush, one audit ``INSERT``;
* in a batched transaction, each further enrolment adds that same small set;
* the address-collision rule holds inside one batch: two enrolments claiming one address in one
  transaction, the first takes it and the second is quarantined (the write no longer re-checks
  the addresses after the owners' read, so this pins that the read sees the batch's own rows).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select
from tests.api.conftest import Api
from tests.api.statements import Statements
from tests.api.test_fanout_cost import _enrol_together

from stockade.controller.services import enrolment
from stockade.controller.storage.db import AgentRow

LIMITER = ("rate_hits", "hashtext(")  # the per-client enrolment limiter: before the change lock


def _policy(api: Api) -> str:
    api.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["pg"]}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    api.ok("POST", "/pairing-profiles", 201, json={"name": "dbs", "labels": {"app": "shop", "role": "db"},
                                                   "mode": "full", "code_max_uses": 100})
    return str(api.ok("POST", "/pairing-profiles/dbs/codes", 201, json={"max_uses": 100})["code"])


def _enrol(api: Api, code: str, host: str, addr: str) -> Any:
    r = api.client.post("/api/v1/agents/enroll", json={
        "activation_code": code, "hostname": host,
        "interfaces": [{"name": "eth0", "addresses": [addr]}], "agent_version": "test"})
    assert r.status_code == 201, r.text
    return r.json()


def _upper(statements: list[str], prefix: str) -> list[str]:
    return [s for s in statements if s.upper().startswith(prefix)]


def test_one_enrolment_sends_a_fixed_small_set_of_statements(quiet_api: Api) -> None:
    api = quiet_api
    code = _policy(api)
    _enrol(api, code, "h0", "10.0.0.1")
    with Statements(api, ignore=LIMITER) as st:
        _enrol(api, code, "h1", "10.0.0.2")
    seen = st.seen
    shape = "\n".join(s[:100] for s in seen)
    pg = api.ctl.dist.shared  # PostgreSQL: + the change lock, the catch-up check and the change row
    # 11 for the enrolment, 2 for the host's revision, 3 more on PostgreSQL (main: 20 / 22)
    assert len(seen) == (16 if pg else 13), shape
    assert not _upper(seen, "DELETE"), shape  # no side-table delete of the row just created
    assert len(_upper(seen, "INSERT INTO EVENTS")) == 1, shape  # workload.create + agent.enroll
    by_name = [s for s in seen if "objects.name =" in s]
    assert len(by_name) == 1, shape  # the workload is read once (with the agent check)
    assert len([s for s in seen if "FROM activation_codes" in s]) == 1, shape  # the code with its profile
    assert api.ok("GET", "/workloads/h1")["body"]["labels"] == {"app": "shop", "role": "db"}
    kinds = [e["action"] for e in api.ok("GET", "/events", params={"limit": 50})["items"] if e["name"] in ("h1",)
             or (e.get("after") or {}).get("workload") == "h1"]
    assert {"workload.create", "agent.enroll"} <= set(kinds), kinds


def test_each_enrolment_in_a_batch_adds_the_same_small_set(quiet_api: Api) -> None:
    api = quiet_api
    code = _policy(api)
    _enrol(api, code, "h0", "10.0.0.1")
    engine = api.ctl.sessions.kw["bind"]
    counts: list[int] = []
    for first, size in ((10, 1), (20, 4)):
        seen: list[str] = []

        def record(_c: Any, _cur: Any, sql: str, *_r: Any, into: list[str] = seen) -> None:
            if not sql.lstrip().startswith("SELECT change_log.id, change_log.body"):
                into.append(sql)

        event.listen(engine, "before_cursor_execute", record)
        try:
            out, transactions = _enrol_together(api, [code] * size, first=first)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert all(isinstance(o, enrolment.Enrolled) for o in out), out
        assert transactions == 1
        counts.append(len(seen))
    assert (counts[1] - counts[0]) / 3 <= 11, counts  # per further enrolment (main: 18)


def test_two_enrolments_claiming_one_address_in_one_batch(quiet_api: Api) -> None:
    api = quiet_api
    code = _policy(api)
    out, transactions = _enrol_together(api, [code, code], first=30, same_address=True)
    assert transactions == 1 and all(isinstance(o, enrolment.Enrolled) for o in out), out
    owner, held = sorted(out, key=lambda o: o.quarantined)  # the queue's order decides which is first
    assert (owner.quarantined, held.quarantined) == (False, True)
    with api.ctl.sessions() as db:
        report = db.scalars(select(AgentRow.held_interfaces).where(AgentRow.id == held.agent_id)).one()
    assert report == [{"name": "eth0", "addresses": ["10.9.1.31"]}]
    assert api.ok("GET", f"/workloads/{owner.workload}")["body"]["interfaces"][0]["addresses"] == ["10.9.1.31"]
    assert api.ok("GET", f"/workloads/{held.workload}")["body"]["interfaces"][0]["addresses"] == []
    quarantines = [e for e in api.ok("GET", "/events", params={"limit": 50})["items"]
                   if e["action"] == "agent.quarantine"]
    assert len(quarantines) == 1 and quarantines[0]["after"]["owners"] == [owner.workload]
