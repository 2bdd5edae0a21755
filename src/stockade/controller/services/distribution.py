"""Compiled policy service: one incremental Compiler in memory, per-host revisions, agent wake-ups.

The :class:`PolicyDistributor` keeps a :class:`stockade.compiler.Compiler` built from the active
policy version plus the live inventory (label keys and workloads). Every change that can alter
compiled policy (provision, rollback, workload created / relabelled / re-addressed / removed,
enforcement mode switched) runs through :meth:`PolicyDistributor.transact`:

1. under one lock (changes are serialised in this process), the callback edits the database
   and mutates the compiler through a :class:`CompilerTxn`, which records how to undo;
2. for each host whose HostPolicy changed (the compiler's ``HostDelta`` list), the desired
   revision is bumped in ``host_state`` in the *same* database transaction;
3. if anything fails, including the commit, the compiler is reverted, so memory never runs
   ahead of the database; on success the new revisions are published and the asyncio waiters
   of exactly those hosts are woken (``loop.call_soon_threadsafe``).

Agents long-poll :meth:`wait`; they fetch :meth:`fetch` (full HostPolicy JSON, or a set delta
relative to a revision still in the small per-host history) and acknowledge a revision.
Acks and heartbeats are kept in memory and flushed to the ``agents`` table in batches
(:meth:`flush`), so a fleet acknowledging at once does not queue behind single-row writes.
At start-up, :meth:`load` recompiles every host and compares with the stored hash, so
revisions survive restarts and only hosts whose policy differs are bumped.

Single process: several controller processes sharing PostgreSQL would also need
LISTEN/NOTIFY to learn of each other's bumps (not built yet).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from stockade.compiler import Compiler, HostDelta, HostPolicy, diff_sets, host_policy_to_dict
from stockade.controller.services import codec
from stockade.controller.services.codec import POLICY_KINDS
from stockade.controller.services.events import record_event
from stockade.controller.storage import store
from stockade.controller.storage.db import AgentRow, HostStateRow, utcnow
from stockade.controller.storage.store import draft_objects, version_content
from stockade.errors import NotFoundError
from stockade.model.policy import Policy
from stockade.model.workloads import Workload

T = TypeVar("T")
HISTORY = 4  # compiled revisions kept per host for deltas


def policy_hash(hp: HostPolicy) -> str:
    return hashlib.sha256(json.dumps(host_policy_to_dict(hp), sort_keys=True).encode()).hexdigest()


@dataclass
class AgentLive:
    """In-memory state of one agent, flushed to the database in batches."""

    agent_id: str
    workload: str
    token_hash: str = ""
    applied: int = 0
    last_heartbeat: dt.datetime | None = None
    dirty: bool = False
    online: bool = False


@dataclass
class CompilerTxn:
    """Compiler mutations of one transaction, with their undo steps."""

    dist: PolicyDistributor
    deltas: dict[str, HostDelta] = field(default_factory=dict)
    undo: list[Callable[[], object]] = field(default_factory=list)
    compile_seconds: float = 0.0

    def _merge(self, deltas: list[HostDelta]) -> None:
        for d in deltas:
            self.deltas[d.workload] = d

    def upsert_workload(self, w: Workload) -> None:
        d = self.dist
        old = d.workloads.get(w.name)
        if w.name in d.departed:
            w = replace(w, interfaces=())  # offline past the grace period: out of peers' sets
        t0 = time.perf_counter()
        self._merge(d.compiler.upsert_workload(w))
        self.compile_seconds += time.perf_counter() - t0
        d.workloads[w.name] = w
        self.undo.append(lambda: d.put_back(w.name, old))

    def remove_workload(self, name: str) -> None:
        d = self.dist
        old = d.workloads.get(name)
        if old is None:
            return
        t0 = time.perf_counter()
        self._merge(d.compiler.remove_workload(name))
        self.compile_seconds += time.perf_counter() - t0
        del d.workloads[name]
        self.undo.append(lambda: d.put_back(name, old))

    def replace_policy_objects(self, objects: Mapping[str, Mapping[str, Any]]) -> None:
        """Swap in new policy-kind bodies (a provisioned version's content), keeping inventory."""
        d = self.dist
        old_objects = d.policy_objects
        t0 = time.perf_counter()
        self._merge(d.compiler.replace_policy(d.assemble(objects)))
        self.compile_seconds += time.perf_counter() - t0
        d.policy_objects = {k: dict(v) for k, v in objects.items()}

        def revert() -> None:
            d.compiler.replace_policy(d.assemble(old_objects))
            d.policy_objects = old_objects

        self.undo.append(revert)

    def refresh_label_keys(self, keys: Mapping[str, Mapping[str, Any]]) -> None:
        old = self.dist.label_keys
        self.dist.label_keys = {k: dict(v) for k, v in keys.items()}
        self.undo.append(lambda: setattr(self.dist, "label_keys", old))

    def rollback(self) -> None:
        for step in reversed(self.undo):
            step()
        self.undo.clear()


@dataclass(frozen=True)
class Fetched:
    """What an agent receives: the full policy, or set deltas from its acknowledged revision."""

    revision: int
    full: dict[str, Any] | None
    base: int | None = None
    set_deltas: tuple[dict[str, Any], ...] = ()


class PolicyDistributor:
    def __init__(self, sessions: sessionmaker[Any]) -> None:
        self.sessions = sessions
        self.lock = threading.RLock()
        self.policy_objects: dict[str, dict[str, Any]] = {}
        self.label_keys: dict[str, dict[str, Any]] = {}
        self.workloads: dict[str, Workload] = {}
        self.compiler = Compiler(Policy())
        self.revisions: dict[str, int] = {}
        self.hashes: dict[str, str] = {}
        self.history: dict[str, OrderedDict[int, HostPolicy]] = {}
        self.agents: dict[str, AgentLive] = {}
        self.departed: set[str] = set()  # workloads offline past the grace: compiled without addresses
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self.fault_hook: Callable[[str], None] | None = None  # tests inject crashes here
        self.on_compile: Callable[[float, int], None] | None = None  # (seconds, hosts bumped)

    def put_back(self, name: str, old: Workload | None) -> None:
        """Undo step: restore workload ``name`` to ``old`` (None: absent) in compiler and map."""
        if old is None:
            if name in self.workloads:
                self.compiler.remove_workload(name)
                del self.workloads[name]
        else:
            self.compiler.upsert_workload(old)
            self.workloads[name] = old

    # ---- assembly ---------------------------------------------------------------
    def assemble(self, policy_objects: Mapping[str, Mapping[str, Any]]) -> Policy:
        """Policy from policy-kind bodies plus the current inventory."""
        base = codec.build_policy({**policy_objects, "label_key": self.label_keys})
        return Policy(
            label_keys=base.label_keys,
            label_groups=base.label_groups,
            workloads=tuple(self.workloads[n] for n in sorted(self.workloads)),
            ip_lists=base.ip_lists,
            services=base.services,
            rulesets=base.rulesets,
            deny_rules=base.deny_rules,
            failsafe=base.failsafe,
        )

    def load(self) -> None:
        """Build the compiler from the active version and the inventory; reconcile stored revisions."""
        with self.lock, self.sessions.begin() as db:
            content = version_content(db, "active")
            self.policy_objects = {k: {n: e["body"] for n, e in content.get(k, {}).items()} for k in POLICY_KINDS}
            inv = draft_objects(db, ("label_key", "workload"))
            self.label_keys = inv["label_key"]
            self.workloads = {w.name: w for w in codec.domain_objects("workload", inv["workload"])}
            self.compiler = Compiler(self.assemble(self.policy_objects))
            stored = {r.workload: r for r in db.scalars(select(HostStateRow))}
            for name in self.compiler.workload_names:
                hp = self.compiler.host_policy(name)
                h = policy_hash(hp)
                row = stored.pop(name, None)
                if row is None:
                    row = HostStateRow(workload=name, revision=1, policy_hash=h, updated_at=utcnow())
                    db.add(row)
                elif row.policy_hash != h:
                    row.revision += 1
                    row.policy_hash = h
                    row.updated_at = utcnow()
                self.revisions[name] = row.revision
                self.hashes[name] = h
                self.history[name] = OrderedDict({row.revision: hp})
            for row in stored.values():
                db.delete(row)
            for a in db.scalars(select(AgentRow).where(AgentRow.revoked_at.is_(None))):
                self.agents[a.id] = AgentLive(a.id, a.workload, a.token_hash, a.applied_revision, a.last_heartbeat)

    # ---- transactions -----------------------------------------------------------
    def transact(self, fn: Callable[[Session, CompilerTxn], T]) -> T:
        """Run ``fn`` in one DB transaction with compiler changes; publish bumps after commit."""
        with self.lock:
            txn = CompilerTxn(self)
            try:
                with self.sessions.begin() as db:
                    result = fn(db, txn)
                    bumps = self._stage_bumps(db, txn)
                    if self.fault_hook is not None:
                        self.fault_hook("before-commit")
            except BaseException:
                txn.rollback()
                raise
            self._publish(bumps)
        if self.on_compile is not None:
            self.on_compile(txn.compile_seconds, len(bumps))
        return result

    def _stage_bumps(self, db: Session, txn: CompilerTxn) -> dict[str, tuple[int, str, HostPolicy | None]]:
        """Bump ``host_state`` for every host whose compiled policy changed (Core statements, batched)."""
        if not txn.deltas:
            return {}
        names = sorted(txn.deltas)
        stored: dict[str, tuple[int, str]] = {}
        for chunk in range(0, len(names), 900):  # stay under SQLite's bound-parameter limit
            q = select(HostStateRow.workload, HostStateRow.revision, HostStateRow.policy_hash).where(
                HostStateRow.workload.in_(names[chunk : chunk + 900])
            )
            stored.update({w: (r, h) for w, r, h in db.execute(q)})
        out: dict[str, tuple[int, str, HostPolicy | None]] = {}
        now = utcnow()
        gone: list[str] = []
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for name in names:
            if name not in self.workloads:
                if name in stored:
                    gone.append(name)
                out[name] = (0, "", None)
                continue
            hp = self.compiler.host_policy(name)
            h = policy_hash(hp)
            old = stored.get(name)
            if old is not None and old[1] == h:
                continue
            rev = (old[0] if old is not None else 0) + 1
            row = {"workload": name, "revision": rev, "policy_hash": h, "updated_at": now}
            (updates if old is not None else inserts).append(row)
            out[name] = (rev, h, hp)
        if gone:
            db.execute(delete(HostStateRow).where(HostStateRow.workload.in_(gone)))
        if inserts:
            db.execute(insert(HostStateRow), inserts)
        if updates:
            db.execute(update(HostStateRow), updates)  # executemany by primary key
        return out

    def _publish(self, bumps: dict[str, tuple[int, str, HostPolicy | None]]) -> None:
        for name, (rev, h, hp) in bumps.items():
            if hp is None:
                self.revisions.pop(name, None)
                self.hashes.pop(name, None)
                self.history.pop(name, None)
                continue
            hist = self.history.setdefault(name, OrderedDict())
            hist[rev] = hp  # before the revision, so lock-free readers find it
            while len(hist) > HISTORY:
                hist.popitem(last=False)
            self.hashes[name] = h
            self.revisions[name] = rev
        if bumps and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, tuple(bumps))

    def _wake(self, names: tuple[str, ...]) -> None:
        for n in names:
            ev = self._events.pop(n, None)
            if ev is not None:
                ev.set()

    # ---- agents -----------------------------------------------------------------
    async def wait(self, workload: str, after: int, timeout: float) -> int:
        """The host's revision as soon as it exceeds ``after``, or the current one at ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            rev = self.revisions.get(workload, 0)
            if rev > after:
                return rev
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return rev
            ev = self._events.get(workload)
            if ev is None:
                ev = self._events[workload] = asyncio.Event()
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                return self.revisions.get(workload, 0)

    def current(self, workload: str) -> tuple[int, HostPolicy]:
        with self.lock:
            rev = self.revisions.get(workload)
            if rev is None or workload not in self.workloads:
                raise NotFoundError(f"no compiled policy for workload {workload!r}")
            hist = self.history.setdefault(workload, OrderedDict())
            hp = hist.get(rev)
            if hp is None:
                hp = hist[rev] = self.compiler.host_policy(workload)
            return rev, hp

    def fetch_nowait(self, workload: str, since: int | None) -> Fetched | None:
        """:meth:`fetch` without the lock, for the event loop: None when the compiled policy of the
        current revision is not in the history yet (then call :meth:`fetch` in a thread)."""
        rev = self.revisions.get(workload)
        hp = self.history.get(workload, OrderedDict()).get(rev) if rev is not None else None
        if rev is None or hp is None:
            return None
        return self._answer(workload, rev, hp, since)

    def fetch(self, workload: str, since: int | None) -> Fetched:
        rev, hp = self.current(workload)
        return self._answer(workload, rev, hp, since)

    def _answer(self, workload: str, rev: int, hp: HostPolicy, since: int | None) -> Fetched:
        if since is not None and since != rev:
            old = self.history.get(workload, OrderedDict()).get(since)
            if old is not None and old.rules_key() == hp.rules_key():
                deltas = diff_sets(old.sets, hp.sets)
                return Fetched(
                    rev,
                    None,
                    since,
                    tuple(
                        {
                            "name": d.name,
                            "family": d.family.value,
                            "added": [str(n) for n in d.added],
                            "removed": [str(n) for n in d.removed],
                        }
                        for d in deltas
                    ),
                )
        if since == rev:
            return Fetched(rev, None, since)
        return Fetched(rev, host_policy_to_dict(hp))

    def agent_ack(self, agent_id: str, revision: int) -> None:
        live = self.agents.get(agent_id)
        if live is not None and revision != live.applied:
            live.applied = revision
            live.dirty = True

    def agent_heartbeat(self, agent_id: str) -> None:
        live = self.agents.get(agent_id)
        if live is not None:
            live.last_heartbeat = utcnow()
            live.dirty = True

    def check_liveness(self, offline_after: float, grace: float | None = None) -> list[tuple[str, bool]]:
        """Record ``agent.online`` / ``agent.offline`` events for agents whose state flipped.

        With ``grace`` (seconds), a workload whose agent has been offline for ``offline_after +
        grace`` leaves every peer's address sets (``workload.departed``) until it heartbeats
        again (``workload.returned``); its stored addresses are kept. Off by default.
        """
        now = utcnow()
        flips: list[tuple[str, bool]] = []
        leaving: list[str] = []
        returning: list[str] = []
        for a in list(self.agents.values()):
            age = (now - a.last_heartbeat).total_seconds() if a.last_heartbeat is not None else None
            online = age is not None and age < offline_after
            if online != a.online:
                a.online = online
                flips.append((a.agent_id, online))
            if grace is not None and age is not None and a.workload in self.workloads:
                if age >= offline_after + grace and a.workload not in self.departed:
                    leaving.append(a.workload)
                elif online and a.workload in self.departed:
                    returning.append(a.workload)
        for name in leaving:
            self._depart(name, True)
        for name in returning:
            self._depart(name, False)
        if flips:
            with self.sessions.begin() as db:
                for agent_id, online in flips:
                    live = self.agents.get(agent_id)
                    workload = live.workload if live else ""
                    action = "agent.online" if online else "agent.offline"
                    record_event(db, "controller", action, "agent", agent_id, None, {"workload": workload})
        return flips

    def _depart(self, name: str, leaving: bool) -> None:
        def run(db: Session, txn: CompilerTxn) -> None:
            if leaving:
                self.departed.add(name)
                txn.undo.append(lambda: self.departed.discard(name))
                txn.upsert_workload(self.workloads[name])
            else:
                self.departed.discard(name)
                txn.undo.append(lambda: self.departed.add(name))
                body = store.get_object(db, "workload", name).body
                txn.upsert_workload(codec.KIND_BY_NAME["workload"].decode(body))
            action = "workload.departed" if leaving else "workload.returned"
            record_event(db, "controller", action, "workload", name, None, None)

        self.transact(run)

    def flush(self) -> int:
        """Write dirty agent state (acks, heartbeats) in one transaction; returns rows written."""
        dirty = [a for a in list(self.agents.values()) if a.dirty]
        if not dirty:
            return 0
        for a in dirty:
            a.dirty = False
        params = [{"id": a.agent_id, "applied_revision": a.applied, "last_heartbeat": a.last_heartbeat}
                  for a in dirty]
        with self.sessions.begin() as db:
            db.execute(update(AgentRow), params)  # executemany by primary key
        return len(dirty)
