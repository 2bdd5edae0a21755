"""Flow storage of the controller: ingest, compaction into hourly summaries, queries, retention.

Layout (migration ``0002_flows``):

* ``flow_ingest`` - an append-only log with no secondary index: an agent's upload is one
  bulk insert (``executemany`` on SQLite, ``COPY`` on PostgreSQL), so ingestion costs what an
  append costs;
* ``flows`` - the summaries queries read: one row per (hour bucket, ``h``) where ``h`` is a
  stable 63-bit hash of (reporter, side, src, dst, proto, port, verdict, rule, endpoints), so
  the same kind of connection reported every few seconds stays one row per hour with its count
  and first/last seen. Primary key ``(bucket, h)`` (clustered: SQLite ``WITHOUT ROWID``) and
  indexes ``(bucket, src_ip|dst_ip|src_ep|dst_ep|port+verdict)``: every query names its hours, so
  a filtered query is a few index seeks per hour and inserts touch only the current hour's pages;
* **compaction** moves the log into ``flows`` with one ``INSERT .. SELECT .. GROUP BY ..
  ON CONFLICT DO UPDATE`` (PostgreSQL: a ``DELETE .. RETURNING`` CTE feeding it, atomic under
  concurrent ingestion; SQLite: after taking the write lock), and rolls it up into
  ``flow_links`` (per hour, endpoint pair and service: worst verdict, each side's count), which
  the application map reads. It runs after an ingest when
  the last one is older than ``compact_interval`` and before every read, so reads see
  everything acknowledged;
* ``flow_endpoints`` - each (workload, its labels at ingest time) gets a small id, and so does
  each unmanaged peer group (workload ``""``, labels ``iplist:<name>`` for the most specific IP
  list holding the address, or ``internet``); flows carry ``src_ep`` / ``dst_ep``, so label and
  workload filters become indexed ``IN`` lists, the application map groups by small integers,
  and a flow keeps the labels and IP list it had when it happened;
* ``flow_agents`` - per agent: records and batches received, summaries it dropped (as last
  reported), last upload.

Retention: buckets older than ``max_age_hours`` are deleted, and when more than ``max_rows``
summaries are stored the oldest hours go first (checked every ``prune_interval`` seconds).
Verdicts are stored as their severity (0 allowed, 1 potentially blocked, 2 blocked).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection as DbConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from stockade.controller.storage import flowparts
from stockade.controller.storage.flowschema import (
    _KEYS,
    _MASK63,
    _PICK,
    _PROTOS,
    _SIDE_TEXT_CODE,
    _VERDICT_TEXT_CODE,
    COLUMNS,
    HOUR_MS,
    QUERY_HOURS,
    RETENTION_LOCK,
    SIDE_CODE,
    SIDE_OF_CODE,
    VERDICT_OF_CODE,
    EndpointInfo,
    FlowFilter,
    FlowSettings,
    StoredFlow,
    flow_agents,
    flow_endpoints,
    flow_ingest,
    flow_links,
    flows,
)
from stockade.errors import Issue, ValidationError
from stockade.model.policy import Policy
from stockade.model.services import Proto
from stockade.visibility.flows import FlowKey, Resolver, labels_text, parse_labels_text
from stockade.visibility.wire import MAX_RECORDS, MAX_RULE_ID

__all__ = [  # the schema's names are re-exported: callers import the store and its records from here
    "COLUMNS",
    "HOUR_MS",
    "QUERY_HOURS",
    "RETENTION_LOCK",
    "SIDE_CODE",
    "SIDE_OF_CODE",
    "VERDICT_OF_CODE",
    "EndpointInfo",
    "FlowFilter",
    "FlowSettings",
    "FlowStore",
    "StoredFlow",
    "flow_agents",
    "flow_endpoints",
    "flow_ingest",
    "flow_links",
    "flows",
]

log = logging.getLogger("stockade.controller.flows")
@dataclass
class _IngestState:
    policy: Policy | None = None
    owner: dict[str, tuple[str, str]] = field(default_factory=dict)  # address -> (workload, labels text)
    resolver: Resolver | None = None


def _bad(field_name: str, message: str) -> ValidationError:
    return ValidationError([Issue("api", 0, field_name, message)])


class FlowStore:
    def __init__(self, engine: Engine, settings: FlowSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or FlowSettings()
        self.postgres = engine.dialect.name == "postgresql"
        self._compact_lock = threading.Lock()
        self._ep_lock = threading.Lock()
        self._last_compact = 0.0
        self._appends = 1  # uploads appended by this process (1: whatever an earlier run left behind)
        self._compacted = 0  # ... of which compaction has moved everything
        self._last_prune = time.monotonic()
        self._days: set[int] = set()  # PostgreSQL: days with their own partition (flowparts)
        self._days_known = False
        self._ips: dict[str, str] = {}  # address text -> canonical text
        self._keys: dict[tuple[Any, ...], tuple[int, str, str, int, int, int, int]] = {}  # record key -> validated
        self._keys_policy: Policy | None = None
        self._state = _IngestState()
        self._eps: dict[tuple[str, str], int] = {}
        self.endpoints: dict[int, EndpointInfo] = {}
        self._load_endpoints()

    # ---- endpoints -------------------------------------------------------------------------
    def _load_endpoints(self) -> None:
        with self.engine.connect() as conn:
            for row in conn.execute(select(flow_endpoints.c.id, flow_endpoints.c.workload, flow_endpoints.c.labels)):
                self._remember(int(row.id), row.workload, row.labels)

    def _remember(self, ep_id: int, workload: str, labels: str) -> None:
        self._eps[(workload, labels)] = ep_id
        if workload:
            info = EndpointInfo(ep_id, workload, parse_labels_text(labels) if labels else frozenset())
        else:
            info = EndpointInfo(ep_id, "", frozenset(), labels[7:] if labels.startswith("iplist:") else None)
        self.endpoints[ep_id] = info

    def endpoint_id(self, workload: str, labels: str) -> int:
        found = self._eps.get((workload, labels))
        if found is not None:
            return found
        with self._ep_lock:
            found = self._eps.get((workload, labels))
            if found is not None:
                return found
            try:
                with self.engine.begin() as conn:
                    conn.execute(flow_endpoints.insert().values(workload=workload, labels=labels))
            except IntegrityError:  # another controller process made it first
                pass
            with self.engine.connect() as conn:
                ep_id = conn.execute(select(flow_endpoints.c.id).where(
                    flow_endpoints.c.workload == workload, flow_endpoints.c.labels == labels)).scalar_one()
            self._remember(int(ep_id), workload, labels)
            return int(ep_id)

    def endpoints_matching(self, labels: frozenset[Any] = frozenset(), workload: str | None = None) -> frozenset[int]:
        """Endpoint ids whose labels include ``labels`` and whose workload is ``workload`` (if given)."""
        return frozenset(
            e.id for e in list(self.endpoints.values())
            if e.managed and labels <= e.labels and (workload is None or e.workload == workload)
        )

    # ---- ingestion ---------------------------------------------------------------------------
    def _canonical(self, text_ip: Any) -> str:
        """The canonical text of an address (cached; the hot path reads ``self._ips`` directly)."""
        if not isinstance(text_ip, str):
            raise ValueError("address must be a string")
        try:
            found = str(ipaddress.ip_address(text_ip))
        except ValueError:
            raise ValueError(f"not an IP address: {text_ip[:60]!r}") from None
        if len(self._ips) > 200_000:
            self._ips.clear()
        self._ips[text_ip] = found
        return found

    def _owners(self, policy: Policy) -> dict[str, tuple[str, str]]:
        """Address -> (workload, labels) for the policy's workloads; unmanaged ones added as met."""
        st = self._state
        if st.policy is not policy:
            owner = {}
            for w in policy.workloads:
                lt = labels_text(w.labels)
                for a in w.addresses:
                    owner[str(a)] = (w.name, lt)
            self._state = st = _IngestState(policy, owner, Resolver(policy))
        return st.owner

    def _unmanaged(self, addr: str) -> tuple[str, str]:
        resolver = self._state.resolver
        ip_list = resolver.ip_list_of(ipaddress.ip_address(addr)) if resolver is not None else None
        found = ("", f"iplist:{ip_list}" if ip_list else "internet")  # an unmanaged peer group's row
        policy = self._state.policy
        if len(self._state.owner) > 500_000 and policy is not None:  # forget the unmanaged addresses met
            self._state = _IngestState()
            self._owners(policy)
        self._state.owner[addr] = found
        return found

    def ingest(self, agent_id: str, reporter: str, body: Any, policy: Policy, now: float) -> int:
        """Validate and append one upload (:mod:`stockade.visibility.wire`); returns records accepted."""
        if not isinstance(body, dict):
            raise _bad("", "expected a JSON object")
        sent_at, dropped = body.get("sent_at", now), body.get("dropped", 0)
        if isinstance(sent_at, bool) or not isinstance(sent_at, int | float) or not math.isfinite(sent_at):
            raise _bad("sent_at", "must be a number")
        if isinstance(dropped, bool) or not isinstance(dropped, int):  # JSON true is not an integer
            raise _bad("dropped", "must be an integer")
        if not 0 <= dropped < 2**53:
            raise _bad("dropped", "must be between 0 and 2**53")
        records = body.get("records")
        if not isinstance(records, list):
            raise _bad("records", "expected a list")
        if len(records) > MAX_RECORDS:
            raise _bad("records", f"at most {MAX_RECORDS} records per upload")
        skew = now - sent_at
        now_ms = int(now * 1000)
        owners = self._owners(policy)
        eps: dict[str, int] = {}

        def ep_of(addr: str) -> int:
            found = eps.get(addr)
            if found is None:
                own = owners.get(addr) or self._unmanaged(addr)
                found = eps[addr] = self.endpoint_id(*own)
            return found

        rows = []
        cache = self._keys
        if len(cache) > 300_000 or self._keys_policy is not policy:
            cache.clear()
            self._keys_policy = policy
        for i, rec in enumerate(records):
            try:
                src, dst, proto, port, side, verdict, rule, count, first, last = rec
                if type(count) is not int or not 0 < count < 2**40:
                    raise ValueError("bad count")
                first_ms = min(int((float(first) + skew) * 1000), now_ms)
                last_ms = min(int((float(last) + skew) * 1000), now_ms)
                if not 0 < first_ms <= last_ms:
                    raise ValueError("bad times")
                if port is not None and type(port) is not int:  # 80.0 or true would hit 80's cache entry
                    raise ValueError("bad port")
                known = cache.get((reporter, src, dst, proto, port, side, verdict, rule))
                if known is None:
                    known = self._key(reporter, src, dst, proto, port, side, verdict, rule, ep_of)
            except (ValueError, TypeError, KeyError) as exc:
                raise _bad(f"records[{i}]", str(exc) or type(exc).__name__) from None
            rows.append((last_ms // HOUR_MS, known[0], first_ms, last_ms, known[1], known[2], proto, port, known[3],
                         known[4], rule, count, reporter, known[5], known[6]))
        with self.engine.begin() as conn:
            if rows:
                self._append(conn, rows)
            self._count_upload(conn, agent_id, reporter, len(rows), dropped, now_ms)
        if rows:
            self._appends += 1
        if time.monotonic() - self._last_compact >= self.settings.compact_interval:
            self.compact()
        return len(rows)

    def _key(self, reporter: str, src: Any, dst: Any, proto: Any, port: Any, side: Any, verdict: Any, rule: Any,
             ep_of: Any) -> tuple[int, str, str, int, int, int, int]:
        """Validate one kind of record and work out its hash and endpoints (cached per policy)."""
        raw = (reporter, src, dst, proto, port, side, verdict, rule)
        src = self._ips.get(src) or self._canonical(src)
        dst = self._ips.get(dst) or self._canonical(dst)
        if (":" in src) != (":" in dst):
            raise ValueError("source and destination of different families")
        if proto not in _PROTOS:
            raise ValueError(f"unknown protocol {proto!r}")
        if port is not None and (type(port) is not int or not 0 <= port <= 65535):
            raise ValueError("bad port")
        side_c, verdict_c = _SIDE_TEXT_CODE[side], _VERDICT_TEXT_CODE[verdict]
        if type(rule) is not str or len(rule) > MAX_RULE_ID:
            raise ValueError("bad rule id")
        src_ep, dst_ep = ep_of(src), ep_of(dst)
        digest = hashlib.blake2b(
            f"{reporter}|{side_c}|{src}|{dst}|{proto}|{port}|{verdict_c}|{rule}|{src_ep}|{dst_ep}".encode(),
            digest_size=8).digest()
        known = (int.from_bytes(digest, "big") & _MASK63, src, dst, side_c, verdict_c, src_ep, dst_ep)
        self._keys[raw] = known
        return known

    def _append(self, conn: DbConnection, rows: list[tuple[Any, ...]]) -> None:
        if self.postgres:
            raw: Any = conn.connection.dbapi_connection  # a psycopg connection
            with raw.cursor() as cur, cur.copy(f"COPY flow_ingest ({', '.join(COLUMNS)}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
        else:
            marks = ", ".join("?" for _ in COLUMNS)
            conn.exec_driver_sql(f"INSERT INTO flow_ingest ({', '.join(COLUMNS)}) VALUES ({marks})", rows)

    def _count_upload(
        self, conn: DbConnection, agent_id: str, reporter: str, n: int, dropped: int, now_ms: int
    ) -> None:
        values = {"agent_id": agent_id, "workload": reporter, "records": n, "batches": 1, "dropped": dropped,
                  "last_upload": now_ms}
        ins = (postgresql.insert(flow_agents) if self.postgres else sqlite.insert(flow_agents)).values(**values)
        conn.execute(ins.on_conflict_do_update(index_elements=["agent_id"], set_={
            "workload": reporter, "records": flow_agents.c.records + n, "batches": flow_agents.c.batches + 1,
            "dropped": func.max(flow_agents.c.dropped, dropped) if not self.postgres
            else func.greatest(flow_agents.c.dropped, dropped),
            "last_upload": now_ms,
        }))

    # ---- compaction and retention ----------------------------------------------------------------
    def compact(self, *, wait: bool = False, force: bool = False) -> int:
        """Move the ingest log into the summaries; returns log rows moved (0 if another thread is at it).

        Skipped (without touching the database) when this process appended nothing since the last
        complete compaction, unless ``force``: on PostgreSQL even an empty log costs a scan of its
        not yet vacuumed rows. Each controller process compacts what it appended.
        """
        if not force and self._appends == self._compacted:
            return 0
        if not self._compact_lock.acquire(blocking=wait):
            return 0
        try:
            pending = self._appends
            moved = 0
            if self.postgres:
                self._ensure_partitions()
            while True:
                step = self._compact_step()
                moved += step
                if step < self.settings.compact_batch:
                    break
            self._last_compact = time.monotonic()
            self._compacted = pending
        finally:
            self._compact_lock.release()
        if time.monotonic() - self._last_prune >= self.settings.prune_interval:
            self.prune(time.time())
        return moved

    def _ensure_partitions(self) -> None:
        """PostgreSQL: the day partitions of what the log holds (within retention, at most tomorrow)."""
        with self.engine.begin() as conn:
            if self._days_known is False:
                self._days = flowparts.partition_days(conn)
                self._days_known = True
            lo, hi = conn.execute(text("SELECT min(bucket), max(bucket) FROM flow_ingest")).one()
            if lo is None:
                return
            per = flowparts.HOURS_PER_DAY
            today = int(time.time() * 1000) // HOUR_MS // per
            first = max(int(lo) // per, today - self.settings.max_age_hours // per - 1)
            wanted = set(range(first, min(int(hi) // per, today + 1) + 1)) - self._days
            if wanted:
                flowparts.ensure_days(conn, wanted)
        self._days |= wanted

    def _compact_step(self) -> int:
        batch = self.settings.compact_batch
        least, greatest = ("LEAST", "GREATEST") if self.postgres else ("min", "max")
        upsert = (f"ON CONFLICT (bucket, h) DO UPDATE SET count = flows.count + excluded.count, "
                  f"first_seen = {least}(flows.first_seen, excluded.first_seen), "
                  f"last_seen = {greatest}(flows.last_seen, excluded.last_seen)")
        links = ("INSERT INTO flow_links (bucket, src_ep, dst_ep, proto, port, verdict, count_out, count_in) "
                 "SELECT bucket, src_ep, dst_ep, proto, coalesce(port, -1), max(verdict), "
                 "sum(CASE WHEN side = 0 THEN count ELSE 0 END), sum(CASE WHEN side = 1 THEN count ELSE 0 END) "
                 "FROM {source} GROUP BY bucket, src_ep, dst_ep, proto, coalesce(port, -1) "
                 "ON CONFLICT (bucket, src_ep, dst_ep, proto, port) DO UPDATE SET "
                 f"verdict = {greatest}(flow_links.verdict, excluded.verdict), "
                 "count_out = flow_links.count_out + excluded.count_out, "
                 "count_in = flow_links.count_in + excluded.count_in")
        with self.engine.begin() as conn:
            if self.postgres:
                res = conn.execute(text(
                    f"WITH moved AS (DELETE FROM flow_ingest WHERE id IN "
                    f"(SELECT id FROM flow_ingest ORDER BY id LIMIT :batch) RETURNING *), "
                    f"n AS (SELECT count(*) AS n FROM moved), "
                    f"up AS (INSERT INTO flows (bucket, h, {_KEYS}) SELECT bucket, h, {_PICK} FROM moved "
                    f"GROUP BY bucket, h {upsert}), "
                    f"links AS ({links.format(source='moved')}) SELECT n FROM n"), {"batch": batch})
                return int(res.scalar_one())
            conn.exec_driver_sql("UPDATE flow_meta SET compactions = compactions + 1 WHERE id = 1")  # write lock
            first = conn.exec_driver_sql("SELECT min(id) FROM flow_ingest").scalar()
            if first is None:
                return 0
            last = int(first) + batch - 1
            conn.exec_driver_sql(
                f"INSERT INTO flows (bucket, h, {_KEYS}) SELECT bucket, h, {_PICK} FROM flow_ingest "
                f"WHERE id <= ? GROUP BY bucket, h {upsert}", (last,))
            conn.exec_driver_sql(links.format(source="flow_ingest WHERE id <= ?"), (last,))
            res = conn.exec_driver_sql("DELETE FROM flow_ingest WHERE id <= ?", (last,))
            return int(res.rowcount)

    def prune(self, now: float) -> int:
        """Apply retention (age, then size); returns summaries deleted."""
        self._last_prune = time.monotonic()
        self.compact(wait=True, force=True)  # also what other processes may have left in the log
        cutoff = int(now * 1000) // HOUR_MS - self.settings.max_age_hours
        deleted = 0
        with self.engine.begin() as conn:
            if self.postgres and not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                                  {"k": RETENTION_LOCK}).scalar_one():
                return 0  # another controller replica is applying retention right now
            if self.postgres:  # whole days: one DROP per partition
                deleted += flowparts.drop_days_before(conn, cutoff)
                self._days = {d for d in self._days if (d + 1) * flowparts.HOURS_PER_DAY > cutoff}
            deleted += conn.execute(flows.delete().where(flows.c.bucket < cutoff)).rowcount
            conn.execute(flow_links.delete().where(flow_links.c.bucket < cutoff))
            total = int(conn.execute(select(func.count()).select_from(flows)).scalar_one())
            if total > self.settings.max_rows:
                per = conn.execute(select(flows.c.bucket, func.count()).group_by(flows.c.bucket)
                                   .order_by(flows.c.bucket.desc())).all()
                kept, oldest_kept = 0, None
                for bucket, n in per:
                    if kept + n > self.settings.max_rows:
                        break
                    kept, oldest_kept = kept + n, bucket
                limit = oldest_kept if oldest_kept is not None else per[0][0] + 1
                deleted += conn.execute(flows.delete().where(flows.c.bucket < limit)).rowcount
                conn.execute(flow_links.delete().where(flow_links.c.bucket < limit))
            if not self.postgres:
                conn.exec_driver_sql("PRAGMA optimize")  # planner statistics (PostgreSQL: autovacuum)
        if deleted:
            log.info("flow retention: %d summaries deleted", deleted)
        return deleted

    # ---- queries --------------------------------------------------------------------------------
    def _buckets(self, f: FlowFilter, now: float) -> tuple[int, int]:
        newest = int(now * 1000) // HOUR_MS + 1
        lo = (f.since_ms // HOUR_MS) if f.since_ms is not None else newest - self.settings.max_age_hours - 1
        hi = (f.until_ms // HOUR_MS + 1) if f.until_ms is not None else newest
        return lo, min(hi, newest)

    def _where(self, f: FlowFilter, now: float, hours: tuple[int, int] | None = None) -> list[ColumnElement[bool]]:
        lo, hi = hours or self._buckets(f, now)
        c = flows.c
        conds: list[ColumnElement[bool]] = []
        indexed = any(x is not None for x in (f.src_ip, f.dst_ip, f.any_ip, f.src_eps, f.dst_eps, f.any_eps, f.port))
        if indexed and hi - lo <= 2000:  # equality per hour: index seeks instead of a range scan
            conds.append(c.bucket.in_(list(range(lo, hi + 1))))
        else:
            conds.append(c.bucket.between(lo, hi))
        if f.since_ms is not None:
            conds.append(c.last_seen >= f.since_ms)
        if f.until_ms is not None:
            conds.append(c.first_seen <= f.until_ms)
        for col, value in ((c.src_ip, f.src_ip), (c.dst_ip, f.dst_ip)):
            if value is not None:
                conds.append(col == value)
        if f.any_ip is not None:
            conds.append(or_(c.src_ip == f.any_ip, c.dst_ip == f.any_ip))
        for col, eps in ((c.src_ep, f.src_eps), (c.dst_ep, f.dst_eps)):
            if eps is not None:
                conds.append(col.in_(sorted(eps)))
        if f.any_eps is not None:
            ids = sorted(f.any_eps)
            conds.append(or_(c.src_ep.in_(ids), c.dst_ep.in_(ids)))
        if f.port is not None:
            conds.append(c.port == f.port)
        if f.proto is not None:
            conds.append(c.proto == f.proto)
        if f.verdicts is not None:
            conds.append(c.verdict.in_(sorted(f.verdicts)))
        if f.sides is not None:
            conds.append(c.side.in_(sorted(f.sides)))
        return conds

    def query(
        self, f: FlowFilter, *, cursor: str | None, limit: int, now: float
    ) -> tuple[list[StoredFlow], str | None]:
        """One page, newest hour first (then by hash); the cursor continues after the last row.

        The window is read a day at a time from the newest end until the page is full, so a
        page costs what the days it comes from cost, not what the whole retention holds.
        """
        self.compact(wait=True)
        if f.empty():
            return [], None
        lo, hi = self._buckets(f, now)
        after: list[ColumnElement[bool]] = []
        if cursor:
            try:
                b_text, _, h_text = cursor.partition(".")
                cb, ch = int(b_text), int(h_text)
            except ValueError:
                raise _bad("cursor", "malformed cursor") from None
            after.append(or_(flows.c.bucket < cb, and_(flows.c.bucket == cb, flows.c.h < ch)))
            hi = min(hi, cb)
        rows: list[StoredFlow] = []
        top = hi
        with self.engine.connect() as conn:
            oldest = conn.execute(select(func.min(flows.c.bucket))).scalar()
            lo = max(lo, hi + 1 if oldest is None else oldest)  # since=1970 must not walk 56 years of days
            while top >= lo and len(rows) <= limit:
                bottom = max(lo, top - QUERY_HOURS + 1)
                q = (select(flows).where(*self._where(f, now, (bottom, top)), *after)
                     .order_by(flows.c.bucket.desc(), flows.c.h.desc()).limit(limit + 1 - len(rows)))
                rows += [_stored(r) for r in conn.execute(q)]
                top = bottom - 1
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].cursor if more and rows else None)

    def iterate(self, f: FlowFilter, now: float, chunk: int = 5000) -> Iterator[StoredFlow]:
        """Every matching row (for exports), page by page."""
        cursor: str | None = None
        while True:
            page, cursor = self.query(f, cursor=cursor, limit=chunk, now=now)
            yield from page
            if cursor is None:
                return

    def aggregate(self, f: FlowFilter, now: float) -> list[tuple[Any, ...]]:
        """Matching summaries summed per connection and side:
        (src_ip, dst_ip, src_ep, dst_ep, proto, port, side, worst verdict code, count, first ms, last ms)."""
        self.compact(wait=True)
        if f.empty():
            return []
        c = flows.c
        keys = (c.src_ip, c.dst_ip, c.src_ep, c.dst_ep, c.proto, c.port, c.side)
        q = (select(*keys, func.max(c.verdict), func.sum(c.count), func.min(c.first_seen), func.max(c.last_seen))
             .where(*self._where(f, now)).group_by(*keys))
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(q)]

    def map_rows(self, since_ms: int, until_ms: int | None, now: float) -> list[tuple[int, int, str, int | None,
                                                                                   int, int]]:
        """Links of the hours in the window from the rollup: (src_ep, dst_ep, proto, port, worst
        verdict code, times seen = the larger side's count). Hour granularity."""
        self.compact(wait=True)
        lo, hi = self._buckets(FlowFilter(since_ms=since_ms, until_ms=until_ms), now)
        c = flow_links.c
        larger = func.greatest if self.postgres else func.max
        q = (select(c.src_ep, c.dst_ep, c.proto, c.port, func.max(c.verdict),
                    larger(func.sum(c.count_out), func.sum(c.count_in)))
             .where(c.bucket.between(lo, hi)).group_by(c.src_ep, c.dst_ep, c.proto, c.port))
        with self.engine.connect() as db:
            return [(int(r[0]), int(r[1]), r[2], None if r[3] < 0 else int(r[3]), int(r[4]), int(r[5]))
                    for r in db.execute(q)]

    def get(self, bucket: int, h: int) -> StoredFlow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(flows).where(flows.c.bucket == bucket, flows.c.h == h)).first()
        return _stored(row) if row is not None else None

    def agent_stats(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(flow_agents).order_by(flow_agents.c.workload))]


def _stored(r: Any) -> StoredFlow:
    key = FlowKey(ipaddress.ip_address(r.src_ip), ipaddress.ip_address(r.dst_ip), Proto(r.proto), r.port)
    return StoredFlow(int(r.bucket), int(r.h), key, SIDE_OF_CODE[int(r.side)], VERDICT_OF_CODE[int(r.verdict)],
                      r.rule_id, int(r.count), r.first_seen / 1000, r.last_seen / 1000, r.reporter, int(r.src_ep),
                      int(r.dst_ep))
