"""Time partitions of the flow summaries on PostgreSQL: one partition per day, retention drops them.

Migration ``0009_replicas`` makes ``flows`` and ``flow_links`` declaratively partitioned by
``RANGE (bucket)`` (a bucket is an hour), with a ``DEFAULT`` partition. The flow store then keeps
one partition per day, named ``flows_d<day>`` / ``flow_links_d<day>`` with ``day = bucket // 24``:

* :func:`ensure_days` creates the partitions of the days compaction is about to write (each
  once per process): the new table is filled with whatever rows of its range the default
  partition holds, those are deleted there, and the table is attached - the usual way to carve a
  range out of a default partition. Days outside the retention window stay in the default.
* :func:`drop_days_before` is retention: a day entirely older than the cutoff is one ``DROP
  TABLE`` per table, not a ``DELETE`` of its rows (no dead tuples, no vacuum debt).
* Every query already names its hours (``bucket`` ranges), so the planner reads only the
  partitions of those days.

Partition DDL runs under a transaction-scoped advisory lock, so replicas do not race on it. SQLite
keeps one table per kind (nothing here runs there).
"""

from __future__ import annotations

import re

from sqlalchemy import text
from sqlalchemy.engine import Connection

PARTITION_LOCK = 0x53_74_6B_04
TABLES = ("flows", "flow_links")
HOURS_PER_DAY = 24
PARAMS = {  # the storage parameters migration 0004 set on the plain tables, per partition now
    "flows": "fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02",
    "flow_links": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, "
                  "autovacuum_vacuum_cost_delay = 0",
}
_NAME = re.compile(r"^(flows|flow_links)_d(\d+)$")


def partition_days(conn: Connection, table: str = "flows") -> set[int]:
    """The days that have their own partition of ``table``."""
    rows = conn.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                             "WHERE i.inhparent = CAST(:t AS regclass)"), {"t": table}).scalars()
    out = set()
    for name in rows:
        m = _NAME.match(name)
        if m and m.group(1) == table:
            out.add(int(m.group(2)))
    return out


def ensure_days(conn: Connection, days: set[int]) -> set[int]:
    """Give each of ``days`` its partitions (in this transaction); returns the days created."""
    if not days:
        return set()
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PARTITION_LOCK})
    created: set[int] = set()
    for table in TABLES:
        have = partition_days(conn, table)
        for day in sorted(days - have):
            lo, hi = day * HOURS_PER_DAY, (day + 1) * HOURS_PER_DAY
            part = f"{table}_d{int(day)}"
            conn.execute(text(f"CREATE TABLE {part} (LIKE {table} INCLUDING DEFAULTS) WITH ({PARAMS[table]})"))
            span = {"lo": lo, "hi": hi}
            conn.execute(text(f"INSERT INTO {part} SELECT * FROM {table}_default WHERE bucket >= :lo AND bucket < :hi"),
                         span)
            conn.execute(text(f"DELETE FROM {table}_default WHERE bucket >= :lo AND bucket < :hi"), span)
            conn.execute(text(f"ALTER TABLE {table} ATTACH PARTITION {part} FOR VALUES FROM ({lo}) TO ({hi})"))
            created.add(day)
    return created


def drop_days_before(conn: Connection, cutoff_bucket: int) -> int:
    """Drop the partitions of every day that ends at or before ``cutoff_bucket``; returns the
    summaries (rows of ``flows``) they held."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PARTITION_LOCK})
    dropped = 0
    for table in TABLES:
        for day in sorted(partition_days(conn, table)):
            if (day + 1) * HOURS_PER_DAY > cutoff_bucket:
                continue
            part = f"{table}_d{int(day)}"
            if table == "flows":
                dropped += int(conn.execute(text(f"SELECT count(*) FROM {part}")).scalar_one())
            conn.execute(text(f"DROP TABLE {part}"))
    return dropped
