"""Impact preview: replay recorded connections through the reference evaluator, before and after.

:func:`preview` evaluates every recorded connection against the active policy and against a
draft (both with the same inventory), and lists the connections whose verdict changes, most
harmful first: newly blocked, then newly potentially blocked (a visibility-mode host would
report it), then the ones that become less blocked. Each item keeps both evaluations, so the
deciding rule before and after is at hand, and says what happens in words
("web-prod-1 -> db-prod-1 5432/tcp becomes allowed by ruleset billing-prod rule 1").

The guard looks both ways: :func:`widenings` compares, rule by rule, the workloads each allow rule
reaches (its providers and its consumers, confined to the ruleset's scope) in the active policy
and in the draft, so a draft that widens a rule to more workloads says so even when no recorded
flow shows it yet. A widening *needs confirmation* when an existing rule reaches more workloads or
when the rule's ruleset governs every workload (scope "all"); a new rule in a scoped ruleset is
listed but confined by the scope its author chose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from stockade.evaluator import Evaluation, Evaluator, SideDecision, Verdict
from stockade.model.labels import LabelGroup
from stockade.model.policy import Policy
from stockade.model.rule_ids import rule_title, ruleset_rule_id
from stockade.model.rules import AllowRule, ConsumerScope, Ruleset
from stockade.model.selectors import AllWorkloads, LabelSelector, Selector
from stockade.model.workloads import Workload
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


_VERDICT_WORDS = {
    Verdict.ALLOWED: "allowed",
    Verdict.BLOCKED: "blocked",
    Verdict.POTENTIALLY_BLOCKED: "potentially blocked (a visibility-mode host reports it)",
}


@dataclass(frozen=True)
class ImpactItem:
    connection: Connection
    change: ChangeKind
    before: Evaluation
    after: Evaluation
    src_name: str = ""  # the source workload's name, or its address when unmanaged
    dst_name: str = ""

    @property
    def sentence(self) -> str:
        """``web-1 -> db-1 5432/tcp becomes allowed by ruleset shop rule 1``."""
        k = self.connection.key
        src = self.src_name or str(k.src)
        dst = self.dst_name or str(k.dst)
        return f"{src} -> {dst} {k.service_text()} becomes {_VERDICT_WORDS[self.after.verdict]} {_by(self.after)}"


def _by(ev: Evaluation) -> str:
    """Which rule decides an evaluation, in words (the blocking side for a block)."""
    sides = [d for d in (ev.outbound, ev.inbound) if d is not None]
    if ev.verdict is Verdict.ALLOWED:
        deciding: list[SideDecision] = [d for d in sides if not d.rule_id.startswith("failsafe")] or sides
    else:
        deciding = [d for d in sides if d.action != "allow"]
    if not deciding:
        return "(no managed side)"
    titles = {rule_title(d.rule_id) for d in deciding}
    if ev.verdict is not Verdict.ALLOWED and any(d.encrypted for d in deciding):
        # an encrypt change: the other end cannot run WireGuard (idle, unmanaged, no key)
        return "by " + " and ".join(sorted(titles)) + " (encrypt: true, and the other end cannot run WireGuard)"
    if len(titles) == 1 and deciding[0].rule_id.startswith(("ruleset/", "deny/")):
        return f"by {titles.pop()}"  # the same rule on both sides
    return "by " + " and ".join(f"{rule_title(d.rule_id)} at {d.workload}" for d in deciding)


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
            src_w, dst_w = after_ev.owner(k.src), after_ev.owner(k.dst)
            items.append(ImpactItem(c, kind, before, after, src_w.name if src_w else "", dst_w.name if dst_w else ""))
    items.sort(key=lambda i: (i.change, -VERDICT_SEVERITY[i.after.verdict], -i.connection.count,
                              i.connection.key.sort_key()))
    return Impact(tuple(items), n)


# ---- rules that reach more workloads ---------------------------------------------------------------


@dataclass(frozen=True)
class RuleWidening:
    """An allow rule of the draft that reaches workloads the active policy's same rule does not."""

    ruleset: str
    index: int  # 0-based position in the ruleset (the stored rule id's index)
    added: tuple[str, ...]  # workload names, sorted
    reaches: int  # workloads the draft's rule reaches in all
    new_rule: bool  # no such rule in the active policy
    every_workload: bool  # the ruleset's scope is "all"

    @property
    def rule_id(self) -> str:
        return ruleset_rule_id(self.ruleset, self.index)

    @property
    def needs_confirmation(self) -> bool:
        return self.every_workload or not self.new_rule

    @property
    def sentence(self) -> str:
        shown = ", ".join(self.added[:8]) + (f" and {len(self.added) - 8} more" if len(self.added) > 8 else "")
        n = len(self.added)
        what = f"{n}{'' if self.new_rule else ' more'} workload{'s' if n != 1 else ''}"
        where = " in every app and environment (its scope is all workloads)" if self.every_workload else ""
        verb = "is new and reaches" if self.new_rule else "now reaches"
        return f"{rule_title(self.rule_id)} {verb} {what}{where}: {shown}"


def _matches(sel: Selector, w: Workload, groups: dict[str, LabelGroup]) -> bool:
    if isinstance(sel, AllWorkloads):
        return True
    return isinstance(sel, LabelSelector) and sel.matches(w.labels, groups)


def _reach(rs: Ruleset, rule: AllowRule, workloads: tuple[Workload, ...], groups: dict[str, LabelGroup]) -> set[str]:
    """Workloads that get ``rule`` on a side: providers in scope, consumers (in scope when intra)."""
    scopes: tuple[LabelSelector | None, ...] = rs.scopes or (None,)
    intra = rule.consumers_scope is ConsumerScope.INTRA
    out: set[str] = set()
    for w in workloads:
        in_scope = any(sc is None or sc.matches(w.labels, groups) for sc in scopes)
        provider = in_scope and any(_matches(p, w, groups) for p in rule.providers)
        consumer = (in_scope or not intra) and any(_matches(c, w, groups) for c in rule.consumers)
        if provider or consumer:
            out.add(w.name)
    return out


def _same_rule(a: AllowRule, b: AllowRule) -> bool:
    """Equal but for the note (a rule's identity is what it allows)."""
    return (a.consumers, a.providers, a.services, a.consumers_scope) == (b.consumers, b.providers, b.services,
                                                                        b.consumers_scope)


def _counterpart(old: Ruleset | None, new: Ruleset, j: int) -> AllowRule | None:
    """The active rule a draft rule stands for: an identical rule of the same ruleset wherever it is
    (rules above it removed or inserted), else the rule edited in place at the same position."""
    if old is None:
        return None
    rule = new.rules[j]
    for r in old.rules:
        if _same_rule(r, rule):
            return r
    if j < len(old.rules) and not any(_same_rule(old.rules[j], r) for r in new.rules):
        return old.rules[j]
    return None


def widenings(active: Policy, draft: Policy) -> tuple[RuleWidening, ...]:
    """Rules of ``draft`` reaching workloads their counterpart in ``active`` does not (see
    :func:`_counterpart`), over the draft's inventory; sorted by ruleset and position."""
    workloads = draft.workloads
    before_groups, after_groups = active.group_map(), draft.group_map()
    before = {rs.name: rs for rs in active.rulesets}
    out: list[RuleWidening] = []
    for rs in sorted(draft.rulesets, key=lambda r: r.name):
        old_rs = before.get(rs.name)
        for j, rule in enumerate(rs.rules):
            reach = _reach(rs, rule, workloads, after_groups)
            was = _counterpart(old_rs, rs, j)
            had = _reach(old_rs, was, workloads, before_groups) if old_rs is not None and was is not None else set()
            added = tuple(sorted(reach - had))
            if added:
                out.append(RuleWidening(rs.name, j, added, len(reach), was is None, not rs.scopes))
    return tuple(out)
