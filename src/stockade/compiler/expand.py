"""Expand rulesets and deny rules into flat ``EffectiveRule``s.

A ruleset rule is confined to each of its scopes: providers always, consumers only
when intra-scope. Service names are resolved to entries. The result no longer knows
about rulesets, which keeps the index and the per-host compile simple.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stockade.errors import CompileError
from stockade.model.policy import Policy
from stockade.model.rules import Action, ConsumerScope
from stockade.model.selectors import LabelSelector, Selector, confine, selector_sort_key
from stockade.model.services import ANY_SERVICE_ENTRY, Service, ServiceEntry


@dataclass(frozen=True, order=True)
class EffectiveRule:
    action: Action
    rule_id: str
    consumers: tuple[Selector, ...]
    providers: tuple[Selector, ...]
    services: tuple[ServiceEntry, ...]


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
    return tuple(sorted(set(sels), key=selector_sort_key))


def expand_rules(policy: Policy) -> tuple[EffectiveRule, ...]:
    out: list[EffectiveRule] = []
    service_map = policy.service_map()
    for rs in policy.rulesets:
        scopes: tuple[LabelSelector, ...] = rs.scopes or (LabelSelector(),)
        for j, rule in enumerate(rs.rules):
            rule_id = f"ruleset/{rs.name}/{j}"
            services = resolve_services(service_map, rule.services, rule_id)
            for scope in scopes:
                providers = [p for p in (confine(s, scope) for s in rule.providers) if p is not None]
                if rule.consumers_scope is ConsumerScope.INTRA:
                    consumers = [c for c in (confine(s, scope) for s in rule.consumers) if c is not None]
                else:
                    consumers = list(rule.consumers)
                if providers and consumers:
                    out.append(
                        EffectiveRule(Action.ALLOW, rule_id, _dedupe(consumers), _dedupe(providers), services)
                    )
    for d in policy.deny_rules:
        rule_id = f"deny/{d.name}"
        services = resolve_services(service_map, d.services, rule_id)
        out.append(
            EffectiveRule(d.action, rule_id, _dedupe(list(d.consumers)), _dedupe(list(d.providers)), services)
        )
    return tuple(out)
