"""An Illumio PCE export (the public REST API's JSON objects) -> Stockade policy, one to one.

The file is one JSON object with any of the keys ``labels``, ``label_groups``, ``ip_lists``,
``services``, ``workloads``, ``rule_sets`` (with ``rules`` and, on newer PCEs, ``deny_rules``),
``enforcement_boundaries`` and ``deny_rules``, each a list of the objects ``GET
/orgs/:id/...`` returns (objects refer to each other by ``href``). Stockade's model is Illumio's:

* labels, label groups (sub-groups flattened), IP lists (ranges, exclusions), services, workloads
  (``visibility_only`` is ``visibility``) and rule sets carry over one to one;
* a rule's label actors: values of one key are alternatives, keys combine with AND (the PCE's
  rule semantics), expanded into one Stockade selector per combination; ``ams`` is ``all``; a
  workload actor gets that workload a ``host`` label; ``unscoped_consumers`` is ``consumers_scope:
  global``;
* an enforcement boundary is a deny rule (allows cross it); a deny rule is a deny rule, an
  override deny an override-deny; rule-set deny rules are confined to the rule set's scopes.

Not expressible (named in the report, the affected workloads left in visibility mode): FQDNs in IP
lists, Windows services, virtual services, SecureConnect / machine authentication, stateless rules,
ICMP codes. Disabled rule sets and rules are not imported (reported).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from stockade.importers.labels import safe_name
from stockade.importers.report import VISIBILITY_NOTE, Finding, ImportResult, Origin, Outcome
from stockade.importers.source import ImportOptions, Source
from stockade.importers.translate import HOST_KEY
from stockade.model.addresses import IPAddress, IPList, IPNetwork
from stockade.model.labels import DEFAULT_LABEL_KEYS, Label, LabelGroup, LabelKey
from stockade.model.policy import Policy
from stockade.model.rules import AllowRule, ConsumerScope, DenyRule, Ruleset
from stockade.model.selectors import ALL_WORKLOADS, IPListSelector, LabelSelector, Selector, confine
from stockade.model.services import ANY_SERVICE_ENTRY, Proto, Service, ServiceEntry
from stockade.model.workloads import EnforcementMode, Interface, Workload

MODES = {"idle": EnforcementMode.IDLE, "visibility_only": EnforcementMode.VISIBILITY,
         "selective": EnforcementMode.SELECTIVE, "full": EnforcementMode.FULL}
PROTOS = {6: Proto.TCP, 17: Proto.UDP, 1: Proto.ICMP, 58: Proto.ICMPV6, -1: Proto.ANY}


class Skip(Exception):
    """An object that cannot be expressed; the message says why."""


@dataclass
class _State:
    file: str
    findings: list[Finding] = field(default_factory=list)
    labels: dict[str, Label] = field(default_factory=dict)
    groups: dict[str, LabelGroup] = field(default_factory=dict)
    ip_lists: dict[str, IPList] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)
    tainted: list[tuple[Selector, ...]] = field(default_factory=list)  # providers of rules with a gap
    fqdn_lists: set[str] = field(default_factory=set)

    def note(self, outcome: Outcome, path: str, construct: str, text: str) -> None:
        self.findings.append(Finding(outcome, Origin(self.file, path=path), "", construct, text))


def _href(obj: Any) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("href"), str):
        raise ValueError("expected an object with an href")
    return str(obj["href"])


def _name(text: Any, what: str) -> str:
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty string")
    return safe_name(text, what)


def _labels(st: _State, items: list[Any]) -> None:
    for i, obj in enumerate(items):
        try:
            key, value = _name(obj.get("key"), "key"), _name(obj.get("value"), "value")
            st.labels[_href(obj)] = Label(key, value)
            if value != obj.get("value"):
                st.note(Outcome.APPROXIMATED, f"/labels/{i}", f"label {obj.get('key')}={obj.get('value')}",
                        f"renamed {key}={value} (Stockade names are 1-63 of A-Za-z0-9_.-)")
        except (ValueError, AttributeError) as exc:
            st.note(Outcome.BAD_INPUT, f"/labels/{i}", "label", str(exc))


def _label_groups(st: _State, items: list[Any]) -> None:
    raw = {}
    for i, obj in enumerate(items):
        try:
            raw[_href(obj)] = (i, obj)
        except ValueError as exc:
            st.note(Outcome.BAD_INPUT, f"/label_groups/{i}", "label group", str(exc))

    def values(href: str, seen: frozenset[str]) -> set[str]:
        _, obj = raw[href]
        out = {st.labels[_href(lab)].value for lab in obj.get("labels", []) if _href(lab) in st.labels}
        for sub in obj.get("sub_groups", []):
            if _href(sub) in raw and _href(sub) not in seen:
                out |= values(_href(sub), seen | {_href(sub)})
        return out

    for href, (i, obj) in raw.items():
        try:
            st.groups[href] = LabelGroup(_name(obj.get("name"), "lg"), _name(obj.get("key"), "key"),
                                         frozenset(values(href, frozenset({href}))))
        except (ValueError, AttributeError) as exc:
            st.note(Outcome.BAD_INPUT, f"/label_groups/{i}", "label group", str(exc))


def _nets(text: str, to: str | None) -> list[IPNetwork]:
    if to:
        lo, hi = ipaddress.ip_address(text), ipaddress.ip_address(to)
        return list(ipaddress.summarize_address_range(lo, hi))
    return [ipaddress.ip_network(text, strict=False)]


def _ip_lists(st: _State, items: list[Any]) -> None:
    for i, obj in enumerate(items):
        try:
            include: list[IPNetwork] = []
            exclude: list[IPNetwork] = []
            for r in obj.get("ip_ranges", []):
                (exclude if r.get("exclusion") else include).extend(_nets(r["from_ip"], r.get("to_ip")))
            name = _name(obj.get("name"), "ipl")
            if obj.get("fqdns"):
                st.note(Outcome.NOT_EXPRESSIBLE, f"/ip_lists/{i}/fqdns", f"IP list {name}",
                        "FQDNs are not supported yet: only the address ranges are imported")
                st.fqdn_lists.add(name)
            st.ip_lists[_href(obj)] = IPList(name, tuple(include), tuple(exclude), str(obj.get("description") or ""))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            st.note(Outcome.BAD_INPUT, f"/ip_lists/{i}", "IP list", str(exc))


def _entries(ports: list[Any], where: str, st: _State) -> tuple[ServiceEntry, ...]:
    out: list[ServiceEntry] = []
    for p in ports:
        proto = PROTOS.get(int(p.get("proto", -1)))
        if proto is None:
            raise Skip(f"protocol {p.get('proto')} (Stockade knows TCP, UDP, ICMP, ICMPv6)")
        if proto is Proto.ANY:
            out.append(ANY_SERVICE_ENTRY)
        elif proto.is_icmp:
            if p.get("icmp_code") is not None:
                raise Skip("ICMP codes")
            t = p.get("icmp_type")
            out.append(ServiceEntry(proto, int(t), int(t)) if t is not None else ServiceEntry(proto))
        elif p.get("port") is None:
            out.append(ServiceEntry(proto))
        else:
            out.append(ServiceEntry(proto, int(p["port"]), int(p.get("to_port") or p["port"])))
    return tuple(sorted(set(out)))


def _services(st: _State, items: list[Any]) -> None:
    for i, obj in enumerate(items):
        path = f"/services/{i}"
        try:
            name = _name(obj.get("name"), "svc")
            if name.lower() == "all-services" or obj.get("name") == "All Services":
                st.services[_href(obj)] = Service("any", (ANY_SERVICE_ENTRY,))
                continue
            if obj.get("windows_services"):
                raise Skip("Windows services (process/service matching)")
            st.services[_href(obj)] = Service(name, _entries(obj.get("service_ports", []), path, st),
                                              str(obj.get("description") or ""))
        except Skip as exc:
            st.note(Outcome.NOT_EXPRESSIBLE, path, f"service {obj.get('name')}", f"cannot express {exc}: rules "
                    "using it are left out")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            st.note(Outcome.BAD_INPUT, path, "service", str(exc))


def _workloads(st: _State, items: list[Any]) -> None:
    for i, obj in enumerate(items):
        try:
            name = _name(obj.get("name") or obj.get("hostname"), "wl")
            labels = frozenset(st.labels[_href(lab)] for lab in obj.get("labels", []) if _href(lab) in st.labels)
            addrs: list[IPAddress] = [ipaddress.ip_address(n["address"]) for n in obj.get("interfaces", [])
                                      if n.get("address")]
            mode = MODES.get(str(obj.get("enforcement_mode", "visibility_only")), EnforcementMode.VISIBILITY)
            st.workloads[_href(obj)] = Workload(name, labels, (Interface("eth0", tuple(addrs)),) if addrs else (),
                                                mode, "nftables", str(obj.get("description") or ""))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            st.note(Outcome.BAD_INPUT, f"/workloads/{i}", "workload", str(exc))


def _actors(st: _State, actors: list[Any], path: str) -> tuple[Selector, ...]:
    """PCE actors -> Stockade selectors (label keys AND, values of one key OR)."""
    by_key: dict[str, list[tuple[str, str]]] = {}
    out: list[Selector] = []
    for a in actors:
        if a.get("actors") == "ams":
            out.append(ALL_WORKLOADS)
        elif "label" in a:
            lab = st.labels[_href(a["label"])]
            by_key.setdefault(lab.key, []).append(("label", lab.value))
        elif "label_group" in a:
            g = st.groups[_href(a["label_group"])]
            by_key.setdefault(g.key, []).append(("group", g.name))
        elif "ip_list" in a:
            out.append(IPListSelector(st.ip_lists[_href(a["ip_list"])].name))
        elif "workload" in a:
            href = _href(a["workload"])
            w = st.workloads[href]
            st.workloads[href] = replace(w, labels=w.labels | {Label(HOST_KEY, w.name)})
            out.append(LabelSelector((Label(HOST_KEY, w.name),)))
        else:
            raise Skip(f"actor {json.dumps(a)[:60]} (virtual services and other actors)")
    if by_key:
        for combo in itertools.product(*(by_key[k] for k in sorted(by_key))):
            req = tuple(sorted(Label(k, v) for k, (t, v) in zip(sorted(by_key), combo, strict=True) if t == "label"))
            groups = tuple(sorted(v for t, v in combo if t == "group"))
            out.append(LabelSelector(req, groups))
    if not out:
        raise ValueError("no actors")
    return tuple(out)


def _rule_services(st: _State, items: list[Any], owner: str) -> tuple[str, ...]:
    names = []
    for s in items:
        if "href" in s:
            if s["href"] not in st.services:
                raise Skip(f"service {s['href']} (not imported)")
            names.append(st.services[s["href"]].name)
        else:
            entries = _entries([s], "", st)
            svc = Service(safe_name(f"{owner}-" + "-".join(str(e).replace("/", "-") for e in entries), "svc"), entries)
            st.services[f"inline:{svc.name}"] = svc
            names.append(svc.name)
    return tuple(sorted(set(names))) or ("any",)


def _gaps(rule: dict[str, Any]) -> list[str]:
    gaps = [k for k in ("sec_connect", "machine_auth", "stateless") if rule.get(k)]
    resolve = rule.get("resolve_labels_as") or {}
    if any("virtual_services" in v for v in resolve.values() if isinstance(v, list)):
        gaps.append("virtual services")
    return gaps


def _rule_sets(st: _State, items: list[Any]) -> tuple[list[Ruleset], list[DenyRule]]:
    rulesets: list[Ruleset] = []
    denies: list[DenyRule] = []
    for i, rs in enumerate(items):
        try:
            if not isinstance(rs, dict):
                raise TypeError("expected an object")
            _rule_set(st, i, rs, rulesets, denies)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            st.note(Outcome.BAD_INPUT, f"/rule_sets/{i}", "rule set", f"cannot read it: {exc!r}")
    return rulesets, denies


def _rule_set(st: _State, i: int, rs: dict[str, Any], rulesets: list[Ruleset], denies: list[DenyRule]) -> None:
    path = f"/rule_sets/{i}"
    name = safe_name(str(rs.get("name") or f"ruleset-{i}"), "rs")
    if rs.get("enabled") is False:
        st.note(Outcome.CARRIED, path, f"rule set {name}", "disabled: not imported")
        return
    try:
        scopes: list[LabelSelector] = []
        for scope in rs.get("scopes", [[]]):
            req: list[Label] = []
            groups: list[str] = []
            excl: list[Label] = []
            for a in scope:
                if "label" in a:
                    (excl if a.get("exclusion") else req).append(st.labels[_href(a["label"])])
                elif "label_group" in a:
                    groups.append(st.groups[_href(a["label_group"])].name)
            if req or groups or excl:
                scopes.append(LabelSelector(tuple(sorted(req)), tuple(sorted(groups)), tuple(sorted(excl))))
            else:
                scopes = []
                break
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        st.note(Outcome.BAD_INPUT, f"{path}/scopes", f"rule set {name}", f"unknown reference {exc}")
        return
    rules: list[AllowRule] = []
    for j, rule in enumerate(rs.get("rules", [])):
        rp = f"{path}/rules/{j}"
        if rule.get("enabled") is False:
            st.note(Outcome.CARRIED, rp, f"rule set {name} rule {j + 1}", "disabled: not imported")
            continue
        try:
            gaps = _gaps(rule)
            providers = _actors(st, rule.get("providers", []), rp)
            if gaps:
                st.tainted.append(providers)
                raise Skip(", ".join(gaps))
            rules.append(AllowRule(
                _actors(st, rule.get("consumers", []), rp), providers,
                _rule_services(st, rule.get("ingress_services", []), name),
                ConsumerScope.GLOBAL if rule.get("unscoped_consumers") else ConsumerScope.INTRA,
                str(rule.get("description") or "")))
            st.note(Outcome.CARRIED, rp, f"rule set {name} rule {j + 1}", "allow rule")
        except Skip as exc:
            st.note(Outcome.NOT_EXPRESSIBLE, rp, f"rule set {name} rule {j + 1}",
                    f"cannot express {exc}: left out (narrower); its providers stay in visibility mode")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            st.note(Outcome.BAD_INPUT, rp, f"rule set {name} rule {j + 1}", f"unknown reference or field {exc}")
    if rules:
        rulesets.append(Ruleset(name, tuple(scopes), tuple(rules), str(rs.get("description") or "")))
    for j, rule in enumerate(rs.get("deny_rules", [])):
        denies += _deny(st, rule, f"{path}/deny_rules/{j}", f"{name}-deny-{j + 1}", scopes)


def _deny(st: _State, rule: Any, path: str, name: str, scopes: list[LabelSelector]) -> list[DenyRule]:
    if not isinstance(rule, dict):
        st.note(Outcome.BAD_INPUT, path, name, "expected an object")
        return []
    name = safe_name(str(rule.get("name") or name), "deny")
    try:
        providers = _actors(st, rule.get("providers", []), path)
        consumers = _actors(st, rule.get("consumers", []), path)
        services = _rule_services(st, rule.get("ingress_services", []), name)
    except Skip as exc:
        st.note(Outcome.NOT_EXPRESSIBLE, path, name, f"cannot express {exc}: its providers stay in visibility mode")
        return []
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        st.note(Outcome.BAD_INPUT, path, name, f"unknown reference or field {exc}")
        return []
    override = bool(rule.get("override")) or rule.get("action") == "override_deny"
    if any(isinstance(sel, IPListSelector) and sel.ip_list in st.fqdn_lists for sel in consumers + providers):
        st.tainted.append(providers)
        st.note(Outcome.NOT_EXPRESSIBLE, path, name, "uses an IP list with FQDNs: the deny covers only its "
                "addresses; its providers stay in visibility mode")
    if scopes:
        providers = tuple(c for s in scopes for p in providers if (c := confine(p, s)) is not None)
        if not rule.get("unscoped_consumers"):
            consumers = tuple(c for s in scopes for p in consumers if (c := confine(p, s)) is not None)
    if not providers or not consumers:
        st.note(Outcome.CARRIED, path, name, "matches nothing inside its rule set's scope")
        return []
    st.note(Outcome.CARRIED, path, name, "override-deny rule" if override else "deny rule")
    return [DenyRule(safe_name(name, "deny"), tuple(dict.fromkeys(consumers)), tuple(dict.fromkeys(providers)),
                     services, override, str(rule.get("description") or ""))]


def import_illumio(sources: Sequence[Source], options: ImportOptions) -> ImportResult:
    """One PCE export (several files are read as one estate)."""
    findings: list[Finding] = []
    docs: dict[str, list[Any]] = {}
    for s in sources:
        try:
            doc = json.loads(s.text)
        except json.JSONDecodeError as exc:
            findings.append(Finding(Outcome.BAD_INPUT, Origin(s.name, exc.lineno), "", "JSON", exc.msg))
            continue
        if not isinstance(doc, dict):
            findings.append(Finding(Outcome.BAD_INPUT, Origin(s.name, path="/"), "", "document",
                                    "expected an object with labels, rule_sets, ..."))
            continue
        for key, value in doc.items():
            if isinstance(value, list):
                docs.setdefault(key, []).extend(value)
    st = _State(sources[0].name if sources else "")
    _labels(st, docs.get("labels", []))
    _label_groups(st, docs.get("label_groups", []))
    _ip_lists(st, docs.get("ip_lists", []))
    _services(st, docs.get("services", []))
    _workloads(st, docs.get("workloads", []))
    rulesets, denies = _rule_sets(st, docs.get("rule_sets", []))
    for i, b in enumerate(docs.get("enforcement_boundaries", [])):
        denies += _deny(st, b, f"/enforcement_boundaries/{i}", f"boundary-{i}", [])
    for i, d in enumerate(docs.get("deny_rules", [])):
        denies += _deny(st, d, f"/deny_rules/{i}", f"deny-{i}", [])
    st.note(Outcome.APPROXIMATED, "/rule_sets", "rule actors", "label actors: values of one key are alternatives, "
            "different keys must all match (the PCE's rule semantics), written as one selector per combination")
    groups = {g.name: g for g in st.groups.values()}
    workloads = []
    for w in st.workloads.values():
        hit = any((isinstance(sel, LabelSelector) and sel.matches(w.labels, groups)) or sel == ALL_WORKLOADS
                  for sels in st.tainted for sel in sels)
        if hit and w.mode in (EnforcementMode.SELECTIVE, EnforcementMode.FULL):
            w = replace(w, mode=EnforcementMode.VISIBILITY, description=f"{VISIBILITY_NOTE} (was {w.mode.value})")
        workloads.append(w)
    keys = sorted({lab.key for lab in st.labels.values()} | {g.key for g in groups.values()} | set(DEFAULT_LABEL_KEYS)
                  | ({HOST_KEY} if any(lab.key == HOST_KEY for w in workloads for lab in w.labels) else set()))
    services = {s.name: s for s in st.services.values() if s.name != "any"}
    policy = Policy(
        label_keys=tuple(LabelKey(k) for k in keys),
        label_groups=tuple(sorted(groups.values())),
        workloads=tuple(sorted(workloads)),
        ip_lists=tuple(sorted({i.name: i for i in st.ip_lists.values()}.values())),
        services=tuple(sorted(services.values())),
        rulesets=tuple(sorted(rulesets)),
        deny_rules=tuple(sorted(denies)),
    )
    findings += st.findings
    return ImportResult(policy, tuple(sorted(set(findings), key=lambda f: (f.outcome, f.origin, f.construct, f.note))))
