"""What a fleet costs the controller per agent (issue 18, item 5), on SQLite and PostgreSQL.

Proved here, each by counting what reaches the database or the compiler (not by timing):

* concurrent enrolments share ONE compiled transaction (one change lock, catch-up, bump and
  commit), and a refused enrolment among them gets its own 403 while the others go through;
* a global change bumps every host's revision with one UPDATE, not one per host, and reads the
  revisions it bumps with one SELECT, each naming the hosts in ONE bound parameter however many
  they are (the revisions are still each host's previous one plus one);
* on PostgreSQL the batched writes of acks and policy hashes are one statement each, not one per
  agent or host;
* on PostgreSQL, the periodic read of acks other replicas took reads only the rows flushed since
  its last read (not every agent lagging in its view: a whole fleet lags while it enrols or
  during a global fan-out), and misses no flush that commits out of order.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import event, select
from tests.api.conftest import Api
from tests.api.statements import Statements

from stockade.controller.services import distribution, enrolment
from stockade.controller.services.auth import ForbiddenError
from stockade.controller.services.host_state import write_agent_rows
from stockade.controller.storage.db import AgentRow, HostStateRow, utcnow


def _estate(api: Api, hosts: int) -> None:
    api.ok("POST", "/services", 201, json={"name": "ssh", "ports": ["22/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "monitoring", "scope": "all", "rules": [
        {"consumers": [{"labels": {"role": "monitor"}}], "providers": [{"all": True}], "services": ["ssh"],
         "consumers_scope": "global"}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "t"})
    for i in range(hosts):
        api.ok("POST", "/workloads", 201, json={"name": f"h{i}", "labels": {"app": f"a{i % 3}", "role": "web"},
                                                "interfaces": [{"name": "eth0", "addresses": [f"10.9.0.{i + 1}"]}]})


def _request(code: str, i: int, addr: int | None = None) -> enrolment.EnrolRequest:
    a = i + 1 if addr is None else addr
    return enrolment.EnrolRequest(code, f"e-{i}", ({"name": "eth0", "addresses": [f"10.9.1.{a}"]},), "t", None)


def _enrol_together(api: Api, codes: list[str], first: int = 0, same_address: bool = False) -> tuple[list[Any], int]:
    """Enrol with ``codes`` from as many threads, all queued before any runs; returns each
    outcome (Enrolled or the exception) and how many compiled transactions ran. Host ``e-{first + k}``
    reports address ``10.9.1.{first + k + 1}`` (all the first one's with ``same_address``)."""
    dist, keys = api.ctl.dist, api.ctl.agent_keys
    compiled: list[int] = []
    dist.on_compile = lambda _s, bumped: compiled.append(bumped)
    out: list[Any] = [None] * len(codes)

    def run(i: int) -> None:
        try:
            out[i] = enrolment.enrol(dist, keys, _request(codes[i], first + i, first + 1 if same_address else None))
        except Exception as exc:  # compared below
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(codes))]
    with dist.lock:  # a transaction in progress: every enrolment queues behind it
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(getattr(dist, "_queued", ())) < len(codes):
            assert time.monotonic() < deadline, "the enrolments were not queued for one transaction"
            time.sleep(0.005)
    for t in threads:
        t.join(30)
    dist.on_compile = None
    return out, len(compiled)


def _code(api: Api) -> str:
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "mode": "full", "code_max_uses": 100,
                                                   "labels": {"app": "a0", "role": "db"}})
    return str(api.ok("POST", "/pairing-profiles/p/codes", 201)["code"])


def test_concurrent_enrolments_share_one_transaction(quiet_api: Api) -> None:
    api = quiet_api
    _estate(api, 3)
    code = _code(api)
    out, transactions = _enrol_together(api, [code] * 6)
    assert all(isinstance(o, enrolment.Enrolled) for o in out), out
    assert transactions == 1  # one lock, one catch-up, one bump, one commit for all six
    with api.ctl.sessions() as db:
        names = set(db.scalars(select(AgentRow.workload).where(AgentRow.revoked_at.is_(None))))
    assert names == {f"e-{i}" for i in range(6)}
    enrolled = [e for e in api.ok("GET", "/events", params={"limit": 500})["items"] if e["action"] == "agent.enroll"]
    assert len(enrolled) == 6  # each enrolment is still its own audited step
    for o in out:  # and each agent is served its policy
        token = api.headers(o.token)
        assert api.ok("GET", f"/agents/{o.agent_id}/policy", headers=token)["full"]["workload"] == o.workload


def test_a_refused_enrolment_in_a_batch_fails_alone(quiet_api: Api) -> None:
    api = quiet_api
    _estate(api, 3)
    code = _code(api)
    out, _transactions = _enrol_together(api, [code, code, "act_not-a-real-code", code])
    assert isinstance(out[2], ForbiddenError) and "unknown or revoked activation code" in str(out[2])
    assert [type(o) for i, o in enumerate(out) if i != 2] == [enrolment.Enrolled] * 3, out
    with api.ctl.sessions() as db:
        names = set(db.scalars(select(AgentRow.workload)))
    assert names == {"e-0", "e-1", "e-3"}
    assert api.ctl.dist.revisions.keys() >= {"e-0", "e-1", "e-3"} and "e-2" not in api.ctl.dist.revisions


def test_a_global_change_bumps_every_host_in_one_statement(quiet_api: Api) -> None:
    api = quiet_api
    _estate(api, 12)
    dist = api.ctl.dist
    before = dict(dist.revisions)
    body = api.ok("GET", "/workloads/h0")["body"]
    with Statements(api) as st:
        api.ok("PUT", "/workloads/h0", json={**body, "labels": {**body["labels"], "role": "monitor"}})
    bumps = st.updates("host_state")
    assert bumps and all(not many for _sql, many, _n in bumps), bumps  # no executemany of one row per host
    assert len(bumps) == 1
    assert dist.revisions == {n: r + 1 for n, r in before.items()}  # every host, each one step on
    with api.ctl.sessions() as db:
        stored = {w: r for w, r in db.execute(select(HostStateRow.workload, HostStateRow.revision))}
    assert stored == dist.revisions


def test_a_global_change_names_its_1000_hosts_in_one_parameter(quiet_api: Api) -> None:
    """Before any agent is woken, the bump of 1,000 hosts was two reads and two updates of 900 and
    100 bound parameters (~20 ms of CPU per global change, issue 19); now one of each, one parameter
    for all the hosts."""
    api = quiet_api
    _estate(api, 2)
    api.ok("POST", "/workload-batches", json={"upsert": [
        {"name": f"b{i}", "labels": {"app": f"a{i % 7}", "role": "web"},
         "interfaces": [{"name": "eth0", "addresses": [f"10.8.{i // 250}.{i % 250 + 1}"]}]} for i in range(1000)]})
    dist = api.ctl.dist
    seen: list[tuple[str, int]] = []  # (statement, bound parameters) of those on host_state

    def record(_conn: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        if "host_state" in sql and not sql.lstrip().upper().startswith("SELECT CHANGE_LOG"):
            seen.append((" ".join(sql.split())[:40], -1 if many else len(params)))

    engine = api.ctl.sessions.kw["bind"]
    for role in ("monitor", "web"):
        before = dict(dist.revisions)
        body = api.ok("GET", "/workloads/h0")["body"]
        seen.clear()
        event.listen(engine, "before_cursor_execute", record)
        try:
            api.ok("PUT", "/workloads/h0", json={**body, "labels": {**body["labels"], "role": role}})
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert len(before) == 1002 and dist.revisions == {n: r + 1 for n, r in before.items()}
        kinds = sorted(sql.split()[0].upper() for sql, _n in seen)
        assert kinds == ["SELECT", "UPDATE"], seen
        assert all(0 <= n <= 5 for _sql, n in seen), seen  # the hosts, time, change, "+ 1", the empty hash
    with api.ctl.sessions() as db:
        stored = {w: r for w, r in db.execute(select(HostStateRow.workload, HostStateRow.revision))}
    assert stored == dist.revisions


def test_postgresql_writes_acks_and_hashes_in_one_statement_each(quiet_api: Api) -> None:
    api = quiet_api
    if api.ctl.sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("SQLite keeps executemany (no arrays); one statement per batch is PostgreSQL's")
    _estate(api, 10)
    code = _code(api)
    agents = [enrolment.enrol(api.ctl.dist, api.ctl.agent_keys, _request(code, i)) for i in range(5)]
    dist = api.ctl.dist
    dist.flush()
    body = api.ok("GET", "/workloads/h0")["body"]
    api.ok("PUT", "/workloads/h0", json={**body, "labels": {**body["labels"], "role": "monitor"}})
    for a in agents:
        dist.agent_ack(a.agent_id, dist.revisions[a.workload])
        dist.agent_heartbeat(a.agent_id)
    with Statements(api) as st:
        assert dist.flush() == 5
    assert [many for _sql, many, _n in st.updates("agents")] == [False]
    assert [many for _sql, many, _n in st.updates("host_state")] == [False]
    with api.ctl.sessions() as db:
        applied = {w: r for w, r in db.execute(select(AgentRow.workload, AgentRow.applied_revision))}
        hashes = {w: h for w, h in db.execute(select(HostStateRow.workload, HostStateRow.policy_hash))}
    assert applied == {a.workload: dist.revisions[a.workload] for a in agents}
    assert all(len(h) == 64 for h in hashes.values()), hashes
    assert hashes["h3"] == distribution.policy_hash(dist.fetch("h3", None).policy)  # type: ignore[arg-type]


def _flush_elsewhere(db: Any, dist: Any, agent_ids: list[str]) -> None:
    """What another replica's flush writes for agents acknowledging there (in ``db``'s transaction)."""
    write_agent_rows(db, [{"id": a, "applied_revision": dist.revisions[dist.agents[a].workload],
                           "last_heartbeat": utcnow()} for a in agent_ids])


def test_postgresql_refresh_reads_only_rows_flushed_since_its_last_read(quiet_api: Api) -> None:
    """A fleet that has not acknowledged yet (enrolling, or in a global fan-out) lags in every
    replica's view: re-reading every lagging agent each round was rows x rounds x replicas."""
    api = quiet_api
    dist = api.ctl.dist
    if not dist.shared:
        pytest.skip("acks taken by other replicas: PostgreSQL only")
    _estate(api, 4)
    code = _code(api)
    agents = [enrolment.enrol(dist, api.ctl.agent_keys, _request(code, i)) for i in range(6)]
    dist.flush()
    assert all(dist.agents[a.agent_id].applied != dist.revisions[a.workload] for a in agents)  # all lag
    dist._refresh_round = 0
    assert dist.refresh_agents() == 6  # the first read: every agent
    assert dist.refresh_agents() == 0  # nothing flushed since, though all six still lag here
    acked = agents[0]
    with api.ctl.sessions.begin() as db:  # another replica took and flushed one ack
        _flush_elsewhere(db, dist, [acked.agent_id])
    assert dist.refresh_agents() == 1
    assert dist.agents[acked.agent_id].applied == dist.revisions[acked.workload]
    assert dist.refresh_agents() == 0
    for _ in range(distribution.FULL_REFRESH_ROUNDS - 4):
        dist.refresh_agents()
    assert dist.refresh_agents() == 6  # the safety net: every row once in FULL_REFRESH_ROUNDS


def test_postgresql_refresh_reads_a_flush_that_commits_after_a_younger_one(quiet_api: Api) -> None:
    """Flushes on different replicas commit in any order: one that began before a refresh and
    commits after it (behind a younger flush that the refresh saw) is still read next time."""
    api = quiet_api
    dist = api.ctl.dist
    if not dist.shared:
        pytest.skip("acks taken by other replicas: PostgreSQL only")
    _estate(api, 4)
    code = _code(api)
    first, second = (enrolment.enrol(dist, api.ctl.agent_keys, _request(code, i)) for i in range(2))
    dist.flush()
    dist._refresh_round = 0
    dist.refresh_agents()
    slow = api.ctl.sessions()
    slow.begin()
    try:
        _flush_elsewhere(slow, dist, [first.agent_id])  # the older transaction, not committed yet
        with api.ctl.sessions.begin() as db:
            _flush_elsewhere(db, dist, [second.agent_id])  # a younger one, committed
        assert dist.refresh_agents() == 1
        assert dist.agents[second.agent_id].applied == dist.revisions[second.workload]
        assert dist.agents[first.agent_id].applied == 0
        slow.commit()
    finally:
        slow.close()
    dist.refresh_agents()
    assert dist.agents[first.agent_id].applied == dist.revisions[first.workload]
