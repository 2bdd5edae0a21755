"""The one codec from policy documents to the domain model, for YAML files and REST bodies.

``parse_document`` reads one YAML document (``apiVersion``, ``kind`` and the body);
``parse_body`` reads the body of a known kind (a REST request, mapped into the same node
tree by ``stockade.codec.tree.node_of``). Both append the model object to a ``Collected``
accumulator, together with every name it declares, every name it references and every
label it uses, each with its ``Where`` (line 0 for JSON). Every rule about one document
lives here, once: both entry points accept exactly the same bodies with the same field
paths in their issues. Problems that need the whole policy (unknown references, duplicates,
shared addresses) are found afterwards: by ``stockade.policyfile.crossref`` for files (with
positions), by ``Policy.validate`` over the draft for the REST API.

Rules decided here (see ``stockade.policyfile`` for the document syntax):

* A selector is ``all``, ``{all: true}``, ``{ip_list: NAME}``, or a label selector with at
  least one of ``labels``, ``label_groups``, ``exclude``. An empty selector is an error,
  never "everything". An exclude-only selector (``{exclude: {role: bastion}}``: every
  workload except bastions) is accepted: it is explicit and never wider than ``all``.
* A ruleset must state its scope: ``all`` or a non-empty list of label selectors. A missing
  or empty scope is an error (issue 14), so forgetting it never widens a ruleset to every
  workload. (Rulesets stored by the API before this rule kept ``all`` as ``[]``; the
  controller reads those as ``all``.)
* Interface names are names (``is_valid_name``): ``eth0@if12`` is ``ip link``'s display of
  a veth peer, not a name, and is refused. Workload addresses are host addresses
  (``stockade.codec.syntax.parse_workload_address``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stockade.codec.collected import (
    API_VERSION,
    MAX_TEXT,
    AddressClaim,
    Collected,
    Declaration,
    Entries,
    Kind,
    LabelUse,
    Reference,
)
from stockade.codec.syntax import PORT_FORMS, BadValue, parse_network, parse_service_entry, parse_workload_address
from stockade.codec.tree import INT_TAG, Entry, Reader, Where, describe, index, is_null, is_text, quote, sub
from stockade.model.addresses import IPAddress, IPList, IPNetwork, address_key, network_key
from stockade.model.labels import Label, LabelGroup, LabelKey, is_valid_name
from stockade.model.policy import Failsafe
from stockade.model.rules import AllowRule, ConsumerScope, DenyRule, Ruleset
from stockade.model.selectors import ALL_WORKLOADS, IPListSelector, LabelSelector, Selector
from stockade.model.services import Service, ServiceEntry
from stockade.model.workloads import BACKEND_NAMES, EnforcementMode, Interface, Workload


def _value(e: Entries, key: str) -> Node | None:
    entry = e.get(key)
    return entry.value if entry is not None else None


def _declare(r: Reader, e: Entries, acc: Collected, kind: Kind) -> str:
    node = _value(e, "name")
    if node is None:
        return ""  # reported as a missing key
    name = r.name(node, "name")
    if name is None:
        return ""
    acc.declarations.append(Declaration(kind, name, r.where(node, "name")))
    return name


def _description(r: Reader, e: Entries, field_path: str = "") -> str:
    node = _value(e, "description")
    if node is None or is_null(node):
        return ""
    return r.string(node, sub(field_path, "description"), limit=MAX_TEXT) or ""


# ---- labels and selectors ---------------------------------------------------

def _label_key_name(r: Reader, entry: Entry, path: str) -> str | None:
    key = str(entry.key.value)
    if not is_valid_name(key):
        r.error(entry.key, path, f"invalid label key {quote(key)}")
        return None
    return key


def _label_map(r: Reader, node: Node, path: str, acc: Collected) -> tuple[Label, ...]:
    """``{key: value}``: at most one value per key (a repeated key is an error)."""
    entries = r.entries(node, path, what="a mapping of label key to value")
    out: list[Label] = []
    for key_text, entry in (entries or {}).items():
        here = sub(path, key_text)
        key = _label_key_name(r, entry, here)
        value = r.name(entry.value, here, "label value")
        if key is None or value is None:
            continue
        acc.label_uses.append(LabelUse(key, value, r.where(entry.key, here), r.where(entry.value, here)))
        out.append(Label(key, value))
    return tuple(sorted(out))


def _exclude_map(r: Reader, node: Node, path: str, acc: Collected) -> tuple[Label, ...]:
    """``{key: value}`` or ``{key: [value, ...]}``: labels a selector must not carry."""
    entries = r.entries(node, path, what="a mapping of label key to value(s)")
    out: set[Label] = set()
    for key_text, entry in (entries or {}).items():
        here = sub(path, key_text)
        key = _label_key_name(r, entry, here)
        value_nodes: list[tuple[Node, str]]
        if isinstance(entry.value, ScalarNode):
            value_nodes = [(entry.value, here)]
        else:
            items = r.sequence(entry.value, here, what="a label value or a list of them")
            value_nodes = [(n, index(here, i)) for i, n in enumerate(items)]
        for value_node, value_path in value_nodes:
            value = r.name(value_node, value_path, "label value")
            if key is None or value is None:
                continue
            where_value = r.where(value_node, value_path)
            acc.label_uses.append(LabelUse(key, value, r.where(entry.key, here), where_value))
            out.add(Label(key, value))
    return tuple(sorted(out))


def _names(r: Reader, node: Node, path: str, what: str, *, allow_empty: bool = False) -> list[tuple[str, Where]]:
    """A list of names, each with its position."""
    out: list[tuple[str, Where]] = []
    for i, item in enumerate(r.sequence(node, path, what=f"a list of {what}s", allow_empty=allow_empty)):
        here = index(path, i)
        name = r.name(item, here, what)
        if name is not None:
            out.append((name, r.where(item, here)))
    return out


_SELECTOR_KEYS = ("all", "exclude", "ip_list", "label_groups", "labels")
_SELECTOR_HINT = 'a selector such as {labels: {app: shop}}, {ip_list: office} or "all"'
_SCOPE_ALL = 'write "scope: all" instead of listing "all" in a scope'
ALL_SCOPE_HINT = 'write "all" to govern every workload, or add a label selector'


def _selector(r: Reader, node: Node, path: str, acc: Collected, *, in_scope: bool) -> Selector | None:
    if is_text(node, "all"):
        if in_scope:
            r.error(node, path, _SCOPE_ALL)
            return None
        return ALL_WORKLOADS
    if not isinstance(node, MappingNode):
        r.error(node, path, f"expected {_SELECTOR_HINT}, got {describe(node)}")
        return None
    before = len(r.issues)
    e = r.mapping(node, path, optional=_SELECTOR_KEYS) or {}
    if "all" in e:
        here = sub(path, "all")
        every = r.boolean(e["all"].value, here)
        if every is None:
            return None
        if every:
            others = sorted(k for k in e if k != "all" and k in _SELECTOR_KEYS)
            if others:
                r.error(e["all"].key, here, f"all cannot be combined with {', '.join(others)}")
                return None
            if in_scope:
                r.error(e["all"].key, here, _SCOPE_ALL)
                return None
            return ALL_WORKLOADS
        e = {k: v for k, v in e.items() if k != "all"}  # all: false says nothing
    if "ip_list" in e:
        ip_entry = e["ip_list"]
        here = sub(path, "ip_list")
        if in_scope:
            r.error(ip_entry.key, here, "a scope selects workloads by label: ip_list is not allowed here")
            return None
        others = sorted(k for k in e if k != "ip_list" and k in _SELECTOR_KEYS)
        if others:
            r.error(ip_entry.key, here, f"ip_list cannot be combined with {', '.join(others)}")
        name = r.name(ip_entry.value, here, "IP list name")
        if name is None:
            return None
        acc.references.append(Reference(Kind.IP_LIST, name, r.where(ip_entry.value, here)))
        return IPListSelector(name)
    labels_node = _value(e, "labels")
    require = _label_map(r, labels_node, sub(path, "labels"), acc) if labels_node is not None else ()
    groups: set[str] = set()
    groups_node = _value(e, "label_groups")
    if groups_node is not None:
        for name, where in _names(r, groups_node, sub(path, "label_groups"), "label group name"):
            acc.references.append(Reference(Kind.LABEL_GROUP, name, where))
            groups.add(name)
    exclude_node = _value(e, "exclude")
    exclude = _exclude_map(r, exclude_node, sub(path, "exclude"), acc) if exclude_node is not None else ()
    selector = LabelSelector(require, tuple(sorted(groups)), exclude)
    if len(r.issues) > before:
        return None
    if not (require or groups or exclude):
        r.error(node, path, 'empty selector: it would match nothing (write "all" to mean every workload)')
        return None
    both = sorted(set(require) & set(exclude))
    if both:
        r.error(node, path, f"selector can never match: {both[0]} is both required and excluded")
        return None
    return selector


def _selectors(r: Reader, node: Node, path: str, acc: Collected) -> tuple[Selector, ...]:
    """A list of selectors (a rule side matches the union), or ``all``."""
    if is_text(node, "all"):
        return (ALL_WORKLOADS,)
    out: list[Selector] = []
    for i, item in enumerate(r.sequence(node, path, what='a list of selectors (or "all")')):
        sel = _selector(r, item, index(path, i), acc, in_scope=False)
        if sel is not None:
            out.append(sel)
    return tuple(out)


def _scope(r: Reader, node: Node, path: str, acc: Collected) -> tuple[LabelSelector, ...]:
    if is_text(node, "all"):
        return ()
    out: list[LabelSelector] = []
    what = 'a list of label selectors or "all"'
    items = r.sequence(node, path, what=what, allow_empty=True)
    if isinstance(node, SequenceNode) and not items:
        r.error(node, path, f"an empty scope would govern every workload: {ALL_SCOPE_HINT}")
    for i, item in enumerate(items):
        sel = _selector(r, item, index(path, i), acc, in_scope=True)
        if isinstance(sel, LabelSelector):
            out.append(sel)
    return tuple(out)


def _service_refs(r: Reader, node: Node, path: str, acc: Collected) -> tuple[str, ...]:
    out: list[str] = []
    for name, where in _names(r, node, path, "service name"):
        acc.references.append(Reference(Kind.SERVICE, name, where))
        out.append(name)
    return tuple(out)


_E = TypeVar("_E", bound=Enum)


def _enum_value(r: Reader, node: Node, path: str, enum: type[_E]) -> _E | None:
    text = r.string(node, path)
    if text is None:
        return None
    for member in enum:
        if member.value == text:
            return member
    expected = ", ".join(str(m.value) for m in enum)
    r.error(node, path, f"unknown value {quote(text)} (expected one of: {expected})")
    return None


def _entries_list(r: Reader, node: Node, path: str, *, allow_empty: bool) -> tuple[ServiceEntry, ...]:
    out: list[ServiceEntry] = []
    what = 'a list of ports such as ["443/tcp"]'
    for i, item in enumerate(r.sequence(node, path, what=what, allow_empty=allow_empty)):
        here = index(path, i)
        if isinstance(item, ScalarNode) and item.tag == INT_TAG:  # 443: the protocol is missing
            r.error(item, here, f"cannot read {quote(str(item.value))} as a service port; expected {PORT_FORMS}")
            continue
        text = r.string(item, here)
        if text is None:
            continue
        try:
            out.append(parse_service_entry(text))
        except BadValue as exc:
            r.error(item, here, str(exc))
    return tuple(sorted(set(out)))  # canonical: sorted, without duplicates


def _networks(r: Reader, node: Node, path: str, *, allow_empty: bool) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, item in enumerate(r.sequence(node, path, what="a list of CIDRs", allow_empty=allow_empty)):
        here = index(path, i)
        text = r.string(item, here)
        if text is None:
            continue
        try:
            out.append(parse_network(text))
        except BadValue as exc:
            r.error(item, here, str(exc))
    return tuple(sorted(set(out), key=network_key))  # canonical: sorted, without duplicates


# ---- one parser per kind ------------------------------------------------------

def _settings(r: Reader, e: Entries, acc: Collected) -> None:
    kind = e.get("kind")
    where = r.where(kind.value, "kind") if kind is not None else Where(r.source, 0, "")
    acc.declarations.append(Declaration(Kind.SETTINGS, "settings", where))
    default = Failsafe()
    controller_node = _value(e, "controller")
    controller = default.controller
    if controller_node is not None:
        controller = _networks(r, controller_node, "controller", allow_empty=True)
    port_node = _value(e, "controller_port")
    port = default.controller_port
    if port_node is not None:
        port = r.integer(port_node, "controller_port", low=1, high=65535) or port
    management_node = _value(e, "management")
    management = default.management
    if management_node is not None:
        management = _entries_list(r, management_node, "management", allow_empty=True)
    acc.settings.append(Failsafe(controller, port, management))


def _label_key(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.LABEL_KEY)
    values_node = _value(e, "values")
    if values_node is None:
        acc.label_keys.append(LabelKey(name))
        return
    before = len(r.issues)
    values = _names(r, values_node, "values", "label value", allow_empty=True)
    if len(r.issues) > before:
        acc.open_label_keys.add(name)
    acc.label_keys.append(LabelKey(name, frozenset(v for v, _ in values)))


def _label_group(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.LABEL_GROUP)
    key_entry = e.get("key")
    key = r.name(key_entry.value, "key", "label key") if key_entry else None
    values_node = _value(e, "values")
    values = _names(r, values_node, "values", "label value") if values_node is not None else []
    if key_entry is not None and key is not None:
        for value, where in values:
            acc.label_uses.append(LabelUse(key, value, r.where(key_entry.value, "key"), where))
    acc.label_groups.append(LabelGroup(name, key or "", frozenset(v for v, _ in values)))


def _service(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.SERVICE)
    ports_node = _value(e, "ports")
    entries = _entries_list(r, ports_node, "ports", allow_empty=False) if ports_node is not None else ()
    acc.services.append(Service(name, entries, _description(r, e)))


def _ip_list(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.IP_LIST)
    include_node = _value(e, "include")
    include = _networks(r, include_node, "include", allow_empty=False) if include_node is not None else ()
    exclude_node = _value(e, "exclude")
    exclude = _networks(r, exclude_node, "exclude", allow_empty=True) if exclude_node is not None else ()
    acc.ip_lists.append(IPList(name, include, exclude, _description(r, e)))


def _interface(r: Reader, node: Node, path: str, workload: str, acc: Collected) -> Interface | None:
    e = r.mapping(node, path, required=("name",), optional=("addresses",))
    if e is None:
        return None
    name_node = _value(e, "name")
    name = r.name(name_node, sub(path, "name"), "interface name") if name_node is not None else None
    addresses: list[IPAddress] = []
    addresses_node = _value(e, "addresses")
    if addresses_node is not None:
        here = sub(path, "addresses")
        what = "a list of IP addresses"
        for i, item in enumerate(r.sequence(addresses_node, here, what=what, allow_empty=True)):
            text = r.string(item, index(here, i))
            if text is None:
                continue
            try:
                address = parse_workload_address(text)
            except BadValue as exc:
                r.error(item, index(here, i), str(exc))
                continue
            addresses.append(address)
            acc.claims.append(AddressClaim(address, workload, r.where(item, index(here, i))))
    return Interface(name or "", tuple(sorted(set(addresses), key=address_key)))


def _workload(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.WORKLOAD)
    labels_node = _value(e, "labels")
    labels = _label_map(r, labels_node, "labels", acc) if labels_node is not None else ()
    interfaces: list[Interface] = []
    interfaces_node = _value(e, "interfaces")
    if interfaces_node is not None:
        seen: dict[str, int] = {}
        for i, item in enumerate(r.sequence(interfaces_node, "interfaces", allow_empty=True)):
            iface = _interface(r, item, index("interfaces", i), name, acc)
            if iface is None:
                continue
            if iface.name and iface.name in seen:
                r.error(item, index("interfaces", i), f"interface {quote(iface.name)} listed twice")
            seen[iface.name] = i
            interfaces.append(iface)
    mode_node = _value(e, "mode")
    mode = _enum_value(r, mode_node, "mode", EnforcementMode) if mode_node is not None else None
    backend_node = _value(e, "backend")
    backend = _backend(r, backend_node) if backend_node is not None and not is_null(backend_node) else None
    acc.workloads.append(
        Workload(
            name,
            frozenset(labels),
            tuple(sorted(interfaces, key=lambda i: i.name)),
            mode or EnforcementMode.VISIBILITY,
            backend,
            _description(r, e),
        )
    )


def _backend(r: Reader, node: Node) -> str | None:
    """A workload's backend: one the registry knows (null: the agent's own choice). An unknown
    name is an error, never ignored: the agent would otherwise enforce with something else."""
    name = r.string(node, "backend")
    if name is None:
        return None
    if name not in BACKEND_NAMES:
        r.error(node, "backend", f"unknown backend {quote(name)}: one of {', '.join(BACKEND_NAMES)}, "
                "or null for the agent's own choice")
        return None
    return name


def _rule(r: Reader, node: Node, path: str, acc: Collected) -> AllowRule | None:
    e = r.mapping(
        node,
        path,
        required=("consumers", "providers", "services"),
        optional=("consumers_scope", "description", "encrypt"),
        what="a rule (a mapping with consumers, providers and services)",
    )
    if e is None:
        return None
    consumers_node, providers_node = _value(e, "consumers"), _value(e, "providers")
    services_node = _value(e, "services")
    scope_node = _value(e, "consumers_scope")
    consumers_scope = (
        _enum_value(r, scope_node, sub(path, "consumers_scope"), ConsumerScope) if scope_node is not None else None
    )
    return AllowRule(
        _selectors(r, consumers_node, sub(path, "consumers"), acc) if consumers_node is not None else (),
        _selectors(r, providers_node, sub(path, "providers"), acc) if providers_node is not None else (),
        _service_refs(r, services_node, sub(path, "services"), acc) if services_node is not None else (),
        consumers_scope or ConsumerScope.INTRA,
        _description(r, e, path),
        _flag(r, e, "encrypt", sub(path, "encrypt")),
    )


def _flag(r: Reader, e: Entries, key: str, field_path: str) -> bool:
    node = _value(e, key)
    return bool(r.boolean(node, field_path)) if node is not None else False


def _ruleset(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.RULESET)
    scope_node = _value(e, "scope")
    scopes = _scope(r, scope_node, "scope", acc) if scope_node is not None else ()
    rules: list[AllowRule] = []
    rules_node = _value(e, "rules")
    if rules_node is not None:
        for i, item in enumerate(r.sequence(rules_node, "rules", what="a list of rules", allow_empty=True)):
            rule = _rule(r, item, index("rules", i), acc)
            if rule is not None:
                rules.append(rule)
    acc.rulesets.append(
        Ruleset(name, scopes, tuple(rules), _description(r, e), _flag(r, e, "encrypt", "encrypt"))
    )


def _deny_rule(r: Reader, e: Entries, acc: Collected) -> None:
    name = _declare(r, e, acc, Kind.DENY_RULE)
    consumers_node, providers_node = _value(e, "consumers"), _value(e, "providers")
    services_node, override_node = _value(e, "services"), _value(e, "override")
    acc.deny_rules.append(
        DenyRule(
            name,
            _selectors(r, consumers_node, "consumers", acc) if consumers_node is not None else (),
            _selectors(r, providers_node, "providers", acc) if providers_node is not None else (),
            _service_refs(r, services_node, "services", acc) if services_node is not None else (),
            bool(r.boolean(override_node, "override")) if override_node is not None else False,
            _description(r, e),
        )
    )


@dataclass(frozen=True)
class _Spec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    parse: Callable[[Reader, Entries, Collected], None]
    hints: tuple[tuple[str, str], ...] = ()  # (required key, what to write when it is missing)


_SPECS: dict[Kind, _Spec] = {
    Kind.SETTINGS: _Spec((), ("controller", "controller_port", "management"), _settings),
    Kind.LABEL_KEY: _Spec(("name",), ("values",), _label_key),
    Kind.LABEL_GROUP: _Spec(("name", "key", "values"), (), _label_group),
    Kind.SERVICE: _Spec(("name", "ports"), ("description",), _service),
    Kind.IP_LIST: _Spec(("name", "include"), ("exclude", "description"), _ip_list),
    Kind.WORKLOAD: _Spec(("name",), ("labels", "interfaces", "mode", "backend", "description"), _workload),
    Kind.RULESET: _Spec(("name", "scope"), ("rules", "description", "encrypt"), _ruleset, (("scope", ALL_SCOPE_HINT),)),
    Kind.DENY_RULE: _Spec(("name", "consumers", "providers", "services"), ("override", "description"), _deny_rule),
}
_KIND_LIST = ", ".join(k.value for k in Kind)


def parse_document(r: Reader, node: Node, acc: Collected) -> None:
    """Read one document; an empty document (a stray ``---``) is ignored."""
    if is_null(node):
        return
    e = r.entries(node, "", what="a policy document (a mapping with apiVersion and kind)")
    if e is None:
        return
    api = e.get("apiVersion")
    if api is None:
        r.error(node, "apiVersion", f"missing required key (expected apiVersion: {API_VERSION})")
    else:
        version = r.string(api.value, "apiVersion")
        if version is not None and version != API_VERSION:
            r.error(api.value, "apiVersion", f"unsupported apiVersion {quote(version)} (expected {API_VERSION})")
    kind_entry = e.get("kind")
    if kind_entry is None:
        r.error(node, "kind", f"missing required key (one of: {_KIND_LIST})")
        return
    kind_text = r.string(kind_entry.value, "kind")
    if kind_text is None:
        return
    kind = next((k for k in Kind if k.value == kind_text), None)
    if kind is None:
        r.error(kind_entry.value, "kind", f"unknown kind {quote(kind_text)} (expected one of: {_KIND_LIST})")
        return
    spec = _SPECS[kind]
    r.check_keys(node, e, "", required=spec.required, optional=("apiVersion", "kind", *spec.optional),
                 hints=dict(spec.hints))
    spec.parse(r, e, acc)


def parse_body(r: Reader, node: Node, kind: Kind, acc: Collected) -> None:
    """Read the body of one object of ``kind`` (a REST request: the document without envelope)."""
    e = r.entries(node, "", what=f"a {kind.noun} (a mapping)")
    if e is None:
        return
    spec = _SPECS[kind]
    r.check_keys(node, e, "", required=spec.required, optional=spec.optional, hints=dict(spec.hints))
    spec.parse(r, e, acc)
