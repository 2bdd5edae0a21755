"""Label scopes, checked by effect: a scoped write may not change policy outside its scope.

A principal is *scoped* when it carries a label scope (``app=ops``; several labels are a
conjunction), and every ruleset-manager is scoped (one with an empty scope may write nothing).
A workload is *inside* the scope when it carries every label of it. The rule, for every write a
scoped principal can reach:

    the write is refused (403, naming one such workload) when it would change the compiled
    :class:`~stockade.compiler.HostPolicy` of any workload outside the scope.

It is checked on the compiler's output, not on the shape of the request, so a new selector form
or a new write path cannot slip past it. Two kinds of write:

* **Draft writes** (:func:`guard_draft_write`): the callback edits the draft inside the caller's
  database transaction; the draft is read before and after, and the difference is judged. When
  only rulesets and deny rules changed (plus services, IP lists or label groups that were only
  added, which nothing referenced before), the *fast path* is exact and cheap: the HostRules a
  ruleset or deny rule contributes to a host carry its rule id, so the host's HostPolicy changes
  iff that contribution changes; only the changed objects are expanded (with the compiler's own
  ``expand_rules``) and matched against the workloads outside the scope, once per distinct label
  set. Rules reference address sets by the hash of their selector, and set members depend only on
  the inventory, label groups and IP lists, none of which the fast path lets change. Any other
  change (a modified service, IP list, label group or failsafe) takes the *full path*: the draft
  is compiled before and after and the HostPolicy of every workload outside the scope compared.
  The incremental compiler cannot take rule changes (only ``replace_policy``, a full recompile),
  which is why the fast path exists. A property test checks fast path == full path.
* **Live writes** (:func:`check_deltas`): inventory edits, provisioning and rollback run through
  :meth:`PolicyDistributor.transact`, whose :class:`CompilerTxn` already holds the ``HostDelta``
  of every host the change touches; a delta for a host outside the scope (judged by its labels
  before and after) raises, and ``transact`` rolls the compiler and the database back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from stockade.compiler import Compiler, HostRule
from stockade.compiler.compile import set_name
from stockade.compiler.expand import EffectiveRule, expand_rules
from stockade.compiler.ir import AddressSet, Direction
from stockade.controller.services import codec
from stockade.controller.services.auth import ForbiddenError, Permission, Principal, Role
from stockade.controller.services.codec import KINDS, POLICY_KINDS
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.storage import store
from stockade.model.labels import Label, LabelGroup
from stockade.model.selectors import AllWorkloads, LabelSelector, Selector
from stockade.model.workloads import Workload
from stockade.policyfile.loader import BUILTIN_ANY

T = TypeVar("T")
Objects = Mapping[str, Mapping[str, Mapping[str, Any]]]
LabelSet = frozenset[Label]

RULE_KINDS = frozenset({"ruleset", "deny_rule"})
# kinds whose *added* objects change nothing until a rule references them (which is a rule change),
# except a service named like the built-in ``any``, which every rule using ``any`` then means
REFERENCED_KINDS = frozenset({"service", "ip_list", "label_group"})


class ScopeViolationError(ForbiddenError):
    """A scoped principal's write would change policy outside its scope (HTTP 403)."""


def is_scoped(principal: Principal) -> bool:
    return bool(principal.scope) or principal.role is Role.RULESET_MANAGER


def scope_text(principal: Principal) -> str:
    return ", ".join(str(lab) for lab in principal.scope) or "an empty scope"


def inside(principal: Principal, labels: LabelSet) -> bool:
    return all(lab in labels for lab in principal.scope)


def _require_scope(principal: Principal) -> None:
    if not principal.scope:
        raise ForbiddenError("ruleset-manager has an empty label scope")


def _refuse(principal: Principal, workload: str, what: str) -> ScopeViolationError:
    return ScopeViolationError(
        f"{what} would change the policy of workload {workload!r}, outside your scope ({scope_text(principal)})"
    )


# ---- which routes a scoped principal may write through --------------------------------------------

API = "/api/v1"


def _checked_routes() -> frozenset[tuple[str, str]]:
    out = {("PUT", "/workloads/{name}/mode"), ("PUT", "/policy/draft"), ("POST", "/flows/suggestions/accept"),
           ("POST", "/policy/provision"), ("POST", "/policy/rollback")}
    for kind in KINDS:
        if kind.scope_checked:
            out |= {("POST", f"/{kind.path}"), ("PUT", f"/{kind.path}/{{name}}"),
                    ("DELETE", f"/{kind.path}/{{name}}")}
    return frozenset(out)


SCOPE_CHECKED_ROUTES: frozenset[tuple[str, str]] = _checked_routes()
"""(method, route template under /api/v1) of every write route whose handler checks a scoped
principal's effect; the tests walk them all."""


def check_route(principal: Principal, permission: Permission, method: str, path: str) -> None:
    """Fail closed: a scoped principal may write only through routes that check scope by effect.

    Called for every request after the role check. Routes with other effects (pairing profiles,
    activation codes, agents, users and API keys: a scoped owner could mint an unscoped key)
    refuse a scoped principal whatever its role; a new write route does too until its handler
    checks scope and it is listed in :data:`SCOPE_CHECKED_ROUTES`.
    """
    if permission in (Permission.PUBLIC, Permission.READ, Permission.AGENT) or not is_scoped(principal):
        return
    if (method, path.removeprefix(API)) not in SCOPE_CHECKED_ROUTES:
        raise ForbiddenError(f"{method} {path} is not available to a label-scoped principal "
                             f"(scope {scope_text(principal)}); its effect cannot be confined to the scope")


# ---- ownership (the request's shape: cheap, and a clear message) --------------------------------


def check_ruleset_ownership(principal: Principal, bodies: Iterable[Mapping[str, Any]]) -> None:
    """A ruleset-manager may only touch rulesets whose every scope requires all of its labels.

    This says which rulesets a manager owns; what a ruleset may *do* is checked by effect
    (:func:`guard_draft_write`).
    """
    if principal.role is not Role.RULESET_MANAGER:
        return
    _require_scope(principal)
    need = {(lab.key, lab.value) for lab in principal.scope}
    for body in bodies:
        scopes = body.get("scope", [])
        unscoped = not isinstance(scopes, list) or not scopes  # "all" governs every workload
        if unscoped or any(not need <= set(sc.get("labels", {}).items()) for sc in scopes):
            raise ForbiddenError(f"ruleset {body.get('name')!r} is outside your scope ({scope_text(principal)})")


# ---- draft writes -------------------------------------------------------------------------------


def changed_objects(before: Objects, after: Objects) -> dict[str, set[str]]:
    """Names per kind whose body differs (added, removed or modified)."""
    out: dict[str, set[str]] = {}
    for kind in set(before) | set(after):
        a, b = before.get(kind, {}), after.get(kind, {})
        names = {n for n in set(a) | set(b) if a.get(n) != b.get(n)}
        if names:
            out[kind] = names
    return out


def fast_path_applies(changed: Mapping[str, set[str]], before: Objects) -> bool:
    for kind, names in changed.items():
        if kind in RULE_KINDS:
            continue
        builtin = kind == "service" and BUILTIN_ANY.name in names  # a stored "any" overrides the built-in
        if kind in REFERENCED_KINDS and not builtin and not any(n in before.get(kind, {}) for n in names):
            continue  # only additions
        return False
    return True


def _workloads(dist: PolicyDistributor) -> list[Workload]:
    with dist.lock:
        return list(dist.workloads.values())


def outside_workloads(principal: Principal, workloads: Iterable[Workload]) -> list[Workload]:
    return sorted((w for w in workloads if not inside(principal, w.labels)), key=lambda w: w.name)


def _effective(
    objects: Objects, changed: Mapping[str, set[str]]
) -> tuple[tuple[EffectiveRule, ...], dict[str, LabelGroup]]:
    """The effective rules of the changed rulesets and deny rules only, as ``objects`` has them."""
    part: dict[str, Mapping[str, Mapping[str, Any]]] = {
        kind: objects.get(kind, {}) for kind in ("service", "ip_list", "label_group")
    }
    for kind in RULE_KINDS:
        bodies = objects.get(kind, {})
        part[kind] = {n: bodies[n] for n in changed.get(kind, set()) if n in bodies}
    policy = codec.build_policy(part)
    return expand_rules(policy), policy.group_map()


def _selects(sel: Selector, labels: LabelSet, groups: dict[str, LabelGroup]) -> bool:
    if isinstance(sel, AllWorkloads):
        return True
    return isinstance(sel, LabelSelector) and sel.matches(labels, groups)


def contribution(
    rules: Iterable[EffectiveRule], labels: LabelSet, groups: dict[str, LabelGroup]
) -> frozenset[HostRule]:
    """The HostRules ``rules`` give a workload with ``labels`` (as :func:`compile_host` builds them)."""
    out: set[HostRule] = set()
    for r in rules:
        for direction, mine, theirs in (
            (Direction.INBOUND, r.providers, r.consumers),
            (Direction.OUTBOUND, r.consumers, r.providers),
        ):
            if any(_selects(sel, labels, groups) for sel in mine):
                out.update(HostRule(r.action, direction, r.rule_id, set_name(p), r.services, r.encrypt) for p in theirs)
    return frozenset(out)


def first_rule_change(
    before: Objects, after: Objects, changed: Mapping[str, set[str]], outside: list[Workload]
) -> str | None:
    """Fast path: the first workload of ``outside`` whose rules from the changed objects differ."""
    old_rules, old_groups = _effective(before, changed)
    new_rules, new_groups = _effective(after, changed)
    if old_rules == new_rules and old_groups == new_groups:
        return None
    # only labels the rules' selectors mention decide what they match (the compiler's own idea)
    relevant = _mentioned(old_rules, old_groups) | _mentioned(new_rules, new_groups)
    seen: set[LabelSet] = set()
    for w in outside:
        key = w.labels & relevant
        if key in seen:
            continue
        seen.add(key)
        if contribution(old_rules, key, old_groups) != contribution(new_rules, key, new_groups):
            return w.name
    return None


def _mentioned(rules: Iterable[EffectiveRule], groups: dict[str, LabelGroup]) -> frozenset[Label]:
    found: set[Label] = set()
    for r in rules:
        for sel in (*r.consumers, *r.providers):
            if isinstance(sel, LabelSelector):
                found.update(sel.mentioned_labels(groups))
    return frozenset(found)


def first_compiled_change(
    dist: PolicyDistributor, before: Objects, after: Objects, outside: list[Workload]
) -> str | None:
    """Full path: compile the draft before and after; the first workload of ``outside`` that differs."""
    with dist.lock:
        p_before, p_after = dist.assemble(before), dist.assemble(after)
    c_before, c_after = Compiler(p_before), Compiler(p_after)
    names = set(c_before.workload_names)
    # Hosts of one label set share one rules tuple (per compiler), and a set's members depend only
    # on its name (the hash of its selector): compare each rules pair and each named set once.
    same_rules: dict[tuple[int, int], bool] = {}
    same_set: dict[tuple[str, int], bool] = {}

    def sets_equal(x: tuple[AddressSet, ...], y: tuple[AddressSet, ...]) -> bool:
        if [(s.name, s.family) for s in x] != [(s.name, s.family) for s in y]:
            return False
        for sx, sy in zip(x, y, strict=True):
            key = (sx.name, sx.family.value)
            equal = same_set.get(key)
            if equal is None:
                equal = same_set[key] = sx == sy
            if not equal:
                return False
        return True

    for w in outside:
        if w.name not in names:
            continue
        a, b = c_before.host_policy(w.name), c_after.host_policy(w.name)
        if replace(a, rules=(), sets=()) != replace(b, rules=(), sets=()):  # every other field
            return w.name
        rkey = (id(a.rules), id(b.rules))
        equal = same_rules.get(rkey)
        if equal is None:
            equal = same_rules[rkey] = a.rules == b.rules
        if not equal or not sets_equal(a.sets, b.sets):
            return w.name
    return None


def check_policy_change(principal: Principal, dist: PolicyDistributor, before: Objects, after: Objects) -> None:
    """Refuse when the draft change ``before`` -> ``after`` alters a HostPolicy outside the scope."""
    if not is_scoped(principal):
        return
    _require_scope(principal)
    changed = changed_objects(before, after)
    if not changed:
        return
    outside = outside_workloads(principal, _workloads(dist))
    if not outside:
        return
    if fast_path_applies(changed, before):
        victim = first_rule_change(before, after, changed, outside)
    else:
        victim = first_compiled_change(dist, before, after, outside)
    if victim is not None:
        kinds = ", ".join(f"{k} {n!r}" for k in sorted(changed) for n in sorted(changed[k])[:3])
        raise _refuse(principal, victim, f"changing {kinds}")


def draft_snapshot(db: Session) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in store.draft_objects(db, POLICY_KINDS).items()}


def guard_draft_write(db: Session, dist: PolicyDistributor, principal: Principal, fn: Callable[[], T]) -> T:
    """Run ``fn`` (a draft edit in ``db``'s transaction) and refuse if its effect leaves the scope.

    The refusal raises inside the caller's transaction, so the draft is left unchanged.
    """
    if not is_scoped(principal):
        return fn()
    before = draft_snapshot(db)
    result = fn()
    db.flush()
    check_policy_change(principal, dist, before, draft_snapshot(db))
    return result


# ---- live writes (inventory, provision, rollback) -----------------------------------------------


def labels_now(dist: PolicyDistributor, name: str) -> LabelSet | None:
    """A workload's labels in the live inventory (None: absent); take it before changing it."""
    w = dist.workloads.get(name)
    return w.labels if w is not None else None


def check_deltas(
    principal: Principal,
    txn: CompilerTxn,
    earlier: Mapping[str, LabelSet | None] | None = None,
    what: str = "this change",
) -> None:
    """Refuse when ``txn`` changed the HostPolicy of a host outside the scope.

    A host counts as inside only when it is inside both before (``earlier``: labels of the
    workloads the write changed, taken before the change) and after the change.
    """
    if not is_scoped(principal):
        return
    _require_scope(principal)
    earlier = earlier or {}
    for name in sorted(txn.deltas):
        now = labels_now(txn.dist, name)
        then = earlier.get(name, now)
        if any(labels is not None and not inside(principal, labels) for labels in (then, now)):
            raise _refuse(principal, name, what)


def _bodies(content: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: {n: e["body"] for n, e in content.get(k, {}).items()} for k in POLICY_KINDS}


def version_guard(
    principal: Principal, what: str
) -> Callable[[Session, CompilerTxn, Mapping[str, Any]], None] | None:
    """The guard for :func:`versions.provision` / :func:`versions.rollback` (None: not scoped).

    Refuses when the new active version changes a host outside the scope (the transaction's
    deltas), or when the operation changed the draft (a rollback resets it) in a way that changes
    a host outside the scope.
    """
    if not is_scoped(principal):
        return None

    def guard(db: Session, txn: CompilerTxn, draft_before: Mapping[str, Any]) -> None:
        check_deltas(principal, txn, what=what)
        check_policy_change(principal, txn.dist, _bodies(draft_before), draft_snapshot(db))

    return guard
