"""REST bodies <-> domain objects, through the one document codec.

A REST body is the policy document of its kind without ``apiVersion``/``kind`` (the
failsafe object also carries ``name: default``, its URL). ``decode`` maps the raw JSON
value into the codec's node tree and reads it with :func:`stockade.codec.documents.parse_body`,
the very code that reads YAML files, so both accept the same bodies and report the same
field paths (the API's issues have source ``api`` and no line). ``encode`` writes the
canonical stored body of an object (sorted, explicit defaults), which ``decode`` reads back
to an equal object; stored bodies are what ETags and diffs are computed over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from stockade.codec import netpol_body, pairing_body
from stockade.codec.collected import BUILTIN_ANY, Collected, Kind
from stockade.codec.documents import parse_body
from stockade.codec.syntax import format_service_entry
from stockade.codec.tree import NotADocument, Reader, node_of
from stockade.errors import Issue, ValidationError
from stockade.model.addresses import IPList
from stockade.model.labels import LabelGroup, LabelKey
from stockade.model.policy import Failsafe
from stockade.model.rules import DenyRule, Ruleset
from stockade.model.selectors import AllWorkloads, IPListSelector, Selector
from stockade.model.services import Service
from stockade.model.workloads import Workload

SOURCE = "api"
__all__ = ["BUILTIN_ANY", "decode", "encode"]
FAILSAFE_NAME = "default"

# stored kind name -> document kind
DOCUMENT_KIND: dict[str, Kind] = {
    "label_key": Kind.LABEL_KEY,
    "workload": Kind.WORKLOAD,
    "label_group": Kind.LABEL_GROUP,
    "ip_list": Kind.IP_LIST,
    "service": Kind.SERVICE,
    "ruleset": Kind.RULESET,
    "deny_rule": Kind.DENY_RULE,
    "failsafe": Kind.SETTINGS,
}

_RESULT: dict[Kind, Callable[[Collected], list[Any]]] = {
    Kind.LABEL_KEY: lambda acc: list(acc.label_keys),
    Kind.WORKLOAD: lambda acc: list(acc.workloads),
    Kind.LABEL_GROUP: lambda acc: list(acc.label_groups),
    Kind.IP_LIST: lambda acc: list(acc.ip_lists),
    Kind.SERVICE: lambda acc: list(acc.services),
    Kind.RULESET: lambda acc: list(acc.rulesets),
    Kind.DENY_RULE: lambda acc: list(acc.deny_rules),
    Kind.SETTINGS: lambda acc: list(acc.settings),
}


def decode(kind: str, data: Any, source: str = SOURCE) -> Any:
    """The domain object of a REST body of stored kind ``kind``; ValidationError lists every issue."""
    if kind == "network_policy":  # no policy document: the cluster sync writes it (netpol_body)
        return netpol_body.decode(data, source)
    if kind == "pairing_profile":  # no policy document either: written through the REST API only
        return pairing_body.decode(data, source)
    doc_kind = DOCUMENT_KIND[kind]
    issues: list[Issue] = []
    if doc_kind is Kind.SETTINGS and isinstance(data, Mapping) and "name" in data:
        data = dict(data)
        name = data.pop("name")
        if name != FAILSAFE_NAME:
            issues.append(Issue(source, 0, "name", f"the failsafe object is always named {FAILSAFE_NAME!r}"))
    try:
        node = node_of(data)
    except NotADocument as exc:
        raise ValidationError([Issue(source, 0, "", str(exc))]) from None
    acc = Collected(issues=issues)
    parse_body(Reader(source, acc.issues), node, doc_kind, acc)
    if acc.issues:
        raise ValidationError(acc.issues)
    (obj,) = _RESULT[doc_kind](acc)
    return obj


# ---- encoding: the canonical stored bodies ---------------------------------------------


def selector_body(sel: Selector) -> dict[str, Any]:
    if isinstance(sel, IPListSelector):
        return {"ip_list": sel.ip_list}
    if isinstance(sel, AllWorkloads):
        return {"all": True}
    out: dict[str, Any] = {}
    if sel.require:
        out["labels"] = {lab.key: lab.value for lab in sel.require}
    if sel.groups:
        out["label_groups"] = list(sel.groups)
    if sel.exclude:
        by_key: dict[str, list[str]] = {}
        for lab in sel.exclude:
            by_key.setdefault(lab.key, []).append(lab.value)
        out["exclude"] = {k: v[0] if len(v) == 1 else v for k, v in sorted(by_key.items())}
    return out


def label_key_body(k: LabelKey) -> dict[str, Any]:
    return {"name": k.name, "values": sorted(k.allowed)}


def label_group_body(g: LabelGroup) -> dict[str, Any]:
    return {"name": g.name, "key": g.key, "values": sorted(g.values)}


def workload_body(w: Workload) -> dict[str, Any]:
    return {
        "name": w.name,
        "labels": {lab.key: lab.value for lab in sorted(w.labels)},
        "interfaces": [{"name": i.name, "addresses": [str(a) for a in i.addresses]} for i in w.interfaces],
        "mode": w.mode.value,
        "backend": w.backend,
        "description": w.description,
    }


def ip_list_body(x: IPList) -> dict[str, Any]:
    return {
        "name": x.name,
        "include": [str(n) for n in x.include],
        "exclude": [str(n) for n in x.exclude],
        "description": x.description,
    }


def service_body(x: Service) -> dict[str, Any]:
    return {"name": x.name, "ports": [format_service_entry(e) for e in x.entries], "description": x.description}


def ruleset_body(x: Ruleset) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for r in x.rules:
        rule: dict[str, Any] = {
            "consumers": [selector_body(c) for c in r.consumers],
            "providers": [selector_body(p) for p in r.providers],
            "services": list(r.services),
            "consumers_scope": r.consumers_scope.value,
            "description": r.description,
        }
        if r.encrypt:  # written only when set: bodies stored before encryption existed stay canonical
            rule["encrypt"] = True
        rules.append(rule)
    body: dict[str, Any] = {
        "name": x.name,
        "scope": [selector_body(sc) for sc in x.scopes] if x.scopes else "all",
        "rules": rules,
        "description": x.description,
    }
    if x.encrypt:
        body["encrypt"] = True
    return body


def deny_rule_body(x: DenyRule) -> dict[str, Any]:
    return {
        "name": x.name,
        "consumers": [selector_body(c) for c in x.consumers],
        "providers": [selector_body(p) for p in x.providers],
        "services": list(x.services),
        "override": x.override,
        "description": x.description,
    }


def failsafe_body(x: Failsafe) -> dict[str, Any]:
    return {
        "name": FAILSAFE_NAME,
        "controller": [str(n) for n in x.controller],
        "controller_port": x.controller_port,
        "management": [format_service_entry(e) for e in x.management],
    }


ENCODERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "label_key": label_key_body,
    "workload": workload_body,
    "label_group": label_group_body,
    "ip_list": ip_list_body,
    "service": service_body,
    "ruleset": ruleset_body,
    "deny_rule": deny_rule_body,
    "failsafe": failsafe_body,
    "network_policy": netpol_body.encode,
    "pairing_profile": pairing_body.encode,
}


def encode(kind: str, obj: Any) -> dict[str, Any]:
    """The canonical stored body of ``obj`` (an object of stored kind ``kind``)."""
    return ENCODERS[kind](obj)
