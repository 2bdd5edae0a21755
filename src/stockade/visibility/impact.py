"""Impact preview: replay recorded connections through the reference evaluator, before and after.

:func:`preview` evaluates every recorded connection against the active policy and against a
draft (both with the same inventory), and lists the connections whose verdict changes, most
harmful first: newly blocked, then newly potentially blocked (a visibility-mode host would
report it), then the ones that become less blocked. Each item keeps both evaluations, so the
deciding rule before and after is at hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from stockade.evaluator import Evaluation, Evaluator, Verdict
from stockade.model.policy import Policy
from stockade.visibility.flows import VERDICT_SEVERITY, Connection


class ChangeKind(Enum):
    """How a connection's verdict changes, in the order a reviewer must read them."""

    NEWLY_BLOCKED = "newly-blocked"
    NEWLY_POTENTIALLY_BLOCKED = "newly-potentially-blocked"
    NEWLY_ALLOWED = "newly-allowed"
    NO_LONGER_BLOCKED = "no-longer-blocked"  # blocked -> potentially blocked

    def __lt__(self, other: ChangeKind) -> bool:
        return _CHANGE_ORDER[self] < _CHANGE_ORDER[other]


_CHANGE_ORDER = {c: i for i, c in enumerate(ChangeKind)}


def change_kind(before: Verdict, after: Verdict) -> ChangeKind | None:
    if before is after:
        return None
    if after is Verdict.BLOCKED:
        return ChangeKind.NEWLY_BLOCKED
    if after is Verdict.POTENTIALLY_BLOCKED:
        return (ChangeKind.NEWLY_POTENTIALLY_BLOCKED if before is Verdict.ALLOWED
                else ChangeKind.NO_LONGER_BLOCKED)
    return ChangeKind.NEWLY_ALLOWED


@dataclass(frozen=True)
class ImpactItem:
    connection: Connection
    change: ChangeKind
    before: Evaluation
    after: Evaluation


@dataclass(frozen=True)
class Impact:
    items: tuple[ImpactItem, ...]  # sorted: change kind, then the most-seen connections first
    evaluated: int  # connections replayed

    def count(self, kind: ChangeKind) -> int:
        return sum(1 for i in self.items if i.change is kind)

    @property
    def newly_blocked(self) -> int:
        return self.count(ChangeKind.NEWLY_BLOCKED)


def preview(
    active: Policy | Evaluator,
    draft: Policy | Evaluator,
    connections: Iterable[Connection],
) -> Impact:
    """Connections whose verdict differs between ``active`` and ``draft``."""
    before_ev = active if isinstance(active, Evaluator) else Evaluator(active)
    after_ev = draft if isinstance(draft, Evaluator) else Evaluator(draft)
    items: list[ImpactItem] = []
    n = 0
    for c in connections:
        n += 1
        k = c.key
        before = before_ev.evaluate(k.src, k.dst, k.proto, k.port)
        after = after_ev.evaluate(k.src, k.dst, k.proto, k.port)
        kind = change_kind(before.verdict, after.verdict)
        if kind is not None:
            items.append(ImpactItem(c, kind, before, after))
    items.sort(key=lambda i: (i.change, -VERDICT_SEVERITY[i.after.verdict], -i.connection.count,
                              i.connection.key.sort_key()))
    return Impact(tuple(items), n)
