"""PostgreSQL flow store partitioned by day: compaction carves day partitions, retention drops them,
a query of recent hours reads only their partitions, and the results are those of the plain store
(the rest of ``test_flows.py`` runs unchanged on the partitioned tables)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from tests.api.conftest import Api, PgCluster, make_settings
from tests.api.test_flows import load_estate, rec

from stockade.controller.api.flows import active_policy
from stockade.controller.app import create_app
from stockade.controller.storage.flowparts import partition_days
from stockade.controller.storage.flowstore import HOUR_MS, FlowFilter, FlowSettings, FlowStore


@pytest.fixture
def pg_api(pg_cluster: PgCluster) -> Iterator[Api]:
    app = create_app(make_settings(pg_cluster.create_database()))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)


def test_day_partitions_retention_drops_them_and_queries_prune(pg_api: Api) -> None:
    engine = pg_api.ctl.engine
    fs = FlowStore(engine, FlowSettings(max_age_hours=3 * 24))
    load_estate(pg_api)
    policy = active_policy(pg_api.ctl)
    now = time.time()
    today = int(now * 1000) // HOUR_MS // 24
    records = [rec("10.70.0.11", "10.70.0.21", 100 * day + k, "out", "allowed", t=now - day * 86400 - 60)
               for day in range(5) for k in range(3)]
    fs.ingest("a1", "web-prod-1", {"sent_at": now, "records": records}, policy, now)
    fs.compact(wait=True)
    with engine.connect() as conn:
        days = partition_days(conn)
        assert {today - d for d in range(5)} <= days, days
        assert partition_days(conn, "flow_links") == days
        assert conn.execute(text("SELECT count(*) FROM flows_default")).scalar_one() == 0
        per_day = dict(conn.execute(text("SELECT tableoid::regclass::text, count(*) FROM flows GROUP BY 1")).all())
        assert per_day == {f"flows_d{today - d}": 3 for d in range(5)}, per_day
        hour = int(now * 1000) // HOUR_MS
        plan = "\n".join(conn.execute(text(f"EXPLAIN SELECT * FROM flows WHERE bucket >= {hour - 1} "
                                           f"AND bucket <= {hour}")).scalars())
        assert f"flows_d{today}" in plan and f"flows_d{today - 2}" not in plan, plan  # pruned at plan time
    assert len(fs.aggregate(FlowFilter(since_ms=0), now)) == 15
    assert fs.prune(now) >= 3  # the oldest day goes as one DROP
    with engine.connect() as conn:
        assert today - 4 not in partition_days(conn) and today - 4 not in partition_days(conn, "flow_links")
    ports = sorted(r[5] for r in fs.aggregate(FlowFilter(since_ms=0), now))
    assert all(p < 400 for p in ports) and {0, 100, 200} <= set(ports), ports
    later = [rec("10.70.0.11", "10.70.0.21", 999, "out", "allowed", t=now - 5)]
    fs.ingest("a1", "web-prod-1", {"sent_at": now, "records": later}, policy, now)
    fs.compact(wait=True)  # a known day: no DDL, straight into its partition
    assert 999 in {r[5] for r in fs.aggregate(FlowFilter(since_ms=0), now)}
