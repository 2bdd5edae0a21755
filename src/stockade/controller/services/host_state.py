"""What the distributor keeps per host and per agent, and how it is written back in batches.

:func:`policy_hash` digests a host policy from digests of its shared parts; :class:`AgentLive` is
one agent's in-memory state (acks, heartbeats, proof and backend reports); :func:`write_agent_rows`
and :func:`write_hash_rows` are the batched writes behind :meth:`PolicyDistributor.flush`
(one ``UPDATE ... FROM unnest(...)`` on PostgreSQL, an executemany by key on SQLite).
:func:`read_revisions` and :func:`bump_revisions` are the revision bump of every host a change
reached (:meth:`PolicyDistributor.transact`), before any agent is woken.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

from sqlalchemy import Select, String, Table, any_, bindparam, column, func, literal_column, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from stockade.compiler import HostPolicy, host_policy_to_dict
from stockade.compiler.ir import address_set_to_dict, rules_to_list
from stockade.controller.storage.db import AgentRow, HostStateRow, WireGuardKeyRow
from stockade.model.workloads import WireGuardIdentity

# PostgreSQL: a batch of per-row values as arrays, joined in one UPDATE (one statement, one plan); each
# row is stamped with the flushing transaction's id, so other replicas read only what is new (below)
_PG_AGENT_FLUSH = text(
    "UPDATE agents AS a SET applied_revision = v.r, last_heartbeat = v.b, "
    "flushed_xid = CAST(CAST(pg_current_xact_id() AS text) AS bigint) "
    "FROM unnest(CAST(:i AS varchar[]), CAST(:r AS integer[]), CAST(:b AS timestamptz[])) AS v(i, r, b) "
    "WHERE a.id = v.i"
)
# the same with each column as ONE text split by the server (see pg_lines; '' is a NULL heartbeat)
_PG_AGENT_FLUSH_LINES = text(
    "UPDATE agents AS a SET applied_revision = v.r, last_heartbeat = v.b, "
    "flushed_xid = CAST(CAST(pg_current_xact_id() AS text) AS bigint) "
    "FROM unnest(string_to_array(:i, E'\\n'), CAST(string_to_array(:r, E'\\n') AS integer[]), "
    "CAST(string_to_array(:b, E'\\n', '') AS timestamptz[])) AS v(i, r, b) "
    "WHERE a.id = v.i"
)
_PG_HASHES = text(
    "UPDATE host_state AS h SET policy_hash = v.h "
    "FROM unnest(CAST(:w AS varchar[]), CAST(:r AS integer[]), CAST(:h AS varchar[])) AS v(w, r, h) "
    "WHERE h.workload = v.w AND h.revision = v.r"
)
# the same with each column as ONE text split by the server (see pg_lines): no per-element quoting
_PG_HASH_LINES = text(
    "UPDATE host_state AS h SET policy_hash = v.h "
    "FROM unnest(string_to_array(:w, E'\\n'), CAST(string_to_array(:r, E'\\n') AS integer[]), "
    "string_to_array(:h, E'\\n')) AS v(w, r, h) "
    "WHERE h.workload = v.w AND h.revision = v.r"
)


def pg_lines(values: list[str]) -> str | None:
    """``values`` as one text, one per line, for PostgreSQL's ``string_to_array(:p, E'\\n')``;
    None when that would not give them back (a value holding a line break, or one empty value),
    then the caller binds an array. A bound array of strings costs the driver a quoting check per
    element (a regular expression): at 25,000 hosts, five such arrays per global change on the
    writer. Names and hashes never hold a line break; the check is the fallback, not a trust."""
    joined = "\n".join(values)
    if joined.count("\n") != len(values) - 1 or values == [""]:
        return None
    return joined

Digests = dict[int, tuple[object, bytes]]  # id(part) -> (part, its SHA-256), parts kept alive
# workload -> (its policy's own fields, the SHA-256 state after them): a host whose own fields did not
# change since the last hash (a peer set moved) costs a copy of that state, not a JSON encoding
Heads = dict[str, tuple[tuple[object, ...], Any]]


def wireguard_identity(row: WireGuardKeyRow) -> WireGuardIdentity:
    endpoint = ipaddress.ip_address(row.endpoint) if row.endpoint else None
    return WireGuardIdentity(row.public_key, endpoint, row.port)


def _digest(part: object, encoded: Callable[[], object], memo: Digests) -> bytes:
    hit = memo.get(id(part))
    if hit is None or hit[0] is not part:
        hit = memo[id(part)] = (part, hashlib.sha256(json.dumps(encoded(), sort_keys=True).encode()).digest())
    return hit[1]


def policy_hash(hp: HostPolicy, memo: Digests | None = None, heads: Heads | None = None) -> str:
    """SHA-256 of a host policy, for noticing at start-up that it changed while we were down.

    Built from digests of its parts: the compiler shares one rule tuple per label set and one
    AddressSet object between every host that references it, so with a ``memo`` kept across
    many hosts each shared part is encoded once (a 1,000-member set is not re-encoded per host).
    With ``heads`` kept across calls, a host whose own fields (mode, addresses, failsafe,
    tunnel, backend: everything but rules and sets) are equal to last time's starts from the
    hash state those fields left (the same bytes hashed: the same digest).
    """
    memo = {} if memo is None else memo
    own = (hp.mode, hp.local_addresses, hp.failsafe, hp.wireguard, hp.backend)
    known = heads.get(hp.workload) if heads is not None else None
    if known is not None and known[0] == own:
        h = known[1].copy()
    else:
        head = host_policy_to_dict(replace(hp, rules=(), sets=()))
        h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        if heads is not None:
            heads[hp.workload] = (own, h.copy())
    h.update(_digest(hp.rules, partial(rules_to_list, hp.rules), memo))
    for s in hp.sets:
        h.update(_digest(s, partial(address_set_to_dict, s), memo))
    return str(h.hexdigest())


@dataclass
class AgentLive:
    """In-memory state of one agent, flushed to the database in batches."""

    agent_id: str
    workload: str
    token_hash: str = ""
    applied: int = 0
    last_heartbeat: dt.datetime | None = None
    dirty: bool = False
    stored_heartbeat: dt.datetime | None = None  # the last heartbeat this process wrote to the row
    online: bool = False
    proof: str = ""  # last proof the agent reported: "proven" / "differs" / "failed" ("": none yet)
    proof_revision: int = 0
    proof_detail: str = ""
    backend: str = ""  # the firewall backend in force, from the agent's last heartbeat ("": not reported)
    backends: tuple[str, ...] = ()  # the backends the agent said it can enforce with


# ---- reading the acks and heartbeats other replicas flushed (PostgreSQL) -------------------------
# Each flush stamps its rows with its transaction id (``flushed_xid``). A read remembers which
# transactions its snapshot could not see (:class:`FlushBound`: those running at it, and every later
# one), and the next read takes exactly the rows stamped by one of those, whatever order they commit
# in: a flush the previous read saw is not read again while an older transaction is still open (the
# snapshot's xmin alone re-read them until it finished). Rows stamped by this replica's own flushes
# are left out (``own``): they hold what its memory wrote. The rows come through the driver's cursor
# as plain tuples, not ORM rows with a type processor per heartbeat (bench/replica_work.py: one read
# of 25,000 rows 101 -> 38 ms of CPU with the UTC below; a global change's reads on a follower 105 -> 23).
_PG_SNAPSHOT = ("SELECT CAST(CAST(pg_snapshot_xmax(s) AS text) AS bigint), "
                "ARRAY(SELECT CAST(CAST(pg_snapshot_xip(s) AS text) AS bigint)) FROM pg_current_snapshot() AS s")
_PG_READ_LIVE = "SELECT id, applied_revision, last_heartbeat FROM agents WHERE revoked_at IS NULL"
_PG_READ_FLUSHED = (_PG_READ_LIVE + " AND (flushed_xid >= %(xmax)s OR flushed_xid = ANY(CAST(%(running)s AS bigint[])))"
                    " AND NOT flushed_xid = ANY(CAST(%(own)s AS bigint[]))")
_PG_CURRENT_XID = "SELECT CAST(CAST(pg_current_xact_id() AS text) AS bigint)"


@dataclass(frozen=True)
class FlushBound:
    """The transactions a read of flushed rows could not see: every id from ``xmax`` on, and
    ``running`` (those in progress at its snapshot). The next read takes only their rows."""

    xmax: int
    running: tuple[int, ...] = ()

    def unseen(self, xid: int) -> bool:
        """A row stamped ``xid`` was invisible to that read (so the next read must take it)."""
        return xid >= self.xmax or xid in self.running


FlushedAgent = tuple[str, int, dt.datetime | None]  # agent id, applied revision, last heartbeat (UTC)


def _utc(beat: dt.datetime | None) -> dt.datetime | None:
    """As :class:`~stockade.controller.storage.db.UTCDateTime` reads it (the driver gives the
    session's time zone)."""
    if beat is None or beat.tzinfo is dt.UTC:
        return beat
    return beat.replace(tzinfo=dt.UTC) if beat.tzinfo is None else beat.astimezone(dt.UTC)


def read_flushed_agents(db: Session, since: FlushBound | None,
                        own: frozenset[int] = frozenset()) -> tuple[list[FlushedAgent], FlushBound]:
    """(agent id, applied revision, last heartbeat) of live agents flushed by a transaction that
    the read at ``since`` could not see and that is not one of ``own`` (None: every live agent,
    ``own`` ignored), and the bound for the next call. PostgreSQL; ``db`` must be a REPEATABLE
    READ transaction that has run nothing yet (its snapshot is the one these rows are read in)."""
    cursor = cast(Any, db.connection().connection.dbapi_connection).cursor()
    try:
        # heartbeats in UTC for this transaction only, so the driver gives them in UTC (a session in
        # another zone, even 'Etc/UTC', cost a conversion per row below: half of a read's CPU)
        cursor.execute("SET LOCAL TimeZone = 'UTC'")
        cursor.execute(_PG_SNAPSHOT)
        xmax, running = cursor.fetchone()
        if since is None:
            cursor.execute(_PG_READ_LIVE)
        else:
            cursor.execute(_PG_READ_FLUSHED, {"xmax": since.xmax, "running": list(since.running),
                                              "own": sorted(own)})
        rows: list[FlushedAgent] = cursor.fetchall()  # (text, integer, timestamptz): str, int, datetime
    finally:
        cursor.close()
    if any(b is not None and b.tzinfo is not dt.UTC for _i, _r, b in rows):  # a session not in UTC
        rows = [(i, r, _utc(b)) for i, r, b in rows]
    return rows, FlushBound(int(xmax), tuple(sorted(int(x) for x in running or ())))


def apply_flushed(agents: dict[str, AgentLive], rows: list[FlushedAgent]) -> None:
    """Acks and heartbeats read from the table into the agents not dirty here (whose own state
    is newer); a heartbeat only moves forward."""
    for agent_id, applied, beat in rows:
        live = agents.get(agent_id)
        if live is None or live.dirty:
            continue
        live.applied = applied
        if beat is not None and (live.last_heartbeat is None or beat > live.last_heartbeat):
            live.last_heartbeat = beat


def write_agent_rows(db: Session, params: list[dict[str, Any]]) -> int | None:
    """Acks and heartbeats (``id``, ``applied_revision``, ``last_heartbeat``) in one statement;
    on PostgreSQL, returns the id of ``db``'s transaction, which the rows are stamped with."""
    if db.get_bind().dialect.name == "postgresql":  # one statement for the whole batch
        ids, beats = [p["id"] for p in params], [p["last_heartbeat"] for p in params]
        lines = pg_lines(ids)
        # the ids, revisions and heartbeats as three texts (the driver quoted each array element
        # through a regular expression: ~2/3 of a flush's CPU); only UTC-aware heartbeats, written
        # with their offset, and never one row alone (string_to_array('') is empty, not a NULL)
        if lines is not None and len(params) > 1 and all(b is None or b.tzinfo is dt.UTC for b in beats):
            db.execute(_PG_AGENT_FLUSH_LINES, {"i": lines, "r": "\n".join(str(p["applied_revision"]) for p in params),
                                               "b": "\n".join("" if b is None else b.isoformat() for b in beats)})
        else:
            db.execute(_PG_AGENT_FLUSH, {"i": ids, "r": [p["applied_revision"] for p in params], "b": beats})
        return int(db.execute(text(_PG_CURRENT_XID)).scalar_one())
    # one executemany in Core (the ORM's bulk update by primary key cost ~4x the CPU per row)
    table = cast(Table, AgentRow.__table__)
    db.execute(update(table).where(table.c.id == bindparam("i"))
               .values(applied_revision=bindparam("r"), last_heartbeat=bindparam("b")),
               [{"i": p["id"], "r": p["applied_revision"], "b": p["last_heartbeat"]} for p in params])
    return None


def write_hash_rows(db: Session, params: list[dict[str, Any]]) -> None:
    """Policy hashes (``w`` workload, ``r`` revision, ``h`` hash) of revisions still current."""
    if db.get_bind().dialect.name == "postgresql":  # one statement, not one per host
        w, r, h = [p["w"] for p in params], [p["r"] for p in params], [p["h"] for p in params]
        lines = pg_lines(w), pg_lines(h)
        if lines[0] is not None and lines[1] is not None:
            db.execute(_PG_HASH_LINES, {"w": lines[0], "r": "\n".join(map(str, r)), "h": lines[1]})
        else:
            db.execute(_PG_HASHES, {"w": w, "r": r, "h": h})
        return
    table = cast(Table, HostStateRow.__table__)
    db.execute(
        update(table)
        .where(table.c.workload == bindparam("w"), table.c.revision == bindparam("r"))
        .values(policy_hash=bindparam("h")),
        params,
    )


# ---- the revision bump of the hosts a change reached ---------------------------------------------
# The host names travel as ONE bound parameter (a PostgreSQL array, a JSON array SQLite's json_each
# reads), whatever their number. An IN list of one parameter per host (900 a statement, so two
# statements of each kind at 1,000 hosts) cost ~20 ms of the controller's CPU per global change at
# 1,000 hosts, before a single agent was woken: building and rendering the expanded parameters and
# the driver's parse of the long statement (neither is cached at that length).
_HOSTS = cast(Table, HostStateRow.__table__)
_PG_HOSTS = bindparam("w", type_=ARRAY(String))
_PG_HOST_LINES = func.string_to_array(bindparam("w", type_=String), literal_column("E'\\n'"))
_SQLITE_HOSTS: Select[tuple[Any]] = select(column("value")).select_from(func.json_each(bindparam("w", type_=String)))
# PostgreSQL: one row of two arrays, not a row per host (a global change: 25,000 rows, each fetched and
# made a Row by the driver and SQLAlchemy, was ~40 ms of the writer's CPU inside its transaction)
_PG_READ_AGG = (func.array_agg(_HOSTS.c.workload), func.array_agg(_HOSTS.c.revision))
_READ = {
    "postgresql": select(*_PG_READ_AGG).where(_HOSTS.c.workload == any_(_PG_HOSTS)),
    "postgresql-lines": select(*_PG_READ_AGG).where(_HOSTS.c.workload == any_(_PG_HOST_LINES)),
    "sqlite": select(_HOSTS.c.workload, _HOSTS.c.revision).where(_HOSTS.c.workload.in_(_SQLITE_HOSTS)),
}
_BUMP_VALUES = {"revision": _HOSTS.c.revision + 1, "policy_hash": "", "updated_at": bindparam("now"),
                "change_id": bindparam("change")}
_BUMP = {
    "postgresql": update(_HOSTS).where(_HOSTS.c.workload == any_(_PG_HOSTS)).values(_BUMP_VALUES),
    "postgresql-lines": update(_HOSTS).where(_HOSTS.c.workload == any_(_PG_HOST_LINES)).values(_BUMP_VALUES),
    "sqlite": update(_HOSTS).where(_HOSTS.c.workload.in_(_SQLITE_HOSTS)).values(_BUMP_VALUES),
}


def _hosts_param(db: Session, names: list[str]) -> tuple[str, list[str] | str]:
    dialect = db.get_bind().dialect.name
    if dialect not in _READ:
        raise NotImplementedError(f"no revision bump for database dialect {dialect!r}")
    if dialect == "postgresql":
        lines = pg_lines(names)
        return ("postgresql", names) if lines is None else ("postgresql-lines", lines)
    return dialect, json.dumps(names)


def read_revisions(db: Session, names: list[str]) -> dict[str, int]:
    """The stored revision of each of ``names`` that has a row (one statement, one parameter)."""
    if not names:
        return {}
    dialect, hosts = _hosts_param(db, names)
    if dialect == "sqlite":
        return {str(w): int(r) for w, r in db.execute(_READ[dialect], {"w": hosts})}
    found, revisions = db.execute(_READ[dialect], {"w": hosts}).one()
    return dict(zip(found or (), revisions or (), strict=True))


def bump_revisions(db: Session, names: list[str], now: dt.datetime, change: int | None) -> None:
    """Every row of ``names`` one revision on, its hash emptied (:meth:`PolicyDistributor.flush`
    fills it in), stamped ``now`` and with the change that bumped it (one statement)."""
    if not names:
        return
    dialect, hosts = _hosts_param(db, names)
    db.execute(_BUMP[dialect].execution_options(synchronize_session=False), {"w": hosts, "now": now, "change": change})
