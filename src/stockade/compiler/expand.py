"""Expand rulesets and deny rules into flat ``EffectiveRule``s, and intern them in a ``RuleTable``.

A ruleset rule is confined to each of its scopes: providers always, consumers only
when intra-scope. Service names are resolved to entries. The result no longer knows
about rulesets, which keeps the index and the per-host compile simple.

``RuleTable`` is what the compiler works from: every distinct selector gets an integer id
(interned by its canonical text, whose hash Python caches), every distinct ``HostRule`` is
built once and numbered by its rank in sort order, and each selector lists the numbered host
rules it brings in as provider (inbound) or consumer (outbound). Compiling a label set is then
a union of small integer sets and one sort of plain ints, with no dataclass hashing or
ordering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from stockade.compiler.ir import Direction, HostRule, make_host_rule, unchecked
from stockade.errors import CompileError
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.rules import Action, ConsumerScope
from stockade.model.selectors import ALL_WORKLOADS, AllWorkloads, IPListSelector, LabelSelector, Selector
from stockade.model.services import ANY_SERVICE_ENTRY, Service, ServiceEntry


@dataclass(frozen=True, order=True)
class EffectiveRule:
    action: Action
    rule_id: str
    consumers: tuple[Selector, ...]
    providers: tuple[Selector, ...]
    services: tuple[ServiceEntry, ...]
    encrypt: bool = False


def set_name(sel: Selector) -> str:
    """Stable address-set name: a hash of the canonical selector (valid nft/ipset identifier)."""
    return "p" + hashlib.sha256(sel.canonical().encode()).hexdigest()[:12]


def resolve_services(
    services: Mapping[str, Service], names: tuple[str, ...], rule_id: str
) -> tuple[ServiceEntry, ...]:
    entries: set[ServiceEntry] = set()
    for name in names:
        svc = services.get(name)
        if svc is None:
            if name == "any":
                entries.add(ANY_SERVICE_ENTRY)
                continue
            raise CompileError(f"rule {rule_id}: unknown service {name!r}")
        entries.update(svc.entries)
    if ANY_SERVICE_ENTRY in entries:
        return (ANY_SERVICE_ENTRY,)
    # an entry for every port (or ICMP type) of a protocol subsumes the ported ones
    whole = {e.proto for e in entries if e.first is None}
    return tuple(sorted(e for e in entries if e.first is None or e.proto not in whole))


def _dedupe(sels: list[Selector]) -> tuple[Selector, ...]:
    if len(sels) == 1:
        return (sels[0],)
    # equal selectors have equal canonical text and vice versa; strings hash in C
    by_text = {s.canonical(): s for s in sels}
    return tuple(by_text[k] for k in sorted(by_text))


def _label_order(lab: Label) -> tuple[str, str]:
    return lab.key, lab.value  # the dataclass order of Label, without its Python-level __lt__


def _union(a: tuple[Label, ...], b: tuple[Label, ...]) -> tuple[Label, ...]:
    if not b:
        return a
    if not a:
        return b
    by_key = {(lab.key, lab.value): lab for lab in a}
    for lab in b:
        by_key.setdefault((lab.key, lab.value), lab)
    return tuple(by_key[k] for k in sorted(by_key))


class _Confiner:
    """``selectors.confine`` with the same results, memoised per (selector, scope) text."""

    def __init__(self) -> None:
        self.memo: dict[tuple[str, str], Selector | None] = {}  # (selector, scope) text -> result

    def __call__(self, sel: Selector, scope: LabelSelector) -> Selector | None:
        if isinstance(sel, IPListSelector):
            return sel
        key = (sel.canonical(), scope.canonical())
        if key in self.memo:
            return self.memo[key]
        if isinstance(sel, AllWorkloads):
            merged = scope
        else:
            merged = LabelSelector(
                _union(sel.require, scope.require),
                tuple(sorted(set(sel.groups) | set(scope.groups))),
                _union(sel.exclude, scope.exclude),
            )
        out: Selector | None
        if not merged.require and not merged.groups and not merged.exclude:
            out = ALL_WORKLOADS
        else:
            keys = [lab.key for lab in merged.require]
            required = {(lab.key, lab.value) for lab in merged.require}
            excluded = {(lab.key, lab.value) for lab in merged.exclude}
            ok = len(keys) == len(set(keys)) and not required & excluded
            out = merged if ok else None
        self.memo[key] = out
        return out


def expand_rules(policy: Policy) -> tuple[EffectiveRule, ...]:
    out: list[EffectiveRule] = []
    service_map = policy.service_map()
    resolved: dict[tuple[str, ...], tuple[ServiceEntry, ...]] = {}
    confine = _Confiner()

    def services_of(names: tuple[str, ...], rule_id: str) -> tuple[ServiceEntry, ...]:
        found = resolved.get(names)
        if found is None:
            found = resolved[names] = resolve_services(service_map, names, rule_id)
        return found

    memo = confine.memo

    def confined(sels: tuple[Selector, ...], scope: LabelSelector, scope_text: str) -> list[Selector]:
        found: list[Selector] = []
        for sel in sels:
            c = memo.get((sel.canonical(), scope_text), sel)
            if c is sel:  # not memoised yet, an IP list, or memoised as itself: ``confine`` answers
                c = confine(sel, scope)
            if c is not None:
                found.append(c)
        return found

    def effective(action: Action, rule_id: str, consumers: list[Selector], providers: list[Selector],
                  services: tuple[ServiceEntry, ...], encrypt: bool) -> EffectiveRule:
        return unchecked(EffectiveRule, {"action": action, "rule_id": rule_id, "consumers": _dedupe(consumers),
                                         "providers": _dedupe(providers), "services": services, "encrypt": encrypt})

    for rs in policy.rulesets:
        scopes: tuple[LabelSelector, ...] = rs.scopes or (LabelSelector(),)
        scope_texts = [(scope, scope.canonical()) for scope in scopes]
        for j, rule in enumerate(rs.rules):
            rule_id = f"ruleset/{rs.name}/{j}"
            services = services_of(rule.services, rule_id)
            intra = rule.consumers_scope is ConsumerScope.INTRA
            encrypt = rs.encrypts(j)
            for scope, scope_text in scope_texts:
                providers = confined(rule.providers, scope, scope_text)
                consumers = confined(rule.consumers, scope, scope_text) if intra else list(rule.consumers)
                if providers and consumers:
                    out.append(effective(Action.ALLOW, rule_id, consumers, providers, services, encrypt))
    for d in policy.deny_rules:
        rule_id = f"deny/{d.name}"
        services = services_of(d.services, rule_id)
        out.append(effective(d.action, rule_id, list(d.consumers), list(d.providers), services, False))
    return tuple(out)


@dataclass
class RuleTable:
    """Effective rules interned for the per-label-set compile (see the module docstring)."""

    selectors: list[Selector] = field(default_factory=list)  # by selector id
    names: list[str] = field(default_factory=list)  # address-set name by selector id
    ids: dict[str, int] = field(default_factory=dict)  # canonical text -> selector id
    # by host-rule id, which is the rule's position in HostRule order: ids sort like their rules
    host_rules: list[HostRule] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # peer set name of host_rules[id]
    # selector id -> every host-rule id it brings in (inbound and outbound), unioned once here
    # instead of once per label set matching it
    rules_of: dict[int, frozenset[int]] = field(default_factory=dict)
    encrypted: frozenset[int] = frozenset()  # ids of the host rules with ``encrypt``

    def intern(self, sel: Selector) -> int:
        text = sel.canonical()
        sid = self.ids.get(text)
        if sid is None:
            sid = self.ids[text] = len(self.selectors)
            self.selectors.append(sel)
            self.names.append(set_name(sel))
        return sid


def _ranks(values: list[tuple[ServiceEntry, ...]]) -> dict[int, int]:
    """id(services tuple) -> its rank in sorted order (equal tuples share a rank)."""
    ordered = sorted({id(v): v for v in values}.items(), key=lambda item: item[1])
    out: dict[int, int] = {}
    rank = -1
    prev: tuple[ServiceEntry, ...] | None = None
    for ident, v in ordered:
        if prev is None or v != prev:
            rank += 1
            prev = v
        out[ident] = rank
    return out


def build_rule_table(rules: tuple[EffectiveRule, ...]) -> RuleTable:
    table = RuleTable()
    action_rank = {id(a): i for i, a in enumerate(sorted(Action))}  # by identity: Enum hashes in Python
    svc_rank = _ranks([r.services for r in rules])
    names, selectors, ids = table.names, table.selectors, table.ids
    in_text, out_text = Direction.INBOUND.value, Direction.OUTBOUND.value  # Direction orders by value
    # a HostRule as a tuple of primitives ordered exactly like HostRule.sort_key -> its id
    keys: dict[tuple[int, str, bool, str, str, int], int] = {}
    specs: list[tuple[Action, str, str, str, tuple[ServiceEntry, ...], bool]] = []
    # provider (inbound) / consumer (outbound) selector id -> groups of host-rule ids, numbered
    # in order of appearance until they are ranked at the end
    table_in: dict[int, list[tuple[int, ...]]] = {}
    table_out: dict[int, list[tuple[int, ...]]] = {}

    # selector object -> id, by identity: the expanded rules share their selector objects (the
    # confined ones are memoised), and an int lookup is cheaper than a ``canonical()`` call per
    # rule; every object stays alive in ``rules`` for the whole build, so no id is reused
    by_id: dict[int, int] = {}

    def intern(sels: tuple[Selector, ...]) -> list[int]:
        out: list[int] = []
        for sel in sels:
            sid = by_id.get(id(sel))
            if sid is None:
                text = sel.canonical()
                sid = ids.get(text)
                if sid is None:
                    sid = ids[text] = len(selectors)
                    selectors.append(sel)
                    names.append(set_name(sel))
                by_id[id(sel)] = sid
            out.append(sid)
        return out

    for r in rules:
        cons = intern(r.consumers)
        prov = intern(r.providers)
        action, rule_id, services, enc = r.action, r.rule_id, r.services, r.encrypt
        ar, sr, plain = action_rank[id(action)], svc_rank[id(services)], not enc
        in_ids: list[int] = []
        for c in cons:
            key = (ar, in_text, plain, rule_id, names[c], sr)
            k = keys.get(key)
            if k is None:
                k = keys[key] = len(specs)
                specs.append((action, in_text, rule_id, names[c], services, enc))
            in_ids.append(k)
        out_ids: list[int] = []
        for p in prov:
            key = (ar, out_text, plain, rule_id, names[p], sr)
            k = keys.get(key)
            if k is None:
                k = keys[key] = len(specs)
                specs.append((action, out_text, rule_id, names[p], services, enc))
            out_ids.append(k)
        in_group, out_group = tuple(in_ids), tuple(out_ids)
        for p in prov:
            found = table_in.get(p)
            if found is None:
                table_in[p] = [in_group]
            else:
                found.append(in_group)
        for c in cons:
            found = table_out.get(c)
            if found is None:
                table_out[c] = [out_group]
            else:
                found.append(out_group)
    # renumber the host rules by their rank (so ids sort like the rules, with no key function):
    # (key, id) pairs sorted, the keys unique so the ids are never compared, and no key hashed
    # again to find its id (tuples do not cache their hash)
    order = [k for _, k in sorted(keys.items())]  # tuples of primitives: compared in C
    rank_of = [0] * len(specs)
    for rank, k in enumerate(order):
        rank_of[k] = rank
    ranked = [specs[k] for k in order]
    directions = {d.value: d for d in Direction}
    table.host_rules = [make_host_rule(a, directions[t], rid, peer, svc, enc) for a, t, rid, peer, svc, enc in ranked]
    table.peers = [spec[3] for spec in ranked]
    renumber = rank_of.__getitem__
    for sid in set(table_in) | set(table_out):
        spec_ids = frozenset().union(*table_in.get(sid, ()), *table_out.get(sid, ()))
        table.rules_of[sid] = frozenset(map(renumber, spec_ids))
    table.encrypted = frozenset(k for k, spec in enumerate(ranked) if spec[5])
    return table
