"""Expand rulesets and deny rules into flat ``EffectiveRule``s, and intern them in a ``RuleTable``.

A ruleset rule is confined to each of its scopes: providers always, consumers only
when intra-scope. Service names are resolved to entries. The result no longer knows
about rulesets, which keeps the index and the per-host compile simple.

``RuleTable`` is what the compiler works from: every distinct selector gets an integer id
(interned by its canonical text, whose hash Python caches), every distinct ``HostRule`` is
built once and numbered, with its rank in sort order, and each selector lists the numbered
host rules it brings in as provider (inbound) or consumer (outbound). Compiling a label set
is then a union of small integer tuples and one sort by rank, with no dataclass hashing or
ordering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from stockade.compiler.ir import Direction, HostRule
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
        self._memo: dict[tuple[str, str], Selector | None] = {}

    def __call__(self, sel: Selector, scope: LabelSelector) -> Selector | None:
        if isinstance(sel, IPListSelector):
            return sel
        key = (sel.canonical(), scope.canonical())
        if key in self._memo:
            return self._memo[key]
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
        self._memo[key] = out
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

    for rs in policy.rulesets:
        scopes: tuple[LabelSelector, ...] = rs.scopes or (LabelSelector(),)
        for j, rule in enumerate(rs.rules):
            rule_id = f"ruleset/{rs.name}/{j}"
            services = services_of(rule.services, rule_id)
            for scope in scopes:
                providers = [p for p in (confine(s, scope) for s in rule.providers) if p is not None]
                if rule.consumers_scope is ConsumerScope.INTRA:
                    consumers = [c for c in (confine(s, scope) for s in rule.consumers) if c is not None]
                else:
                    consumers = list(rule.consumers)
                if providers and consumers:
                    out.append(
                        EffectiveRule(
                            Action.ALLOW, rule_id, _dedupe(consumers), _dedupe(providers), services, rs.encrypts(j)
                        )
                    )
    for d in policy.deny_rules:
        rule_id = f"deny/{d.name}"
        services = services_of(d.services, rule_id)
        out.append(
            EffectiveRule(d.action, rule_id, _dedupe(list(d.consumers)), _dedupe(list(d.providers)), services)
        )
    return tuple(out)


@dataclass
class RuleTable:
    """Effective rules interned for the per-label-set compile (see the module docstring)."""

    selectors: list[Selector] = field(default_factory=list)  # by selector id
    names: list[str] = field(default_factory=list)  # address-set name by selector id
    ids: dict[str, int] = field(default_factory=dict)  # canonical text -> selector id
    host_rules: list[HostRule] = field(default_factory=list)  # by host-rule id
    peers: list[str] = field(default_factory=list)  # peer set name of host_rules[id]
    rank: list[int] = field(default_factory=list)  # position of host_rules[id] in HostRule order
    inbound: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # provider id -> host-rule ids
    outbound: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # consumer id -> host-rule ids

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
    action_rank = {a: i for i, a in enumerate(sorted(Action))}
    svc_rank = _ranks([r.services for r in rules])
    names, intern = table.names, table.intern
    in_text, out_text = Direction.INBOUND.value, Direction.OUTBOUND.value  # Direction orders by value
    # a HostRule as a tuple of primitives ordered exactly like HostRule.sort_key -> its id
    keys: dict[tuple[int, str, bool, str, str, int], int] = {}
    specs: list[tuple[Action, str, str, str, tuple[ServiceEntry, ...], bool]] = []
    table_in, table_out = table.inbound, table.outbound

    def host_rule(ar: int, text: str, rule_id: str, peer: str, sr: int, spec_action: Action,
                  services: tuple[ServiceEntry, ...], encrypt: bool) -> int:
        key = (ar, text, not encrypt, rule_id, peer, sr)
        k = keys.get(key)
        if k is None:
            k = keys[key] = len(specs)
            specs.append((spec_action, text, rule_id, peer, services, encrypt))
        return k

    for r in rules:
        cons = [intern(s) for s in r.consumers]
        prov = [intern(s) for s in r.providers]
        action, rule_id, services, enc = r.action, r.rule_id, r.services, r.encrypt
        ar, sr = action_rank[action], svc_rank[id(services)]
        in_ids = tuple([host_rule(ar, in_text, rule_id, names[c], sr, action, services, enc) for c in cons])
        out_ids = tuple([host_rule(ar, out_text, rule_id, names[p], sr, action, services, enc) for p in prov])
        for p in prov:
            table_in.setdefault(p, []).append(in_ids)
        for c in cons:
            table_out.setdefault(c, []).append(out_ids)
    table.rank = [0] * len(specs)
    for rank, key in enumerate(sorted(keys)):  # tuples of primitives: compared in C, in HostRule order
        table.rank[keys[key]] = rank
    directions = {d.value: d for d in Direction}
    table.host_rules = [HostRule(a, directions[t], rid, peer, svc, enc) for a, t, rid, peer, svc, enc in specs]
    table.peers = [spec[3] for spec in specs]
    return table
