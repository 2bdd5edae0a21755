"""Draft -> provision -> immutable versions; rollback; structured diffs between any two states.

A version row holds the full content of every policy kind at provisioning time
(``{kind: {name: {"revision", "body"}}}``), its author, time and message, the structured diff
against the version before it, and the workloads whose HostPolicy changed. Provisioning runs
inside :meth:`PolicyDistributor.transact`: the version row, the per-host revision bumps and the
audit event commit together or not at all (a crash before commit leaves the previous version
active and the compiler reverted). Rollback to K provisions K's content as a new version N+1
and resets the draft to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from stockade.controller.services.codec import POLICY_KINDS
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.events import record_event
from stockade.controller.storage.db import VersionRow, utcnow
from stockade.controller.storage.store import (
    active_number,
    draft_revisions,
    is_version_number,
    put_objects,
    validate_draft,
    version_content,
)
from stockade.errors import ConflictError, NotFoundError, ValidationError


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    change: str  # added / removed / modified
    fields: tuple[str, ...]
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "change": self.change,
            "fields": list(self.fields),
            "before": self.before,
            "after": self.after,
        }


def diff_content(old: Mapping[str, Any], new: Mapping[str, Any], kinds: tuple[str, ...] = POLICY_KINDS) -> list[Change]:
    """Object-level changes from ``old`` to ``new`` (both in the version content shape)."""
    out: list[Change] = []
    for kind in kinds:
        a = {n: e["body"] for n, e in old.get(kind, {}).items()}
        b = {n: e["body"] for n, e in new.get(kind, {}).items()}
        for name in sorted(set(a) | set(b)):
            if name not in b:
                out.append(Change(kind, name, "removed", (), a[name], None))
            elif name not in a:
                out.append(Change(kind, name, "added", (), None, b[name]))
            elif a[name] != b[name]:
                fields = tuple(sorted(k for k in set(a[name]) | set(b[name]) if a[name].get(k) != b[name].get(k)))
                out.append(Change(kind, name, "modified", fields, a[name], b[name]))
    return out


def content_of(db: Session, ref: str) -> dict[str, Any]:
    """Content named by ``ref``: ``draft``, ``active`` or a version number."""
    if ref == "draft":
        return draft_revisions(db)
    if ref == "active" or is_version_number(ref):
        return version_content(db, ref if ref == "active" else int(ref))
    raise NotFoundError(f"no policy version {ref!r} (use draft, active or a number)")


def _bodies(content: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: {n: e["body"] for n, e in content.get(k, {}).items()} for k in POLICY_KINDS}


def _freeze(
    db: Session,
    txn: CompilerTxn,
    content: dict[str, Any],
    author: str,
    message: str,
    rollback_of: int | None,
) -> VersionRow:
    previous = version_content(db, "active")
    changes = diff_content(previous, content)
    if not changes and rollback_of is None:
        raise ConflictError("nothing to provision: the draft equals the active version")
    issues = validate_draft(db, _bodies(content))
    if issues:
        raise ValidationError(issues)
    txn.replace_policy_objects(_bodies(content))
    number = active_number(db) + 1
    row = VersionRow(
        number=number,
        created_at=utcnow(),
        author=author,
        message=message,
        content=content,
        diff=[c.as_dict() for c in changes],
        affected=sorted(txn.deltas),
        rollback_of=rollback_of,
    )
    db.add(row)
    db.flush()
    summary = {"number": number, "message": message, "changes": len(changes), "affected": len(txn.deltas)}
    record_event(db, author, "policy.provision", "policy_version", str(number), None, summary)
    return row


# (db, txn, draft content before the operation) -> None; may raise to refuse; runs before commit
Guard = Callable[[Session, CompilerTxn, Mapping[str, Any]], None]


def provision(dist: PolicyDistributor, author: str, message: str, guard: Guard | None = None) -> VersionRow:
    """Freeze the draft as the next version; raises ConflictError when nothing changed.

    ``guard`` sees the transaction's host deltas before commit and may refuse (scope checks).
    """

    def run(db: Session, txn: CompilerTxn) -> VersionRow:
        draft = draft_revisions(db)
        row = _freeze(db, txn, draft, author, message, None)
        if guard is not None:
            guard(db, txn, draft)
        return row

    return dist.transact(run)


def rollback(
    dist: PolicyDistributor, author: str, target: int, message: str, guard: Guard | None = None
) -> VersionRow:
    """Provision version ``target``'s content as a new version and reset the draft to it.

    ``guard`` runs before commit, after the draft reset and the compile (see :func:`provision`).
    """

    def run(db: Session, txn: CompilerTxn) -> VersionRow:
        if db.get(VersionRow, target) is None:
            raise NotFoundError(f"no policy version {target}")
        content = version_content(db, target)
        previous = draft_revisions(db) if guard is not None else {}
        for kind in POLICY_KINDS:
            put_objects(db, kind, {n: e["body"] for n, e in content.get(kind, {}).items()}, author, prune=True)
        fresh = draft_revisions(db)
        row = _freeze(db, txn, fresh, author, message or f"rollback to version {target}", target)
        if guard is not None:
            guard(db, txn, previous)
        return row

    return dist.transact(run)


def get_version(db: Session, number: int) -> VersionRow:
    row = db.get(VersionRow, number)
    if row is None:
        raise NotFoundError(f"no policy version {number}")
    return row


def list_versions(db: Session, before: int | None, limit: int) -> list[VersionRow]:
    q = select(VersionRow)
    if before is not None:
        q = q.where(VersionRow.number < before)
    return list(db.scalars(q.order_by(VersionRow.number.desc()).limit(limit)))
