"""The Policy aggregate: everything the compiler and the evaluator read.

``Policy.validate()`` checks cross-references (services, IP lists, label groups,
label keys and values) and returns every problem found; it never raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from stockade.errors import Issue
from stockade.model.addresses import IPList, IPNetwork
from stockade.model.labels import DEFAULT_LABEL_KEYS, LabelGroup, LabelKey
from stockade.model.netpol import KubeNetworkPolicy
from stockade.model.rules import DenyRule, Ruleset
from stockade.model.selectors import IPListSelector, LabelSelector, Selector
from stockade.model.services import Proto, Service, ServiceEntry
from stockade.model.workloads import Workload

DEFAULT_MANAGEMENT = (ServiceEntry(Proto.TCP, 22, 22),)


@dataclass(frozen=True, order=True)
class Failsafe:
    """Traffic every enforcing host always allows, whatever the policy says.

    Established/related replies, loopback and ICMPv6 neighbour discovery are
    always part of it; these fields add the controller path and management ports.
    """

    controller: tuple[IPNetwork, ...] = ()
    controller_port: int = 8443
    management: tuple[ServiceEntry, ...] = DEFAULT_MANAGEMENT


@dataclass(frozen=True)
class Policy:
    """Inventory plus policy, immutable. Lookups are by name."""

    label_keys: tuple[LabelKey, ...] = tuple(LabelKey(k) for k in DEFAULT_LABEL_KEYS)
    label_groups: tuple[LabelGroup, ...] = ()
    workloads: tuple[Workload, ...] = ()
    ip_lists: tuple[IPList, ...] = ()
    services: tuple[Service, ...] = ()
    rulesets: tuple[Ruleset, ...] = ()
    deny_rules: tuple[DenyRule, ...] = ()
    failsafe: Failsafe = field(default_factory=Failsafe)
    network_policies: tuple[KubeNetworkPolicy, ...] = ()  # resolved Kubernetes NetworkPolicies

    # ---- lookups -------------------------------------------------------
    def group_map(self) -> dict[str, LabelGroup]:
        return {g.name: g for g in self.label_groups}

    def service_map(self) -> dict[str, Service]:
        return {s.name: s for s in self.services}

    def ip_list_map(self) -> dict[str, IPList]:
        return {i.name: i for i in self.ip_lists}

    def workload_map(self) -> dict[str, Workload]:
        return {w.name: w for w in self.workloads}

    def with_workload(self, workload: Workload) -> Policy:
        """A copy with ``workload`` added or replaced (by name)."""
        rest = tuple(w for w in self.workloads if w.name != workload.name)
        return replace(self, workloads=tuple(sorted((*rest, workload))))

    def without_workload(self, name: str) -> Policy:
        return replace(self, workloads=tuple(w for w in self.workloads if w.name != name))

    # ---- validation ----------------------------------------------------
    def validate(self, source: str = "") -> list[Issue]:
        """Every cross-reference problem, each naming the object and field."""
        issues: list[Issue] = []
        keys = {k.name: k for k in self.label_keys}
        groups = self.group_map()
        services = self.service_map()
        iplists = self.ip_list_map()

        def dupes(kind: str, names: list[str]) -> None:
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    issues.append(Issue(source, 0, kind, f"duplicate name {n!r}"))
                seen.add(n)

        dupes("Workload", [w.name for w in self.workloads])
        dupes("Service", [s.name for s in self.services])
        dupes("IPList", [i.name for i in self.ip_lists])
        dupes("LabelGroup", [g.name for g in self.label_groups])
        dupes("Ruleset", [r.name for r in self.rulesets])
        dupes("DenyRule", [d.name for d in self.deny_rules])

        for g in self.label_groups:
            for v in sorted(g.values):
                issues += _check_label(keys, g.key, v, source, f"LabelGroup {g.name}")
        owner: dict[object, str] = {}
        for w in self.workloads:
            for lab in sorted(w.labels):
                issues += _check_label(keys, lab.key, lab.value, source, f"Workload {w.name}")
            for a in w.addresses:
                if a in owner and owner[a] != w.name:
                    issues.append(
                        Issue(source, 0, f"Workload {w.name}", f"address {a} already belongs to {owner[a]}")
                    )
                owner[a] = w.name

        def check_selectors(where: str, sels: tuple[Selector, ...]) -> None:
            for i, sel in enumerate(sels):
                here = f"{where}[{i}]"
                if isinstance(sel, IPListSelector):
                    if sel.ip_list not in iplists:
                        issues.append(Issue(source, 0, here, f"unknown IP list {sel.ip_list!r}"))
                elif isinstance(sel, LabelSelector):
                    for lab in sel.require + sel.exclude:
                        issues.extend(_check_label(keys, lab.key, lab.value, source, here))
                    for g in sel.groups:
                        if g not in groups:
                            issues.append(Issue(source, 0, here, f"unknown label group {g!r}"))

        def check_services(where: str, names: tuple[str, ...]) -> None:
            for i, n in enumerate(names):
                if n not in services:
                    issues.append(Issue(source, 0, f"{where}[{i}]", f"unknown service {n!r}"))

        for rs in self.rulesets:
            check_selectors(f"Ruleset {rs.name}.scope", rs.scopes)
            for j, r in enumerate(rs.rules):
                base = f"Ruleset {rs.name}.rules[{j}]"
                check_selectors(f"{base}.consumers", r.consumers)
                check_selectors(f"{base}.providers", r.providers)
                check_services(f"{base}.services", r.services)
                if rs.encrypts(j):
                    issues += _check_encrypted(source, base, r.consumers, r.providers)
        for d in self.deny_rules:
            check_selectors(f"DenyRule {d.name}.consumers", d.consumers)
            check_selectors(f"DenyRule {d.name}.providers", d.providers)
            check_services(f"DenyRule {d.name}.services", d.services)
        return issues

    def iter_selectors(self) -> Iterator[Selector]:
        for rs in self.rulesets:
            yield from rs.scopes
            for r in rs.rules:
                yield from r.consumers
                yield from r.providers
        for d in self.deny_rules:
            yield from d.consumers
            yield from d.providers


def _check_encrypted(
    source: str, base: str, consumers: tuple[Selector, ...], providers: tuple[Selector, ...]
) -> list[Issue]:
    """An encrypted rule runs WireGuard between two workloads: an IP list peer has no key."""
    out: list[Issue] = []
    for side, sels in (("consumers", consumers), ("providers", providers)):
        for i, sel in enumerate(sels):
            if isinstance(sel, IPListSelector):
                out.append(
                    Issue(
                        source,
                        0,
                        f"{base}.{side}[{i}]",
                        f"encrypt: true needs workloads on both sides; IP list {sel.ip_list!r} has no WireGuard key",
                    )
                )
    return out


def _check_label(keys: dict[str, LabelKey], key: str, value: str, source: str, where: str) -> list[Issue]:
    if key not in keys:
        return [Issue(source, 0, where, f"unknown label key {key!r}")]
    if not keys[key].accepts(value):
        allowed = ", ".join(sorted(keys[key].allowed))
        return [Issue(source, 0, where, f"label {key}={value!r} not allowed (allowed: {allowed})")]
    return []
