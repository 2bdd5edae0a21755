"""Between API bodies and the frozen domain model, and the registry of stored kinds.

Each :class:`Kind` names a stored object kind, its URL path, its Pydantic body, whether it is
part of the provisioned policy (``POLICY``: edited in the draft, frozen in versions) or of the
live inventory (``INVENTORY``: label keys and workloads take effect at once, as in Illumio),
and the two conversions. ``to_domain`` performs every semantic check and raises
:class:`~stockade.errors.ValidationError` with one :class:`~stockade.errors.Issue` per bad field.
``canonical`` round-trips a body so stored bodies are normalised (sorted labels, compressed
IPv6 text, explicit defaults), which makes diffs and ETags stable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from stockade.controller.api import schemas as s
from stockade.errors import Issue, ValidationError
from stockade.model.addresses import IPAddress, IPList, IPNetwork
from stockade.model.labels import DEFAULT_LABEL_KEYS, Label, LabelGroup, LabelKey
from stockade.model.policy import Failsafe, Policy
from stockade.model.rules import AllowRule, DenyRule, Ruleset
from stockade.model.selectors import ALL_WORKLOADS, AllWorkloads, IPListSelector, LabelSelector, Selector
from stockade.model.services import Service, ServiceEntry
from stockade.model.workloads import Interface, Workload
from stockade.policyfile.loader import BUILTIN_ANY
from stockade.policyfile.syntax import BadValue, format_service_entry, parse_service_entry

SOURCE = "api"


class Scope(Enum):
    POLICY = "policy"  # draft + provisioned versions
    INVENTORY = "inventory"  # live


class _Issues:
    """Collects issues with a field-path prefix."""

    def __init__(self) -> None:
        self.items: list[Issue] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(Issue(SOURCE, 0, field, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise ValidationError(self.items)


def _address(text: str, field: str, issues: _Issues) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        issues.add(field, f"not an IP address: {text!r}")
        return None


def _network(text: str, field: str, issues: _Issues) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        issues.add(field, f"not an IP network: {text!r}")
        return None


def _entry(text: str, field: str, issues: _Issues) -> ServiceEntry | None:
    try:
        return parse_service_entry(text)
    except BadValue as exc:
        issues.add(field, str(exc))
        return None


def _selector(b: s.SelectorBody, field: str, issues: _Issues, labels_only: bool = False) -> Selector | None:
    forms = sum((bool(b.labels or b.label_groups or b.exclude), b.ip_list is not None, b.all))
    if forms != 1:
        issues.add(field, "a selector is exactly one of: labels/label_groups/exclude, ip_list, all")
        return None
    if b.ip_list is not None or b.all:
        if labels_only:
            issues.add(field, "a ruleset scope takes labels and label groups only")
            return None
        return IPListSelector(b.ip_list) if b.ip_list is not None else ALL_WORKLOADS
    if not b.labels and not b.label_groups:
        issues.add(field, "an exclusion needs at least one required label or label group")
        return None
    excluded: set[Label] = set()
    for key, value in b.exclude.items():
        for v in [value] if isinstance(value, str) else value:
            excluded.add(Label(key, v))
    sel = LabelSelector(
        tuple(sorted(Label(k, v) for k, v in b.labels.items())),
        tuple(sorted(set(b.label_groups))),
        tuple(sorted(excluded)),
    )
    if not sel.is_satisfiable():
        issues.add(field, "selector can match nothing (a label both required and excluded)")
        return None
    return sel


def _selector_body(sel: Selector) -> dict[str, Any]:
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


def _selectors(bodies: list[s.SelectorBody], field: str, issues: _Issues) -> tuple[Selector, ...]:
    out = [_selector(b, f"{field}[{i}]", issues) for i, b in enumerate(bodies)]
    return tuple(x for x in out if x is not None)


# ---- per kind -------------------------------------------------------------------


def label_key_from(b: s.LabelKeyBody, issues: _Issues) -> LabelKey:
    return LabelKey(b.name, frozenset(b.values))


def label_key_to(k: LabelKey) -> dict[str, Any]:
    return {"name": k.name, "values": sorted(k.allowed)}


def label_group_from(b: s.LabelGroupBody, issues: _Issues) -> LabelGroup:
    return LabelGroup(b.name, b.key, frozenset(b.values))


def label_group_to(g: LabelGroup) -> dict[str, Any]:
    return {"name": g.name, "key": g.key, "values": sorted(g.values)}


def workload_from(b: s.WorkloadBody, issues: _Issues) -> Workload:
    ifaces = []
    seen: set[str] = set()
    for i, itf in enumerate(b.interfaces):
        if itf.name in seen:
            issues.add(f"interfaces[{i}].name", f"duplicate interface {itf.name!r}")
        seen.add(itf.name)
        addrs = [_address(a, f"interfaces[{i}].addresses[{j}]", issues) for j, a in enumerate(itf.addresses)]
        ifaces.append(Interface(itf.name, tuple(sorted({a for a in addrs if a is not None}, key=_addr_key))))
    labels = frozenset(Label(k, v) for k, v in b.labels.items())
    return Workload(b.name, labels, tuple(sorted(ifaces)), b.mode, b.backend, b.description)


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return a.version, int(a)


def workload_to(w: Workload) -> dict[str, Any]:
    return {
        "name": w.name,
        "labels": {lab.key: lab.value for lab in sorted(w.labels)},
        "interfaces": [{"name": i.name, "addresses": [str(a) for a in i.addresses]} for i in w.interfaces],
        "mode": w.mode.value,
        "backend": w.backend,
        "description": w.description,
    }


def ip_list_from(b: s.IPListBody, issues: _Issues) -> IPList:
    inc = [_network(t, f"include[{i}]", issues) for i, t in enumerate(b.include)]
    exc = [_network(t, f"exclude[{i}]", issues) for i, t in enumerate(b.exclude)]
    return IPList(
        b.name,
        tuple(sorted({n for n in inc if n is not None}, key=_net_key)),
        tuple(sorted({n for n in exc if n is not None}, key=_net_key)),
        b.description,
    )


def _net_key(n: IPNetwork) -> tuple[int, int, int]:
    return n.version, int(n.network_address), n.prefixlen


def ip_list_to(x: IPList) -> dict[str, Any]:
    return {
        "name": x.name,
        "include": [str(n) for n in x.include],
        "exclude": [str(n) for n in x.exclude],
        "description": x.description,
    }


def service_from(b: s.ServiceBody, issues: _Issues) -> Service:
    entries = [_entry(e, f"ports[{i}]", issues) for i, e in enumerate(b.ports)]
    return Service(b.name, tuple(sorted({e for e in entries if e is not None})), b.description)


def service_to(x: Service) -> dict[str, Any]:
    return {"name": x.name, "ports": [format_service_entry(e) for e in x.entries], "description": x.description}


ALL_SCOPE_HINT = 'write "all" to govern every workload, or add a label selector'


def ruleset_from(b: s.RulesetBody, issues: _Issues) -> Ruleset:
    # An empty field never means "every workload" (issue 14): only the explicit "all" does.
    if b.scope is None:
        issues.add("scope", f"a scope is required: {ALL_SCOPE_HINT}")
    elif not b.scope:
        issues.add("scope", f"an empty scope would govern every workload: {ALL_SCOPE_HINT}")
    scopes = []
    for i, sb in enumerate(b.scope if isinstance(b.scope, list) else ()):
        sel = _selector(sb, f"scope[{i}]", issues, labels_only=True)
        if isinstance(sel, LabelSelector):
            scopes.append(sel)
    rules = []
    for j, r in enumerate(b.rules):
        rules.append(
            AllowRule(
                _selectors(r.consumers, f"rules[{j}].consumers", issues),
                _selectors(r.providers, f"rules[{j}].providers", issues),
                tuple(r.services),
                r.consumers_scope,
                r.description,
            )
        )
    return Ruleset(b.name, tuple(scopes), tuple(rules), b.description)


def ruleset_to(x: Ruleset) -> dict[str, Any]:
    return {
        "name": x.name,
        "scope": [_selector_body(sc) for sc in x.scopes] if x.scopes else "all",
        "rules": [
            {
                "consumers": [_selector_body(c) for c in r.consumers],
                "providers": [_selector_body(p) for p in r.providers],
                "services": list(r.services),
                "consumers_scope": r.consumers_scope.value,
                "description": r.description,
            }
            for r in x.rules
        ],
        "description": x.description,
    }


def deny_rule_from(b: s.DenyRuleBody, issues: _Issues) -> DenyRule:
    return DenyRule(
        b.name,
        _selectors(b.consumers, "consumers", issues),
        _selectors(b.providers, "providers", issues),
        tuple(b.services),
        b.override,
        b.description,
    )


def deny_rule_to(x: DenyRule) -> dict[str, Any]:
    return {
        "name": x.name,
        "consumers": [_selector_body(c) for c in x.consumers],
        "providers": [_selector_body(p) for p in x.providers],
        "services": list(x.services),
        "override": x.override,
        "description": x.description,
    }


def failsafe_from(b: s.FailsafeBody, issues: _Issues) -> Failsafe:
    if b.name != "default":
        issues.add("name", "the failsafe object is always named 'default'")
    nets = [_network(t, f"controller[{i}]", issues) for i, t in enumerate(b.controller)]
    mgmt = [_entry(e, f"management[{i}]", issues) for i, e in enumerate(b.management)]
    return Failsafe(
        tuple(sorted({n for n in nets if n is not None}, key=_net_key)),
        b.controller_port,
        tuple(sorted({e for e in mgmt if e is not None})),
    )


def failsafe_to(x: Failsafe) -> dict[str, Any]:
    return {
        "name": "default",
        "controller": [str(n) for n in x.controller],
        "controller_port": x.controller_port,
        "management": [format_service_entry(e) for e in x.management],
    }


# ---- registry -------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One stored object kind and how its bodies map to the domain model."""

    name: str  # stored kind, e.g. "ruleset"
    path: str  # URL collection, e.g. "rulesets"
    title: str  # for OpenAPI tags
    scope: Scope
    body: type[BaseModel]
    from_body: Callable[[Any, _Issues], Any]
    to_body: Callable[[Any], dict[str, Any]]

    def parse(self, data: Mapping[str, Any]) -> BaseModel:
        """Validate a raw JSON body into the Pydantic model (field-level issues)."""
        try:
            return self.body.model_validate(data)
        except PydanticValidationError as exc:
            raise ValidationError([_pydantic_issue(e) for e in exc.errors()]) from None

    def to_domain(self, body: BaseModel) -> Any:
        issues = _Issues()
        obj = self.from_body(body, issues)
        issues.raise_if_any()
        return obj

    def canonical(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return self.to_body(self.to_domain(self.parse(data)))


def _pydantic_issue(err: Any) -> Issue:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return Issue(SOURCE, 0, loc, str(err.get("msg", "invalid")))


KINDS: tuple[Kind, ...] = (
    Kind("label_key", "label-keys", "Label keys", Scope.INVENTORY, s.LabelKeyBody, label_key_from, label_key_to),
    Kind("workload", "workloads", "Workloads", Scope.INVENTORY, s.WorkloadBody, workload_from, workload_to),
    Kind("label_group", "label-groups", "Label groups", Scope.POLICY, s.LabelGroupBody, label_group_from,
         label_group_to),
    Kind("ip_list", "ip-lists", "IP lists", Scope.POLICY, s.IPListBody, ip_list_from, ip_list_to),
    Kind("service", "services", "Services", Scope.POLICY, s.ServiceBody, service_from, service_to),
    Kind("ruleset", "rulesets", "Rulesets", Scope.POLICY, s.RulesetBody, ruleset_from, ruleset_to),
    Kind("deny_rule", "deny-rules", "Deny rules", Scope.POLICY, s.DenyRuleBody, deny_rule_from, deny_rule_to),
    Kind("failsafe", "failsafe", "Failsafe", Scope.POLICY, s.FailsafeBody, failsafe_from, failsafe_to),
)
KIND_BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}
POLICY_KINDS = tuple(k.name for k in KINDS if k.scope is Scope.POLICY)
INVENTORY_KINDS = tuple(k.name for k in KINDS if k.scope is Scope.INVENTORY)

Objects = dict[str, dict[str, dict[str, Any]]]  # kind -> name -> canonical body


def domain_objects(kind: str, bodies: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    k = KIND_BY_NAME[kind]
    return [k.to_domain(k.parse(_stored(kind, bodies[n]))) for n in sorted(bodies)]


def _stored(kind: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stored body as the codec reads it today: rulesets stored before the explicit "all"
    form kept an unscoped ruleset as ``scope: []``, which meant every workload."""
    if kind == "ruleset" and body.get("scope") == []:
        return {**body, "scope": "all"}
    return body


def build_policy(objects: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Policy:
    """A :class:`Policy` from stored bodies (policy and inventory kinds together)."""

    def get(kind: str) -> list[Any]:
        return domain_objects(kind, objects.get(kind, {}))

    keys = get("label_key") if "label_key" in objects else [LabelKey(k) for k in DEFAULT_LABEL_KEYS]
    failsafe = get("failsafe")
    return Policy(
        label_keys=tuple(keys),
        label_groups=tuple(get("label_group")),
        workloads=tuple(get("workload")),
        ip_lists=tuple(get("ip_list")),
        services=_with_builtin_any(get("service")),
        rulesets=tuple(get("ruleset")),
        deny_rules=tuple(get("deny_rule")),
        failsafe=failsafe[0] if failsafe else Failsafe(),
    )


def _with_builtin_any(services: list[Service]) -> tuple[Service, ...]:
    """The service ``any`` is built in, as in the policy files."""
    if any(x.name == BUILTIN_ANY.name for x in services):
        return tuple(services)
    return tuple(sorted((*services, BUILTIN_ANY), key=lambda x: x.name))


def objects_of_policy(policy: Policy) -> Objects:
    """Stored bodies of every object of ``policy`` (the inverse of :func:`build_policy`)."""
    out: Objects = {
        "label_key": {k.name: label_key_to(k) for k in policy.label_keys},
        "workload": {w.name: workload_to(w) for w in policy.workloads},
        "label_group": {g.name: label_group_to(g) for g in policy.label_groups},
        "ip_list": {x.name: ip_list_to(x) for x in policy.ip_lists},
        "service": {x.name: service_to(x) for x in policy.services if x != BUILTIN_ANY},
        "ruleset": {x.name: ruleset_to(x) for x in policy.rulesets},
        "deny_rule": {x.name: deny_rule_to(x) for x in policy.deny_rules},
    }
    if policy.failsafe != Failsafe():
        out["failsafe"] = {"default": failsafe_to(policy.failsafe)}
    return out
