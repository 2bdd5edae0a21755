"""``dump_policy``: a Policy back to multi-document policy YAML.

The output is deterministic: documents in ``Kind`` order, each kind sorted by name,
keys in a fixed order, sets sorted. Defaults are left out (the default label keys, the
built-in ``any`` service, default Settings, empty descriptions), so that
``load_documents(dump_policy(p), ...) == p`` for every ``p`` that ``load_policy`` returns.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import yaml

from stockade.codec.collected import API_VERSION, BUILTIN_ANY, Kind
from stockade.codec.syntax import format_service_entry
from stockade.model.labels import DEFAULT_LABEL_KEYS, Label
from stockade.model.policy import Failsafe, Policy
from stockade.model.rules import AllowRule, ConsumerScope
from stockade.model.selectors import AllWorkloads, IPListSelector, LabelSelector, Selector

Doc = dict[str, Any]


def _doc(kind: Kind, name: str | None = None) -> Doc:
    doc: Doc = {"apiVersion": API_VERSION, "kind": kind.value}
    if name is not None:
        doc["name"] = name
    return doc


def _describe(doc: Doc, description: str) -> Doc:
    if description:
        doc["description"] = description
    return doc


def _labels(labels: tuple[Label, ...] | frozenset[Label]) -> dict[str, str]:
    return {lab.key: lab.value for lab in sorted(labels)}


def _excluded(labels: tuple[Label, ...]) -> dict[str, str | list[str]]:
    by_key: dict[str, list[str]] = defaultdict(list)
    for lab in sorted(labels):
        by_key[lab.key].append(lab.value)
    return {k: v[0] if len(v) == 1 else v for k, v in sorted(by_key.items())}


def _selector(sel: Selector) -> str | Doc:
    if isinstance(sel, AllWorkloads):
        return "all"
    if isinstance(sel, IPListSelector):
        return {"ip_list": sel.ip_list}
    out: Doc = {}
    if sel.require:
        out["labels"] = _labels(sel.require)
    if sel.groups:
        out["label_groups"] = sorted(sel.groups)
    if sel.exclude:
        out["exclude"] = _excluded(sel.exclude)
    return out


def _selectors(sels: tuple[Selector, ...]) -> str | list[str | Doc]:
    if sels == (AllWorkloads(),):
        return "all"
    return [_selector(s) for s in sels]


def _scope(scopes: tuple[LabelSelector, ...]) -> str | list[str | Doc]:
    return [_selector(s) for s in scopes] if scopes else "all"


def _rule(rule: AllowRule) -> Doc:
    out: Doc = {
        "consumers": _selectors(rule.consumers),
        "providers": _selectors(rule.providers),
        "services": list(rule.services),
    }
    if rule.consumers_scope is not ConsumerScope.INTRA:
        out["consumers_scope"] = rule.consumers_scope.value
    if rule.encrypt:
        out["encrypt"] = True
    return _describe(out, rule.description)


def _settings(failsafe: Failsafe) -> Doc:
    doc = _doc(Kind.SETTINGS)
    doc["controller"] = [str(n) for n in failsafe.controller]
    doc["controller_port"] = failsafe.controller_port
    doc["management"] = [format_service_entry(e) for e in failsafe.management]
    return doc


def policy_documents(policy: Policy) -> list[Doc]:
    """The documents of ``policy`` as plain data, in output order."""
    docs: list[Doc] = []
    if policy.failsafe != Failsafe():
        docs.append(_settings(policy.failsafe))
    for key in sorted(policy.label_keys, key=lambda k: k.name):
        if key.name in DEFAULT_LABEL_KEYS and not key.allowed:
            continue
        doc = _doc(Kind.LABEL_KEY, key.name)
        if key.allowed:
            doc["values"] = sorted(key.allowed)
        docs.append(doc)
    for group in sorted(policy.label_groups, key=lambda g: g.name):
        doc = _doc(Kind.LABEL_GROUP, group.name)
        doc["key"] = group.key
        doc["values"] = sorted(group.values)
        docs.append(doc)
    for service in sorted(policy.services, key=lambda s: s.name):
        if service == BUILTIN_ANY:
            continue
        doc = _doc(Kind.SERVICE, service.name)
        doc["ports"] = [format_service_entry(e) for e in service.entries]
        docs.append(_describe(doc, service.description))
    for ip_list in sorted(policy.ip_lists, key=lambda i: i.name):
        doc = _doc(Kind.IP_LIST, ip_list.name)
        doc["include"] = [str(n) for n in ip_list.include]
        if ip_list.exclude:
            doc["exclude"] = [str(n) for n in ip_list.exclude]
        docs.append(_describe(doc, ip_list.description))
    for workload in sorted(policy.workloads, key=lambda w: w.name):
        doc = _describe(_doc(Kind.WORKLOAD, workload.name), workload.description)
        doc["labels"] = _labels(workload.labels)
        doc["interfaces"] = [
            {"name": i.name, "addresses": [str(a) for a in i.addresses]} for i in workload.interfaces
        ]
        doc["mode"] = workload.mode.value
        if workload.backend is not None:
            doc["backend"] = workload.backend
        docs.append(doc)
    for ruleset in sorted(policy.rulesets, key=lambda r: r.name):
        doc = _describe(_doc(Kind.RULESET, ruleset.name), ruleset.description)
        doc["scope"] = _scope(ruleset.scopes)
        if ruleset.encrypt:
            doc["encrypt"] = True
        doc["rules"] = [_rule(r) for r in ruleset.rules]
        docs.append(doc)
    for deny in sorted(policy.deny_rules, key=lambda d: d.name):
        doc = _describe(_doc(Kind.DENY_RULE, deny.name), deny.description)
        doc["consumers"] = _selectors(deny.consumers)
        doc["providers"] = _selectors(deny.providers)
        doc["services"] = list(deny.services)
        doc["override"] = deny.override
        docs.append(doc)
    return docs


def dump_policy(policy: Policy) -> str:
    """``policy`` as multi-document YAML that ``load_documents`` reads back to an equal Policy."""
    return yaml.safe_dump_all(
        policy_documents(policy),
        explicit_start=True,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=None,
        width=100,
    )
