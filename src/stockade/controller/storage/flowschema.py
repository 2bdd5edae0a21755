"""The flow store's schema and records: tables, the query filter, settings (see ``flowstore.py``).

The tables are created by the Alembic migrations (``0002_flows`` and later); these SQLAlchemy
``Table`` objects describe them for the queries of :mod:`stockade.controller.storage.flowstore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, MetaData, SmallInteger, String, Table, Text

from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.model.services import Proto
from stockade.visibility.flows import VERDICT_SEVERITY, FlowKey
from stockade.visibility.wire import SIDE_OF_TEXT

HOUR_MS = 3_600_000
RETENTION_LOCK = 0x53_74_6B_03  # pg_try_advisory_xact_lock: one replica applies retention at a time
QUERY_HOURS = 24  # an Explorer page is read a day of buckets at a time, newest first
VERDICT_OF_CODE = {code: v for v, code in VERDICT_SEVERITY.items()}
SIDE_CODE = {Direction.OUTBOUND: 0, Direction.INBOUND: 1}
SIDE_OF_CODE = {v: k for k, v in SIDE_CODE.items()}
_VERDICT_TEXT_CODE = {v.value: code for v, code in VERDICT_SEVERITY.items()}
_SIDE_TEXT_CODE = {t: SIDE_CODE[d] for t, d in SIDE_OF_TEXT.items()}
_PROTOS = frozenset(p.value for p in Proto)
_MASK63 = (1 << 63) - 1

meta = MetaData()


def _flow_columns() -> list[Column[Any]]:
    return [
        Column("first_seen", BigInteger), Column("last_seen", BigInteger),
        Column("src_ip", String(45)), Column("dst_ip", String(45)),
        Column("proto", String(8)), Column("port", Integer, nullable=True),
        Column("side", SmallInteger), Column("verdict", SmallInteger), Column("rule_id", String(128)),
        Column("count", BigInteger), Column("reporter", String(64)),
        Column("src_ep", Integer), Column("dst_ep", Integer),
    ]


flows = Table("flows", meta, Column("bucket", Integer, primary_key=True), Column("h", BigInteger, primary_key=True),
              *_flow_columns())
flow_ingest = Table("flow_ingest", meta, Column("id", BigInteger, primary_key=True), Column("bucket", Integer),
                    Column("h", BigInteger), *_flow_columns())
flow_endpoints = Table("flow_endpoints", meta, Column("id", Integer, primary_key=True), Column("workload", String(64)),
                       Column("labels", Text))
flow_links = Table("flow_links", meta, Column("bucket", Integer, primary_key=True),
                   Column("src_ep", Integer, primary_key=True), Column("dst_ep", Integer, primary_key=True),
                   Column("proto", String(8), primary_key=True), Column("port", Integer, primary_key=True),
                   Column("verdict", SmallInteger), Column("count_out", BigInteger), Column("count_in", BigInteger))
flow_agents = Table("flow_agents", meta, Column("agent_id", String(32), primary_key=True),
                    Column("workload", String(64)), Column("records", BigInteger), Column("batches", BigInteger),
                    Column("dropped", BigInteger), Column("last_upload", BigInteger))

COLUMNS = ("bucket", "h", "first_seen", "last_seen", "src_ip", "dst_ip", "proto", "port", "side", "verdict",
           "rule_id", "count", "reporter", "src_ep", "dst_ep")
_KEYS = ", ".join(COLUMNS[2:])
_PICK = ", ".join(f"{agg}({c})" for agg, c in (
    ("min", "first_seen"), ("max", "last_seen"), ("min", "src_ip"), ("min", "dst_ip"), ("min", "proto"),
    ("min", "port"), ("min", "side"), ("min", "verdict"), ("min", "rule_id"), ("sum", "count"),
    ("min", "reporter"), ("min", "src_ep"), ("min", "dst_ep")))


@dataclass(frozen=True)
class FlowSettings:
    max_age_hours: int = 30 * 24
    max_rows: int = 20_000_000
    prune_interval: float = 300.0
    compact_interval: float = 2.0  # seconds between compactions triggered by ingestion (reads compact first)
    compact_batch: int = 200_000  # log rows moved per compaction step
    impact_window_hours: int = 7 * 24  # what the provision guard replays


@dataclass(frozen=True)
class EndpointInfo:
    """A workload with the labels it had, or (``workload == ""``) an unmanaged peer group."""

    id: int
    workload: str
    labels: frozenset[Any]  # frozenset[Label]
    ip_list: str | None = None  # unmanaged: the IP list; None with no workload: the internet

    @property
    def managed(self) -> bool:
        return bool(self.workload)


@dataclass(frozen=True)
class StoredFlow:
    """One summary row, with its endpoints as resolved at ingest time."""

    bucket: int
    h: int
    key: FlowKey
    side: Direction
    verdict: Verdict
    rule_id: str
    count: int
    first_seen: float
    last_seen: float
    reporter: str
    src_ep: int
    dst_ep: int

    @property
    def cursor(self) -> str:
        return f"{self.bucket}.{self.h}"


@dataclass(frozen=True)
class FlowFilter:
    """A query. Endpoint sets: None = no filter, empty = matches nothing. Times in unix ms."""

    since_ms: int | None = None
    until_ms: int | None = None
    src_ip: str | None = None
    dst_ip: str | None = None
    any_ip: str | None = None
    src_eps: frozenset[int] | None = None
    dst_eps: frozenset[int] | None = None
    any_eps: frozenset[int] | None = None
    port: int | None = None
    proto: str | None = None
    verdicts: frozenset[int] | None = None
    sides: frozenset[int] | None = None

    def empty(self) -> bool:
        return any(s is not None and not s for s in (self.src_eps, self.dst_eps, self.any_eps))
