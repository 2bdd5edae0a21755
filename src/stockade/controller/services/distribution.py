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

Each host's published revisions are a :class:`~stockade.compiler.delta.HostHistory`: its current
HostPolicy plus the set deltas *the compiler computed* for the last ``HISTORY`` steps (composed
within a transaction). Agents long-poll :meth:`wait`; :meth:`fetch` answers a
:class:`~stockade.compiler.delta.PolicyUpdate` (encoded by ``policy_update_to_dict``): the
composed deltas from the agent's revision, or the full policy when a step changed rules or the
history no longer reaches back. Nothing is recompiled, hashed or diffed at fetch time, and a
bump stores no hash: ``host_state.policy_hash`` is written empty and filled in by :meth:`flush`
(a host whose hash is still empty at start-up is bumped, so a crash can only cost a reload).
Acks and heartbeats are kept in memory and flushed to the ``agents`` table in batches
(:meth:`flush`), so a fleet acknowledging at once does not queue behind single-row writes.
At start-up, :meth:`load` recompiles every host and compares with the stored hash, so
revisions survive restarts and only hosts whose policy differs (or was never hashed) are bumped.

Several replicas on one PostgreSQL (``shared``): every transaction first takes the change lock and
follows what other replicas committed, then writes a change row naming what it touched; other
replicas follow it through LISTEN/NOTIFY from the stored state (:mod:`.replicas`).
On SQLite the distributor is single-process and none of that runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar, cast

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

from stockade.compiler import Compiler, HostPolicy, collections_paused
from stockade.compiler.changes import SetOnly
from stockade.compiler.delta import HostHistory, PendingSteps, PolicyUpdate
from stockade.controller.services import codec, policy_hashes, replicas
from stockade.controller.services import pending as pending_steps
from stockade.controller.services.batched import BATCH_LIMIT, Queued, run_batch
from stockade.controller.services.codec import POLICY_KINDS
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.events import record_event, record_events
from stockade.controller.services.fanout_collector import FanoutCollector
from stockade.controller.services.host_state import (
    AgentLive,
    Digests,
    FlushBound,
    Heads,
    apply_flushed,
    bump_revisions,
    policy_hash,
    read_flushed_agents,
    read_revisions,
    wireguard_identity,
    write_agent_rows,
)
from stockade.controller.services.waiters import Waiters
from stockade.controller.storage import store
from stockade.controller.storage.db import AgentRow, DepartureRow, HostStateRow, WireGuardKeyRow, utcnow
from stockade.controller.storage.store import draft_objects, version_content
from stockade.errors import NotFoundError
from stockade.model.netpol import KubeNetworkPolicy
from stockade.model.policy import Policy
from stockade.model.workloads import WireGuardIdentity, Workload

__all__ = ["HISTORY", "AgentLive", "PolicyDistributor", "policy_hash", "wireguard_identity"]

T = TypeVar("T")
HISTORY = 8  # steps (revision -> next) of set deltas kept per host
FULL_REFRESH_ROUNDS = 120  # refresh_agents reads every agent row once in this many calls (safety net)
HEARTBEAT_WRITE = 5.0  # seconds: a heartbeat alone rewrites an agent's row at most this often


class PolicyDistributor:
    def __init__(self, sessions: sessionmaker[Any], *, shared: bool = False) -> None:
        self.sessions = sessions
        self.shared = shared  # PostgreSQL with possibly other replicas: follow and write the change log
        self.replica_id = uuid.uuid4().hex[:16]
        self.seen = 0  # the last change_log row this replica's memory reflects
        self.history_limit = HISTORY
        self.on_agents_changed: Callable[[list[str]], None] | None = None  # another replica changed them
        self.lock = threading.RLock()
        self.policy_objects: dict[str, dict[str, Any]] = {}
        self.label_keys: dict[str, dict[str, Any]] = {}
        self.workloads: dict[str, Workload] = {}
        self.wg_keys: dict[str, WireGuardIdentity] = {}  # registered WireGuard keys by workload
        self.network_policies: dict[str, KubeNetworkPolicy] = {}  # by stored name (inventory)
        self.compiler = Compiler(Policy())
        self.revisions: dict[str, int] = {}
        self.history: dict[str, HostHistory] = {}  # replaced whole on publish: lock-free reads
        # a follower's set-only steps of hosts no poll here held, built into history when asked (history_of)
        self.pending: dict[str, PendingSteps] = {}
        self.wanted: list[Callable[[str], bool]] = []  # more hosts whose history a follower builds at once
        self.unhashed: dict[str, int] = {}  # host -> revision whose policy_hash flush() writes
        self.unhashed_at: dict[str, float] = {}  # host -> when it first waited for its hash (monotonic)
        self.published_at = 0.0  # when publish() last ran (monotonic): hashes wait for a quiet moment
        self.digests: Digests = {}  # flush()'s hash parts, kept across flushes (a global change: 25,000
        self.heads: Heads = {}  # hashes, each part and host head encoded once, not once per flush)
        self.agents: dict[str, AgentLive] = {}
        self.departed: set[str] = set()  # workloads offline past the grace: compiled without addresses
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiters = Waiters()  # the held long-polls per host (wait)
        self.fanouts: FanoutCollector | None = None  # paces the collector around large changes (lifespan)
        # called on the event loop with the hosts whose revision moved (node long-polls: node_distribution)
        self.wake_listeners: list[Callable[[tuple[str, ...]], None]] = []
        self.fault_hook: Callable[[str], None] | None = None  # tests inject crashes here
        self.on_compile: Callable[[float, int], None] | None = None  # (seconds, hosts bumped)
        self._refresh_round = 0
        self._flushed_bound: FlushBound | None = None  # refresh_agents: what its last read could not see,
        self._own_flushes: set[int] = set()  # and our flushes since; a flush's write and a refresh's read:
        self._flush_lock = threading.Lock()  # one at a time
        self._queued: list[Queued[Any]] = []  # transact_batched callbacks waiting for the lock
        self._queue_lock = threading.Lock()

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
            network_policies=tuple(sorted(self.network_policies.values())),
        )

    def load(self) -> None:
        """Build the compiler from the active version and the inventory; reconcile stored revisions."""
        with self.lock, self.sessions.begin() as db:
            if self.shared:
                self.seen = replicas.serialise(db)
                self.departed = set(db.scalars(select(DepartureRow.workload)))
            content = version_content(db, "active")
            self.policy_objects = {k: {n: e["body"] for n, e in content.get(k, {}).items()} for k in POLICY_KINDS}
            inv = draft_objects(db, ("label_key", "workload", "network_policy"))
            self.label_keys = inv["label_key"]
            self.wg_keys = {r.workload: wireguard_identity(r) for r in db.scalars(select(WireGuardKeyRow))}
            self.workloads = {w.name: replace(w, wireguard=self.wg_keys.get(w.name))
                              for w in codec.domain_objects("workload", inv["workload"])}
            self.network_policies = {
                n: codec.KIND_BY_NAME["network_policy"].decode(b) for n, b in inv["network_policy"].items()
            }
            self.compiler = Compiler(self.assemble(self.policy_objects))
            stored = {r.workload: r for r in db.scalars(select(HostStateRow))}
            memo: Digests = {}
            bumped: list[HostStateRow] = []
            for name in self.compiler.workload_names:
                hp = self.compiler.host_policy(name)
                h = policy_hash(hp, memo)
                row = stored.pop(name, None)
                if row is None:
                    row = HostStateRow(workload=name, revision=1, policy_hash=h, updated_at=utcnow())
                    db.add(row)
                    bumped.append(row)
                elif row.policy_hash != h:
                    row.revision += 1
                    row.policy_hash = h
                    row.updated_at = utcnow()
                    bumped.append(row)
                self.revisions[name] = row.revision
                self.history[name] = HostHistory.begin(row.revision, hp, HISTORY)
            for row in stored.values():
                db.delete(row)
            if self.shared and (bumped or stored):
                change = replicas.append(db, self.replica_id, replicas.ChangeNote(workloads=tuple(sorted(stored))))
                for row in bumped:
                    row.change_id = change
                self.seen = change
            for a in db.scalars(select(AgentRow).where(AgentRow.revoked_at.is_(None))):
                self.agents[a.id] = AgentLive(a.id, a.workload, a.token_hash, a.applied_revision, a.last_heartbeat)

    # ---- transactions -----------------------------------------------------------
    def transact(self, fn: Callable[[Session, CompilerTxn], T]) -> T:
        """Run ``fn`` in one DB transaction with compiler changes; publish bumps after commit."""
        with self.lock, collections_paused():  # bounded work: see fanout_collector
            txn = CompilerTxn(self)
            change: int | None = None
            try:
                with self.sessions.begin() as db:
                    if self.shared and replicas.serialise(db) != self.seen:  # one writer at a time...
                        replicas.follow(self, db)  # ...whose compiler has what the others committed
                    result = fn(db, txn)
                    note = txn.note()
                    if self.shared and not note.empty:
                        change = replicas.append(db, self.replica_id, note)
                    bumps, later = self._stage_bumps(db, txn, change)
                    if self.fault_hook is not None:
                        self.fault_hook("before-commit")
            except BaseException:
                txn.rollback()
                raise
            if change is not None:
                self.seen = change
            self.publish(bumps, pending=later)
        if self.on_compile is not None:
            self.on_compile(txn.compile_seconds, len(bumps) + len(later))
        return result

    def transact_batched(self, fn: Callable[[Session, CompilerTxn], T]) -> T:
        """:meth:`transact` for many small independent callers (enrolments): callbacks queued by
        concurrent threads run together in ONE transaction (one change lock, one catch-up, one
        change row, one bump statement, one commit) by whichever caller gets the lock first.
        Each callback is still its own audited step and sees the ones before it. If any of them
        raises, the shared transaction is rolled back and each callback runs again alone, so one
        refused caller gets its own error and never takes the others down with it."""
        item: Queued[T] = Queued(fn)
        with self._queue_lock:
            self._queued.append(item)
        while not item.done:
            with self.lock:
                if item.done:
                    break
                with self._queue_lock:
                    batch, self._queued = self._queued[:BATCH_LIMIT], self._queued[BATCH_LIMIT:]
                run_batch(self.transact, batch)
        if item.error is not None:
            raise item.error
        return cast(T, item.result)

    def _stage_bumps(self, db: Session, txn: CompilerTxn, change: int | None = None
                     ) -> tuple[dict[str, HostHistory | None], dict[str, PendingSteps]]:
        """Bump ``host_state`` for every host the compiler's deltas changed (Core statements,
        batched); the new histories (None: the host is gone) and the pending steps of the hosts
        whose change is their label set's set members and whose agents no poll here holds
        (:mod:`.pending`: built when asked), published after the commit."""
        grouped: list[SetOnly] = []
        txn.flush(None if txn.policy_replaced else grouped)  # (no-op when the writes were read already)
        deltas = txn.deltas  # (once: a property; split and steps add to this same dict)
        later = pending_steps.split(self, grouped, deltas)
        if not deltas and not later:
            return {}, {}
        stored = read_revisions(db, sorted({*deltas, *later}))
        pending = pending_steps.steps(self, later, {n: stored[n] + 1 for n in later if n in stored}, deltas)
        names = sorted(deltas)
        out: dict[str, HostHistory | None] = {}
        now = utcnow()
        gone: list[str] = []
        inserts: list[dict[str, Any]] = []
        updates: list[str] = []
        for name in names:
            delta = deltas[name]
            if delta.policy is None or name not in self.workloads:
                if name in stored:
                    gone.append(name)
                out[name] = None
                continue
            old = stored.get(name)
            rev = (old or 0) + 1
            prev = self.history.get(name)
            steps = self.pending.get(name)  # a follower's steps not built yet (the compiler has moved on)
            if steps is not None and old is not None:
                hist: HostHistory | None = steps.after(prev, delta, rev, HISTORY)
            elif prev is None or old is None:
                hist = HostHistory.begin(rev, delta.policy, HISTORY)
            else:
                hist = prev.after(delta, rev)
                if hist is None:
                    continue  # the transaction's changes cancelled out for this host
            if old is None:
                inserts.append({"workload": name, "revision": rev, "policy_hash": "", "updated_at": now,
                                "change_id": change})
            else:
                updates.append(name)
            out[name] = hist
        if gone:
            db.execute(delete(HostStateRow).where(HostStateRow.workload.in_(gone)))
        if inserts:
            db.execute(insert(HostStateRow), inserts)
        # every bumped row goes from the revision read above (under the change lock) to the next: one
        # statement, not one per host (a global change bumps every host) nor one per chunk of hosts
        bump_revisions(db, sorted([*updates, *pending]), now, change)
        return out, pending

    def publish(self, bumps: dict[str, HostHistory | None], *, hashed: bool = False,
                pending: dict[str, PendingSteps] | None = None) -> None:
        """Make new histories visible (None: the host is gone) and wake their long-polls;
        ``hashed``: another replica wrote these revisions and fills in their hashes;
        ``pending``: revisions whose history is built when asked (:meth:`history_of`)."""
        now = self.published_at = time.monotonic()
        for name, hist in bumps.items():
            self.pending.pop(name, None)
            if hist is None:
                self.revisions.pop(name, None)
                self.history.pop(name, None)
                self.unhashed.pop(name, None)
                self.unhashed_at.pop(name, None)
                continue
            self.history[name] = hist  # before the revision, so lock-free readers find it
            self.revisions[name] = hist.revision
            if not hashed:
                self._unhash(name, hist.revision, now)
        for name, steps in (pending or {}).items():
            self.pending[name] = steps  # the history stays older: lock-free readers go to fetch()
            self.revisions[name] = steps.revision
            if not hashed:
                self._unhash(name, steps.revision, now)
        names = (*bumps, *(pending or ()))
        if self.fanouts is not None:
            self.fanouts.begin(len(names))  # before the answers (and the caller's pause) start
        if names and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, names)

    def _unhash(self, name: str, revision: int, now: float) -> None:
        """``revision`` is the host's hash to write; a host still waiting keeps its place and time
        (so under constant churn every host is still hashed ``hash_after`` after its first bump)."""
        self.unhashed[name] = revision
        self.unhashed_at.setdefault(name, now)

    def holds(self, name: str) -> bool:
        """A long-poll here waits for ``name``."""
        return name in self._waiters

    def wants(self, name: str) -> bool:
        """A listener needs ``name``'s history built at once (the node long-polls: a pod's answer
        is read on the event loop, which must not wait for the lock for a full policy). An agent's
        held long-poll does not: :meth:`fetch_nowait` answers it from the pending steps."""
        return any(want(name) for want in self.wanted)

    def history_of(self, name: str) -> HostHistory | None:
        """The host's history as published, its pending steps built first (caller holds the lock:
        the compiler then holds exactly the policy of the newest published revision)."""
        steps = self.pending.pop(name, None)
        if steps is None:
            return self.history.get(name)
        if self.revisions.get(name) != steps.revision or name not in self.workloads:
            self.history.pop(name, None)  # never expected; current() starts a new history
            return None
        hist = self.history[name] = steps.onto(self.history.get(name), self.compiler.host_policy(name),
                                               self.history_limit)
        return hist

    # ---- other replicas ---------------------------------------------------------
    def new_txn(self) -> CompilerTxn:
        return CompilerTxn(self)

    def follow_changes(self, announced: int | None = None) -> int:
        """Apply what other replicas committed (the listener thread calls this; ``announced``: the
        newest change id notified, None to look); returns the change rows applied. One
        REPEATABLE READ snapshot: the rows and the state they name agree."""
        if not self.shared or (announced is not None and announced <= self.seen):
            return 0  # our own change, or one already followed
        with self.lock, collections_paused(), self.sessions.begin() as db:
            db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            return replicas.follow(self, db)

    def reload_wg_keys(self, db: Session, names: tuple[str, ...] | None = None) -> None:
        """Re-read registered WireGuard keys (of ``names``; None: all), as another replica stored them."""
        q = select(WireGuardKeyRow)
        if names is None:
            self.wg_keys = {r.workload: wireguard_identity(r) for r in db.scalars(q)}
            return
        for chunk in range(0, len(names), 900):
            part = names[chunk : chunk + 900]
            found = {r.workload: wireguard_identity(r) for r in db.scalars(q.where(WireGuardKeyRow.workload.in_(part)))}
            for name in part:
                if name in found:
                    self.wg_keys[name] = found[name]
                else:
                    self.wg_keys.pop(name, None)

    def adopt_agent(self, row: AgentRow) -> None:
        """An agent row another replica created or changed (keeps this replica's unflushed acks)."""
        live = self.agents.get(row.id)
        if live is None:
            self.agents[row.id] = AgentLive(row.id, row.workload, row.token_hash, row.applied_revision,
                                            row.last_heartbeat)
        else:
            live.workload, live.token_hash = row.workload, row.token_hash

    def load_agent(self, agent_id: str) -> AgentLive | None:
        """An agent this replica has not heard of yet (enrolled on another one a moment ago)."""
        with self.sessions() as db:
            row = db.get(AgentRow, agent_id)
            if row is None or row.revoked_at is not None:
                return None
            self.adopt_agent(row)
        return self.agents.get(agent_id)

    def refresh_agents(self) -> int:
        """Read acks and heartbeats other replicas flushed (agents not dirty here); returns rows read.

        Only rows flushed by transactions its last read could not see, not by us (under ``_flush_lock``
        our flush commits before a read starts: its rows hold what memory has; an agent acking since is
        dirty). Every ``FULL_REFRESH_ROUNDS`` calls (and the first): every live row, a minute's safety net."""
        if not self.shared:
            return 0
        full = self._refresh_round == 0 or self._flushed_bound is None
        self._refresh_round = (self._refresh_round + 1) % FULL_REFRESH_ROUNDS
        with self._flush_lock:
            with self.sessions.begin() as db:
                db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                rows, bound = read_flushed_agents(db, None if full else self._flushed_bound,
                                                  frozenset(self._own_flushes))
            self._flushed_bound = bound
            self._own_flushes = {x for x in self._own_flushes if bound.unseen(x)}  # a later read may meet them
            apply_flushed(self.agents, rows)
        return len(rows)

    def _wake(self, names: tuple[str, ...]) -> None:
        for n in names:
            self._waiters.wake(n)
        for listener in self.wake_listeners:
            listener(names)

    # ---- agents -----------------------------------------------------------------
    async def wait(self, workload: str, after: int, timeout: float) -> int:
        """The host's revision as soon as it exceeds ``after``, or the current one at ``timeout``
        (a woken poll answers on the next turn of the loop: :class:`.waiters.Waiters`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rev = self.revisions.get(workload, 0)
            if rev > after:
                return rev
            remaining = deadline - loop.time()
            if remaining <= 0:
                return rev
            if not await self._waiters.wait(workload, remaining):
                return self.revisions.get(workload, 0)

    def current(self, workload: str) -> tuple[int, HostPolicy]:
        with self.lock:
            rev = self.revisions.get(workload)
            if rev is None or workload not in self.workloads:
                raise NotFoundError(f"no compiled policy for workload {workload!r}")
            hist = self.history_of(workload)
            if hist is None or hist.revision != rev:
                hist = self.history[workload] = HostHistory.begin(rev, self.compiler.host_policy(workload), HISTORY)
            return rev, hist.policy

    def fetch_nowait(self, workload: str, since: int | None) -> PolicyUpdate | None:
        """:meth:`fetch` without the lock, for the event loop: None when the history of the
        current revision is not there (then call :meth:`fetch` in a thread)."""
        rev = self.revisions.get(workload)
        hist = self.history.get(workload)
        if rev is None or hist is None:
            return None
        if hist.revision == rev:
            return hist.update_since(since)
        steps = self.pending.get(workload)  # (published before its revision: the pair agrees)
        if steps is not None and steps.revision == rev:  # unbuilt: the label set's shared deltas
            return steps.update_since(hist, since, self.history_limit)
        return None

    def fetch(self, workload: str, since: int | None) -> PolicyUpdate:
        """The answer for an agent holding revision ``since``: composed deltas, full, or unchanged."""
        with self.lock:
            self.current(workload)
            return self.history[workload].update_since(since)

    def agent_ack(self, agent_id: str, revision: int) -> None:
        live = self.agents.get(agent_id)
        if live is not None and revision != live.applied:
            live.applied = revision
            live.dirty = True

    def agent_heartbeat(self, agent_id: str) -> None:
        """Alive now (in memory at once); the row is written when the one stored is HEARTBEAT_WRITE
        old: a node's long-poll marks its 100 pods alive several times a second, and writing all of
        them at every flush was 10,000 row updates per flush at 10,000 pods (liveness counts in
        tens of seconds: ``offline_after``)."""
        live = self.agents.get(agent_id)
        if live is not None:
            now = live.last_heartbeat = utcnow()
            stored = live.stored_heartbeat
            if stored is None or (now - stored).total_seconds() >= HEARTBEAT_WRITE:
                live.dirty = True

    def check_liveness(self, offline_after: float, grace: float | None = None) -> list[tuple[str, bool]]:
        """Record ``agent.online`` / ``agent.offline`` events for agents whose state flipped.

        With ``grace`` (seconds), a workload whose agent has been offline for ``offline_after +
        grace`` leaves every peer's address sets (``workload.departed``) until it heartbeats
        again (``workload.returned``); its stored addresses are kept. Off by default.
        """
        now = utcnow()
        fresh = now - dt.timedelta(seconds=offline_after)  # online: a heartbeat after this
        gone = now - dt.timedelta(seconds=offline_after + (grace or 0.0))  # departed: none since this
        flips: list[tuple[str, bool]] = []
        leaving: list[str] = []
        returning: list[str] = []
        for a in list(self.agents.values()):  # every agent, every round: comparisons only (10,000 pods)
            beat = a.last_heartbeat
            online = beat is not None and beat > fresh
            if online != a.online:
                a.online = online
                flips.append((a.agent_id, online))
            if grace is not None and beat is not None and a.workload in self.workloads:
                if beat <= gone and a.workload not in self.departed:
                    leaving.append(a.workload)
                elif online and a.workload in self.departed:
                    returning.append(a.workload)
        for name in leaving:
            self._depart(name, True)
        for name in returning:
            self._depart(name, False)
        if flips:  # one INSERT for all (10,000 pods coming back at once were 10,000 on SQLite)
            changes: list[tuple[str, str, str, Any, Any]] = []
            for agent_id, online in flips:
                live = self.agents.get(agent_id)
                changes.append(("agent.online" if online else "agent.offline", "agent", agent_id, None,
                                {"workload": live.workload if live else ""}))
            try:
                with self.sessions.begin() as db:
                    record_events(db, "controller", changes)
            except BaseException:  # not recorded (e.g. "database is locked"): flipped back, the next round retries
                for agent_id, online in flips:
                    live = self.agents.get(agent_id)
                    if live is not None and live.online == online:
                        live.online = not online
                raise
        return flips

    def _depart(self, name: str, leaving: bool) -> None:
        def run(db: Session, txn: CompilerTxn) -> None:
            txn.departures_changed = True
            if leaving:
                self.departed.add(name)
                txn.undo.append(lambda: self.departed.discard(name))
                txn.upsert_workload(self.workloads[name])
                if self.shared and db.get(DepartureRow, name) is None:
                    db.add(DepartureRow(workload=name, since=utcnow()))
            else:
                self.departed.discard(name)
                txn.undo.append(lambda: self.departed.add(name))
                if self.shared:
                    db.execute(delete(DepartureRow).where(DepartureRow.workload == name))
                body = store.get_object(db, "workload", name).body
                txn.upsert_workload(codec.KIND_BY_NAME["workload"].decode(body))
            action = "workload.departed" if leaving else "workload.returned"
            record_event(db, "controller", action, "workload", name, None, None)

        self.transact(run)

    def flush(self, hash_after: float = 0.0) -> int:
        """Write dirty agent state (acks, heartbeats) in one transaction, and the policy hashes of
        hosts bumped at least ``hash_after`` seconds ago; returns the agent rows written."""
        self._write_hashes(hash_after)
        with self._flush_lock:  # committed before refresh_agents reads (it skips this flush's rows)
            dirty = [a for a in list(self.agents.values()) if a.dirty]
            if not dirty:
                return 0
            for a in dirty:
                a.dirty = False
                a.stored_heartbeat = a.last_heartbeat
            params = [{"id": a.agent_id, "applied_revision": a.applied, "last_heartbeat": a.last_heartbeat}
                      for a in dirty]
            try:
                with self.sessions.begin() as db:
                    xid = write_agent_rows(db, params)
            except BaseException:
                for a in dirty:  # not written (e.g. "database is locked"): the next flush writes them
                    a.dirty = True
                raise
            if xid is not None:  # committed: refresh_agents need not read these rows back
                self._own_flushes.add(xid)
        return len(dirty)

    def _write_hashes(self, hash_after: float = 0.0) -> None:
        """Fill in ``host_state.policy_hash`` of the revisions published at least ``hash_after``
        seconds ago (:mod:`.policy_hashes`)."""
        policy_hashes.write(self, hash_after)
