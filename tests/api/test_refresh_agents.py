"""Reading the acks and heartbeats other replicas flushed (PostgreSQL): each row once, never our own.

``PolicyDistributor.refresh_agents`` runs every flush round on every replica. During a global
fan-out every agent acknowledges once, so each replica used to read every agent's row (a third of
them its own flushes) at least once, and again at every round while any older transaction was
still open (the bound was the snapshot's xmin). Proved here, each by counting rows:

* a flush the previous read saw is not read again while an older transaction stays open, and
  that older transaction's flush is read once it commits;
* this replica's own flushes are not read back (the full read, once a minute, still reads them);
* whatever the interleaving of flushes here and elsewhere (committed in any order, some open
  across reads), the incremental reads leave memory exactly as a full read of every row does.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, text
from tests.api.conftest import Api, PgCluster, make_settings
from tests.api.test_fanout_cost import _code, _estate, _flush_elsewhere, _request

from stockade.controller.app import create_app
from stockade.controller.services import enrolment, host_state
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.host_state import write_agent_rows
from stockade.controller.storage.db import AgentRow, utcnow


@pytest.fixture
def pg_api(pg_cluster: PgCluster) -> Iterator[Api]:
    app = create_app(make_settings(pg_cluster.create_database(), flush_interval=3600.0))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)


def _fleet(api: Api, n: int) -> list[Any]:
    _estate(api, 4)
    code = _code(api)
    agents = [enrolment.enrol(api.ctl.dist, api.ctl.agent_keys, _request(code, i)) for i in range(n)]
    api.ctl.dist.flush()
    api.ctl.dist._refresh_round = 0
    api.ctl.dist.refresh_agents()  # the first read: every row
    return agents


def test_a_flush_already_read_is_not_read_again_while_an_older_transaction_is_open(pg_api: Api) -> None:
    dist = pg_api.ctl.dist
    first, second = _fleet(pg_api, 2)
    older = pg_api.ctl.sessions()
    older.begin()
    try:
        older.execute(text("SELECT pg_current_xact_id()"))  # an open transaction holding an id (any kind)
        _flush_elsewhere(older, dist, [first.agent_id])  # ...that flushes too, committed later
        with pg_api.ctl.sessions.begin() as db:
            _flush_elsewhere(db, dist, [second.agent_id])
        assert dist.refresh_agents() == 1
        assert dist.refresh_agents() == 0  # the snapshot's xmin alone read the younger flush every round
        assert dist.refresh_agents() == 0
        older.commit()
    finally:
        older.close()
    assert dist.refresh_agents() == 1  # the older flush, once committed
    assert dist.agents[first.agent_id].applied == dist.revisions[first.workload]
    assert dist.refresh_agents() == 0


def test_this_replicas_own_flushes_are_not_read_back(pg_api: Api) -> None:
    dist = pg_api.ctl.dist
    agents = _fleet(pg_api, 6)
    for a in agents[:4]:
        dist.agent_ack(a.agent_id, dist.revisions[a.workload])
    assert dist.flush() == 4
    with pg_api.ctl.sessions.begin() as db:
        _flush_elsewhere(db, dist, [agents[5].agent_id])
    assert dist.refresh_agents() == 1  # the other replica's row only (the old read: 5)
    assert dist.refresh_agents() == 0
    dist._refresh_round = 0
    assert dist.refresh_agents() == 6  # the safety net still reads every row, ours included
    beats = [a.last_heartbeat for a in dist.agents.values() if a.last_heartbeat is not None]
    assert beats and all(b.tzinfo is dt.UTC for b in beats)  # as the ORM's UTCDateTime reads them


def _state(dist: PolicyDistributor) -> dict[str, tuple[int, Any]]:
    return {a.agent_id: (a.applied, a.last_heartbeat) for a in dist.agents.values()}


@pytest.mark.parametrize("seed", range(4))
def test_incremental_reads_leave_memory_as_a_full_read_does(pg_api: Api, seed: int) -> None:
    """Flushes here and elsewhere, committed in any order, some open across several reads: after
    every read, a full read of every row changes nothing in memory (the slow path agrees)."""
    dist = pg_api.ctl.dist
    rng = random.Random(seed)
    agents = _fleet(pg_api, 8)
    revision = 1
    open_txns: list[Any] = []
    for _ in range(40):
        action = rng.random()
        held = {agent_id for _s, agent_id in open_txns}  # rows an open flush holds: nobody else writes them now
        free = [a for a in agents if a.agent_id not in held]
        pick = rng.sample(free, min(len(free), rng.randint(1, 4)))
        revision += 1
        if action < 0.3:  # acks taken here
            for a in pick:
                dist.agent_ack(a.agent_id, revision)
            dist.flush()
        elif action < 0.55:  # another replica's flush, committed at once
            with pg_api.ctl.sessions.begin() as db:
                write_agent_rows(db, [{"id": a.agent_id, "applied_revision": revision, "last_heartbeat": utcnow()}
                                      for a in pick])
        elif action < 0.75 and len(open_txns) < 3 and pick:  # another replica's flush, left open a while
            slow = pg_api.ctl.sessions()
            slow.begin()
            write_agent_rows(slow, [{"id": pick[0].agent_id, "applied_revision": revision,
                                     "last_heartbeat": utcnow()}])
            open_txns.append((slow, pick[0].agent_id))
        elif open_txns:  # one of the open flushes commits
            slow, _held = open_txns.pop(rng.randrange(len(open_txns)))
            slow.commit()
            slow.close()
        dist.refresh_agents()
        if not open_txns and not any(a.dirty for a in dist.agents.values()):
            incremental = _state(dist)
            dist._refresh_round = 0
            dist.refresh_agents()
            assert _state(dist) == incremental
    for slow, _held in open_txns:
        slow.commit()
        slow.close()
    dist.refresh_agents()
    incremental = _state(dist)
    dist._refresh_round = 0
    dist.refresh_agents()
    assert _state(dist) == incremental



def test_a_flush_as_joined_texts_stores_what_the_arrays_store(pg_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acks and heartbeats of a flush go as three texts the server splits (not three arrays the
    driver quotes element by element); what is stored is the same, NULL heartbeats and microseconds
    included, and anything the texts could not carry goes as arrays."""
    agents = _fleet(pg_api, 6)
    ids = [a.agent_id for a in agents]
    beat = dt.datetime(2026, 12, 6, 17, 31, 15, 123457, tzinfo=dt.UTC)
    rows = [{"id": a, "applied_revision": 40 + i,
             "last_heartbeat": None if i % 3 == 0 else beat + dt.timedelta(microseconds=i)} for i, a in enumerate(ids)]
    sent: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        if statement.startswith("UPDATE agents"):
            sent.append("lines" if "string_to_array" in statement else "arrays")

    def stored() -> dict[str, tuple[int, Any]]:
        with pg_api.ctl.sessions() as db:
            return {i: (r, b) for i, r, b in db.execute(
                select(AgentRow.id, AgentRow.applied_revision, AgentRow.last_heartbeat).where(AgentRow.id.in_(ids)))}

    engine = pg_api.ctl.sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", spy)
    try:
        with pg_api.ctl.sessions.begin() as db:
            write_agent_rows(db, rows)
        assert sent == ["lines"]
        assert stored() == {r["id"]: (r["applied_revision"], r["last_heartbeat"]) for r in rows}
        with pg_api.ctl.sessions.begin() as db:  # the same through the arrays: the same rows
            write_agent_rows(db, [{**r, "applied_revision": 0} for r in rows[:1]])  # one row alone: arrays
            write_agent_rows(db, [{**r, "applied_revision": 1} for r in rows[1:]])
        assert sent == ["lines", "arrays", "lines"]
        naive = [{**r, "last_heartbeat": beat.replace(tzinfo=None)} for r in rows[:2]]  # no zone: the driver's reading
        with pg_api.ctl.sessions.begin() as db:
            write_agent_rows(db, naive)
        assert sent == ["lines", "arrays", "lines", "arrays"]
        with pg_api.ctl.sessions.begin() as db:
            write_agent_rows(db, rows)
        by_lines = stored()
        with pg_api.ctl.sessions.begin() as db:
            write_agent_rows(db, [{**r, "applied_revision": 0, "last_heartbeat": utcnow()} for r in rows])
        monkeypatch.setattr(host_state, "pg_lines", lambda _values: None)  # as if an id held a line break
        with pg_api.ctl.sessions.begin() as db:
            write_agent_rows(db, rows)
        assert sent[-1] == "arrays"
        assert stored() == by_lines
    finally:
        event.remove(engine, "before_cursor_execute", spy)
