"""Many workload writes in set-based statements: the storage half of ``POST /workload-batches``.

The single writes of :mod:`.store` cost about nine statements per workload through the ORM (a
lookup, the label keys, an insert or update, two side-table deletes, the side-table inserts, an
address check, an audit row), each behind an autoflush. The cluster sync writes pod churn as
batches of up to 1,000 workloads, and at 10,000 pods those per-row statements were most of the
controller's time (bench/k8s_fanout.py: 4-30 s per batch). Here a batch costs a fixed number of
statements whatever its size (each ``IN`` list chunked under SQLite's bound-parameter limit):

1. one ``SELECT`` of the stored rows the batch names, one of the label keys;
2. one ``DELETE`` of the deleted objects (their labels and addresses go by ``ON DELETE CASCADE``);
3. one executemany ``UPDATE`` of the replaced rows, one executemany ``INSERT`` of the new ones and one
   ``SELECT`` of their ids;
4. one ``DELETE`` each of the replaced rows' labels and addresses, then one ``SELECT`` of who else
   holds any address the batch writes, one ``INSERT`` each of labels and addresses;
5. the audit rows as one batched ``INSERT ... RETURNING`` (:func:`~stockade.controller.services.events.record_events`).

Same rules as the single writes, checked for the whole batch before anything is written: the
codec decodes every body (issues named ``upsert[i].field``), labels must use declared keys and
allowed values, a delete of a missing workload is a 404, an address held by another workload (or
by an earlier workload of the same batch) a 409, and a body equal to the stored one is no write
at all. Deletes are applied before upserts, so a batch may give a deleted pod's address to a new
one: Kubernetes recycles pod IPs, and the sync's batch is the cluster's state at one moment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from stockade.controller.services.codec import KIND_BY_NAME
from stockade.controller.services.events import record_events
from stockade.controller.storage.db import ObjectAddressRow, ObjectLabelRow, ObjectRow, utcnow
from stockade.controller.storage.store import StoredObject, address_conflict, draft_objects, label_issues
from stockade.errors import Issue, NotFoundError, ValidationError

KIND = "workload"
CHUNK = 900  # names or ids per IN list (SQLite's bound-parameter limit is 999 on old builds)


@dataclass(frozen=True)
class BatchWritten:
    """What a batch did, and each workload's state after it (for the compiler), in write order."""

    created: tuple[str, ...]
    replaced: tuple[str, ...]  # including upserts whose body was already the stored one
    deleted: tuple[str, ...]
    after: tuple[tuple[str, StoredObject | None], ...]  # (name, stored object, None: deleted)


@dataclass(frozen=True)
class _Stored:
    id: int
    revision: int
    body: dict[str, Any]
    updated_at: Any


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _addresses(body: Mapping[str, Any]) -> list[str]:
    return sorted({a for i in body.get("interfaces", []) for a in i["addresses"]})


def _decode(db: Session, upserts: Sequence[Mapping[str, Any]]) -> list[tuple[Any, dict[str, Any]]]:
    """Every upsert's (domain object, canonical body); every issue of every item at once."""
    kind = KIND_BY_NAME[KIND]
    keys = draft_objects(db, ("label_key",))["label_key"]
    decoded: list[tuple[Any, dict[str, Any]]] = []
    issues: list[Issue] = []
    for i, item in enumerate(upserts):
        try:
            obj = kind.decode(item)
        except ValidationError as exc:
            issues += [Issue(e.source, e.line, f"upsert[{i}].{e.field}", e.message) for e in exc.issues]
            continue
        body = kind.encode(obj)
        issues += [Issue(e.source, e.line, f"upsert[{i}].{e.field}", e.message) for e in label_issues(keys, body)]
        decoded.append((obj, body))
    if issues:
        raise ValidationError(issues)
    return decoded


def _stored(db: Session, names: Sequence[str]) -> dict[str, _Stored]:
    out: dict[str, _Stored] = {}
    for part in _chunks(names):
        q = select(ObjectRow.name, ObjectRow.id, ObjectRow.revision, ObjectRow.body, ObjectRow.updated_at).where(
            ObjectRow.kind == KIND, ObjectRow.name.in_(part))
        for name, id_, revision, body, updated_at in db.execute(q):
            out[name] = _Stored(id_, revision, body, updated_at)
    return out


def write_workloads(db: Session, upserts: Sequence[Mapping[str, Any]], deletes: Sequence[str],
                    actor: str) -> BatchWritten:
    """Create or replace ``upserts`` and delete ``deletes`` (distinct names: the caller checks) in
    ``db``'s transaction, audited per workload; raises before writing anything when one is refused."""
    decoded = _decode(db, upserts)
    stored = _stored(db, [b["name"] for _o, b in decoded] + list(deletes))
    missing = [n for n in deletes if n not in stored]
    if missing:
        raise NotFoundError(f"no {KIND} named {missing[0]!r}")
    now = utcnow()
    after: list[tuple[str, StoredObject | None]] = []
    table = cast(Table, ObjectRow.__table__)

    gone = [stored[n].id for n in deletes]
    for part in _chunks(gone):
        db.execute(delete(table).where(table.c.id.in_(part)))
    audit: list[tuple[str, str, str, Any, Any]] = []  # (action, kind, name, before, after)
    for name in deletes:
        audit.append((f"{KIND}.delete", KIND, name, stored[name].body, None))
        after.append((name, None))

    created: list[str] = []
    replaced: list[str] = []
    new_rows: list[dict[str, Any]] = []
    changed: list[tuple[int, dict[str, Any], int]] = []  # (id, body, new revision) of replaced rows
    written: list[tuple[str, dict[str, Any]]] = []  # (name, body) whose side tables are (re)written
    for obj, body in decoded:
        name = body["name"]
        old = stored.get(name)
        (created if old is None else replaced).append(name)
        if old is None:
            new_rows.append({"kind": KIND, "name": name, "body": body, "revision": 1, "created_at": now,
                             "updated_at": now})
            audit.append((f"{KIND}.create", KIND, name, None, body))
            after.append((name, StoredObject(KIND, name, 1, body, now, obj)))
        elif body == old.body:  # nothing to write, as for a PUT of the same body
            after.append((name, StoredObject(KIND, name, old.revision, old.body, old.updated_at, obj)))
            continue
        else:
            changed.append((old.id, body, old.revision + 1))
            audit.append((f"{KIND}.update", KIND, name, old.body, body))
            after.append((name, StoredObject(KIND, name, old.revision + 1, body, now, obj)))
        written.append((name, body))

    if changed:
        db.execute(update(table).where(table.c.id == bindparam("oid"))
                   .values(body=bindparam("b"), revision=bindparam("r"), updated_at=now),
                   [{"oid": i, "b": b, "r": r} for i, b, r in changed])
        for part in _chunks([i for i, _b, _r in changed]):
            db.execute(delete(ObjectLabelRow).where(ObjectLabelRow.object_id.in_(part)))
            db.execute(delete(ObjectAddressRow).where(ObjectAddressRow.object_id.in_(part)))
    ids = {name: old.id for name, old in stored.items()}
    if new_rows:  # an executemany, then their ids (SQLite cannot return ids of an executemany in order)
        db.execute(insert(table), new_rows)
        fresh = [r["name"] for r in new_rows]
        for part in _chunks(fresh):
            ids.update({str(n): int(i) for n, i in db.execute(
                select(table.c.name, table.c.id).where(table.c.kind == KIND, table.c.name.in_(part)))})
    _side_tables(db, ids, written)
    record_events(db, actor, audit)
    return BatchWritten(tuple(created), tuple(replaced), tuple(deletes), tuple(after))


def _side_tables(db: Session, ids: Mapping[str, int], written: list[tuple[str, dict[str, Any]]]) -> None:
    """Labels and addresses of the written workloads (their old rows are gone); refuses an address
    another workload holds, or one an earlier workload of the batch takes."""
    holder: dict[str, str] = {}
    taken: list[tuple[str, str]] = []
    for name, body in written:
        for a in _addresses(body):
            if a in holder:
                taken.append((a, holder[a]))
            else:
                holder[a] = name
    for part in _chunks(sorted(holder)):
        taken += [(str(a), str(n)) for a, n in db.execute(
            select(ObjectAddressRow.address, ObjectRow.name)
            .join(ObjectRow, ObjectRow.id == ObjectAddressRow.object_id)
            .where(ObjectAddressRow.address.in_(part)))]
    if taken:
        raise address_conflict(sorted(taken))
    labels = [{"object_id": ids[name], "key": k, "value": v} for name, body in written
              for k, v in body.get("labels", {}).items()]
    if labels:
        db.execute(insert(ObjectLabelRow), labels)
    if holder:
        db.execute(insert(ObjectAddressRow), [{"address": a, "object_id": ids[n]} for a, n in holder.items()])
