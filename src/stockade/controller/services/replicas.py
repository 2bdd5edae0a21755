"""Several controller replicas on one PostgreSQL: the change log, and following it.

Every replica keeps its own incremental compiler and long-polls in memory (see
:mod:`stockade.controller.services.distribution`); PostgreSQL is the only thing they share.

* **Writers are serialised** by a transaction-scoped advisory lock (:func:`serialise`) taken as the
  first statement of every compiled change, so change ids (a sequence) grow in commit order and a
  writer's compiler is up to date (it first follows what the others committed) before it computes
  its own deltas.
* **A change names what it touched** (:class:`ChangeNote`: workloads, agents, whether the active
  policy, the label keys or the departures changed) in one ``change_log`` row written in the same
  transaction as the change, plus ``host_state.change_id`` on every host it bumped; ``NOTIFY
  stockade_changes`` wakes the other replicas at commit.
* **A follower catches up from the stored state, never from memory** (:func:`follow`): in one
  REPEATABLE READ snapshot it reads the change rows after the last one it applied, re-reads the
  objects they name, applies them to its compiler (the compiler is deterministic, so it reaches the
  writer's HostPolicies) and adopts the revisions the writer stored for the hosts it bumped. A host
  whose revisions it saw one by one keeps its delta history, so agents failing over to this replica
  get deltas; a host bumped twice inside one catch-up starts a new history. A replica that was away
  for longer than the log is kept (:func:`prune`) rebuilds from the stored state (:func:`resync`).

The listener thread and the leader election live in :mod:`stockade.controller.storage.listen`.
SQLite stays single-process: none of this runs there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Text, cast, delete, func, insert, select, text
from sqlalchemy.orm import Session

from stockade.compiler import Compiler
from stockade.compiler.changes import SetOnly
from stockade.compiler.delta import HostHistory, Step
from stockade.controller.services import codec
from stockade.controller.services import pending as pending_steps
from stockade.controller.services.codec import POLICY_KINDS
from stockade.controller.storage import store
from stockade.controller.storage.db import AgentRow, ChangeRow, DepartureRow, HostStateRow, ObjectRow, utcnow
from stockade.controller.storage.listen import CHANGE_LOCK, CHANNEL

if TYPE_CHECKING:
    from stockade.controller.services.distribution import PolicyDistributor

KEEP_CHANGES = 10_000  # change rows kept at least (and any younger than KEEP_SECONDS)
KEEP_SECONDS = 3600.0


@dataclass(frozen=True)
class ChangeNote:
    """What one committed transaction changed, for the other replicas to re-read."""

    workloads: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    policy: bool = False
    label_keys: bool = False
    departures: bool = False

    @property
    def empty(self) -> bool:
        return not (self.workloads or self.agents or self.policy or self.label_keys or self.departures)

    def to_dict(self) -> dict[str, Any]:
        return {"workloads": list(self.workloads), "agents": list(self.agents), "policy": self.policy,
                "label_keys": self.label_keys, "departures": self.departures}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ChangeNote:
        return ChangeNote(tuple(d.get("workloads", ())), tuple(d.get("agents", ())), bool(d.get("policy")),
                          bool(d.get("label_keys")), bool(d.get("departures")))

    @staticmethod
    def merged(notes: Iterable[ChangeNote]) -> ChangeNote:
        ws: set[str] = set()
        ags: set[str] = set()
        pol = keys = deps = False
        for n in notes:
            ws.update(n.workloads)
            ags.update(n.agents)
            pol, keys, deps = pol or n.policy, keys or n.label_keys, deps or n.departures
        return ChangeNote(tuple(sorted(ws)), tuple(sorted(ags)), pol, keys, deps)


# ---- writers ---------------------------------------------------------------------------------


def serialise(db: Session) -> int:
    """Take the change lock for the rest of this transaction (released by commit or rollback);
    returns the newest change id, read once the lock is held.

    Two statements, not one: under READ COMMITTED a statement's snapshot is taken when it starts,
    so a ``max(id)`` in the statement that waited for the lock would not see the change the lock's
    holder committed meanwhile; the writer would skip following it, write its own change after it
    and never learn it (enrolments and bumps lost on other replicas under contention)."""
    db.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHANGE_LOCK})
    return last_change(db)  # a new statement, a new snapshot: sees every change committed before the lock


def last_change(db: Session) -> int:
    return int(db.scalar(select(func.max(ChangeRow.id))) or 0)


def append(db: Session, origin: str, note: ChangeNote) -> int:
    """Write the change row (under :func:`serialise`) and announce it at commit; returns its id."""
    new = insert(ChangeRow).values(created_at=utcnow(), origin=origin, body=note.to_dict()).returning(ChangeRow.id)
    change = new.cte("change")
    stmt = select(change.c.id, func.pg_notify(CHANNEL, cast(change.c.id, Text)))
    return int(db.execute(stmt).one()[0])


def announce_agents(dist: PolicyDistributor, db: Session, agent_ids: Iterable[str]) -> None:
    """An agent row changed outside a compiled transaction (revocation, key, quarantine)."""
    if dist.shared:
        serialise(db)
        append(db, dist.replica_id, ChangeNote(agents=tuple(sorted(agent_ids))))


def prune(db: Session) -> int:
    """Forget change rows older than an hour beyond the newest ``KEEP_CHANGES`` (the newest row is
    always kept: a follower whose last row is gone knows it must rebuild)."""
    newest = last_change(db)
    cutoff = utcnow() - dt.timedelta(seconds=KEEP_SECONDS)
    res = db.execute(delete(ChangeRow).where(ChangeRow.id < newest - KEEP_CHANGES, ChangeRow.created_at < cutoff))
    return int(getattr(res, "rowcount", 0) or 0)


# ---- followers -------------------------------------------------------------------------------


def _advance(prev: HostHistory, revision: int) -> HostHistory:
    """``prev`` published again as ``revision`` with its policy unchanged here (the writer's
    changes to this host cancelled out within one catch-up)."""
    if revision == prev.revision + 1:
        steps = (*prev.steps, Step(prev.revision, revision, ()))[-prev.limit :]
        return HostHistory(revision, prev.policy, steps, prev.limit)
    return HostHistory(revision, prev.policy, (), prev.limit)


def follow(dist: PolicyDistributor, db: Session) -> int:
    """Apply the changes committed since ``dist.seen`` (caller holds ``dist.lock``); returns how
    many change rows were applied. Memory is reverted if anything fails (the next call retries)."""
    rows = db.execute(select(ChangeRow.id, ChangeRow.body).where(ChangeRow.id > dist.seen)
                      .order_by(ChangeRow.id)).all()
    if not rows:
        return 0
    if dist.seen and db.get(ChangeRow, dist.seen) is None:
        resync(dist, db)
        return len(rows)
    note = ChangeNote.merged(ChangeNote.from_dict(r.body) for r in rows)
    txn = dist.new_txn()
    try:
        if note.departures:
            departed = set(db.scalars(select(DepartureRow.workload)))
            old = set(dist.departed)
            dist.departed = departed
            txn.undo.append(lambda: setattr(dist, "departed", old))
        if note.label_keys:
            txn.refresh_label_keys(store.draft_objects(db, ("label_key",))["label_key"])
        old_keys = dict(dist.wg_keys)
        dist.reload_wg_keys(db, note.workloads)  # a key registered elsewhere reaches peers' policies here too
        txn.undo.append(lambda: setattr(dist, "wg_keys", old_keys))
        bodies: dict[str, dict[str, Any]] = {}
        for chunk in range(0, len(note.workloads), 900):
            q = select(ObjectRow.name, ObjectRow.body).where(ObjectRow.kind == "workload",
                                                             ObjectRow.name.in_(note.workloads[chunk : chunk + 900]))
            bodies.update({n: b for n, b in db.execute(q)})
        decoded = {w.name: w for w in codec.domain_objects("workload", bodies)}
        for name in note.workloads:
            if name in decoded:
                txn.upsert_workload(decoded[name])
            else:
                txn.remove_workload(name)
        grouped: list[SetOnly] = []  # label sets whose change is set members only: one step each, not a
        txn.flush(None if note.policy else grouped)  # HostDelta per host (a policy swap diffs every host)
        if note.policy:
            content = store.version_content(db, "active")
            txn.replace_policy_objects({k: {n: e["body"] for n, e in content.get(k, {}).items()}
                                        for k in POLICY_KINDS})
        # two arrays in one row, not a row per host (a global change: 25,000 rows through the ORM's rows)
        names, revs = db.execute(select(func.array_agg(HostStateRow.workload), func.array_agg(HostStateRow.revision))
                                 .where(HostStateRow.change_id > dist.seen)).one()
        bumped: dict[str, int] = dict(zip(names or (), revs or (), strict=True))
        deltas = txn.deltas
        later = pending_steps.split(dist, grouped, deltas)  # answered from shared steps, built when asked
        missing = sorted((set(deltas) | set(later)) - set(bumped))
        for chunk in range(0, len(missing), 900):
            q = select(HostStateRow.workload, HostStateRow.revision).where(
                HostStateRow.workload.in_(missing[chunk : chunk + 900]))
            bumped.update({w: r for w, r in db.execute(q)})
        out: dict[str, HostHistory | None] = {}
        pending = pending_steps.steps(dist, later, bumped, deltas)
        for name in sorted((set(deltas) | set(bumped)) - set(pending)):
            delta = deltas.get(name)
            if name not in dist.workloads or (delta is not None and delta.policy is None):
                out[name] = None
                continue
            rev = bumped.get(name)
            if rev is None:
                continue  # no stored revision (yet): nothing an agent can ask for
            steps = dist.pending.get(name)
            if steps is not None and delta is not None:  # built from the delta's policy: the compiler moved on
                out[name] = steps.after(dist.history.get(name), delta, rev, dist.history_limit)
                continue
            prev = dist.history_of(name)  # (no delta: its policy is still the one of its pending revision)
            if prev is None:
                out[name] = HostHistory.begin(rev, dist.compiler.host_policy(name), dist.history_limit)
            elif delta is None and rev == prev.revision:
                continue
            else:
                hist = prev.after(delta, rev) if delta is not None else None
                out[name] = hist if hist is not None else _advance(prev, rev)
    except BaseException:
        txn.rollback()
        raise
    dist.publish(out, hashed=True, pending=pending)
    dist.seen = rows[-1].id
    if note.agents:
        reload_agents(dist, db, note.agents)
    return len(rows)


def reload_agents(dist: PolicyDistributor, db: Session, agent_ids: Iterable[str]) -> None:
    """Re-read agent rows another replica changed (enrolment, revocation, key, quarantine)."""
    ids = sorted(set(agent_ids))
    found = {a.id: a for a in db.scalars(select(AgentRow).where(AgentRow.id.in_(ids)))}
    for agent_id in ids:
        row = found.get(agent_id)
        if row is None or row.revoked_at is not None:
            dist.agents.pop(agent_id, None)
        else:
            dist.adopt_agent(row)
    if dist.on_agents_changed is not None:
        dist.on_agents_changed(ids)


def resync(dist: PolicyDistributor, db: Session) -> None:
    """Rebuild the compiler from the stored state and adopt every stored revision (a replica that
    missed more than the change log keeps). Hosts whose policy is unchanged keep their history."""
    content = store.version_content(db, "active")
    policy_objects = {k: {n: e["body"] for n, e in content.get(k, {}).items()} for k in POLICY_KINDS}
    inv = store.draft_objects(db, ("label_key", "workload"))
    dist.label_keys = inv["label_key"]
    dist.departed = set(db.scalars(select(DepartureRow.workload)))
    dist.reload_wg_keys(db)
    workloads = {w.name: replace(w, wireguard=dist.wg_keys.get(w.name))
                 for w in codec.domain_objects("workload", inv["workload"])}
    dist.workloads = workloads
    dist.policy_objects = policy_objects
    dist.compiler = Compiler(dist.assemble(policy_objects))
    stored = {w: r for w, r in db.execute(select(HostStateRow.workload, HostStateRow.revision))}
    out: dict[str, HostHistory | None] = {}
    unbuilt, dist.pending = dist.pending, {}  # rebuilt below from the stored revisions
    for name in (set(dist.history) | set(unbuilt)) - set(stored):
        out[name] = None
    for name in dist.compiler.workload_names:
        rev = stored.get(name)
        if rev is None:
            continue
        hp = dist.compiler.host_policy(name)
        prev = dist.history.get(name) if name not in unbuilt else None  # pending: begins anew
        if prev is not None and prev.revision == rev and prev.policy == hp:
            continue
        out[name] = HostHistory.begin(rev, hp, dist.history_limit)
    dist.publish(out, hashed=True)
    dist.seen = last_change(db)
    reload_agents(dist, db, [a for a in db.scalars(select(AgentRow.id))])
