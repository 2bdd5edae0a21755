"""Kubernetes NetworkPolicy -> Stockade's resolved form (``stockade.model.netpol``): pure.

:class:`NetpolResolver` holds the cluster picture the translation needs (namespaces with their
labels, pods with their labels and container ports, NetworkPolicy objects as the API returns them)
and resolves each policy into a :class:`~stockade.model.netpol.KubeNetworkPolicy`:

* ``podSelector`` / ``namespaceSelector`` (``matchLabels`` and ``matchExpressions`` with ``In``,
  ``NotIn``, ``Exists``, ``DoesNotExist``) become the names of the workloads
  (``stockade.k8s.mapping.workload_name``) they pick; a peer with both picks pods matching the
  pod selector in namespaces matching the namespace selector; a peer with only a pod selector
  stays in the policy's namespace.
* ``ipBlock`` with ``except`` becomes address ranges (``cidr`` minus every ``except``).
* ``ports``: protocol (default TCP), ``port`` (number or name), ``endPort``. A named port resolves
  per destination pod from its containers' ports (name and protocol must match): for ingress the
  destination is the selected pod, for egress the peer pod; an ipBlock peer has no named ports.
* ``policyTypes`` (default: Ingress, plus Egress when the policy has egress rules); an empty rule
  list isolates without allowing (default deny); a rule without peers or ports matches all.

Anything the translation cannot express (an unknown protocol, a malformed field, an unknown selector operator)
never widens: the policy keeps isolating what it would isolate (every pod of its namespace when
its ``podSelector`` itself is unreadable; both directions when ``policyTypes`` is) and contributes
no allow rule; the reasons are in ``problems`` for the sync to report as a Warning Event.

Resolution is incremental for the sync and the benchmark: a pod or namespace change marks dirty
only the policies whose selectors it matches before or after the change (or that name a port),
and :meth:`NetpolResolver.resolved` re-resolves only those.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from stockade.k8s.mapping import PodKey, workload_name
from stockade.model.addresses import AddressRanges
from stockade.model.netpol import KubeNetworkPolicy, NetpolDirection, NetpolRule
from stockade.model.services import ANY_SERVICE_ENTRY, Proto, ServiceEntry

Labels = Mapping[str, str]
_PROTOS = {"TCP": Proto.TCP, "UDP": Proto.UDP, "SCTP": Proto.SCTP}


class Unsupported(Exception):
    """A part of a NetworkPolicy the translation cannot express (internal: becomes a problem)."""


# ---- label selectors ------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Labels) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class Selector:
    """A parsed ``metav1.LabelSelector``; no requirement matches everything (``{}``)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def parse_selector(raw: object, where: str) -> Selector:
    if not isinstance(raw, dict):
        raise Unsupported(f"{where} is not a label selector")
    reqs: list[Requirement] = []
    ml = raw.get("matchLabels") or {}
    if not isinstance(ml, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ml.items()):
        raise Unsupported(f"{where}.matchLabels is not a map of strings")
    reqs += [Requirement(k, "In", frozenset({v})) for k, v in sorted(ml.items())]
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise Unsupported(f"{where}.matchExpressions is not a list")
    for i, e in enumerate(exprs):
        here = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise Unsupported(f"{here} has no key")
        op, values = e.get("operator"), e.get("values") or []
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise Unsupported(f"{here}.operator {op!r} is not In, NotIn, Exists or DoesNotExist")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise Unsupported(f"{here}.values is not a list of strings")
        if (op in ("In", "NotIn")) != bool(values):
            needs = "needs values" if op in ("In", "NotIn") else "takes no values"
            raise Unsupported(f"{here}: {op} {needs}")
        reqs.append(Requirement(e["key"], op, frozenset(values)))
    return Selector(tuple(reqs))


# ---- pods and namespaces --------------------------------------------------------------------


@dataclass(frozen=True)
class PodInfo:
    """What the translation reads of a pod: where it is, its labels, its named container ports."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    ports: tuple[tuple[str, Proto, int], ...] = ()  # (name, protocol, number)

    @cached_property
    def workload(self) -> str:
        return workload_name(PodKey(self.namespace, self.name))

    def named_port(self, name: str, proto: Proto) -> int | None:
        for n, p, number in self.ports:
            if n == name and p is proto:
                return number
        return None


def pod_info(obj: Mapping[str, Any]) -> PodInfo | None:
    """A pod API object (dict) as :class:`PodInfo`; None when it has no name, namespace or labels."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    ns, name, labels = meta.get("namespace"), meta.get("name"), meta.get("labels") or {}
    if not (isinstance(ns, str) and isinstance(name, str) and isinstance(labels, dict)):
        return None
    ports: list[tuple[str, Proto, int]] = []
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    for c in (spec or {}).get("containers") or []:
        for p in (c.get("ports") or []) if isinstance(c, dict) else []:
            if not isinstance(p, dict):
                continue
            pname, number, proto = p.get("name"), p.get("containerPort"), _PROTOS.get(p.get("protocol") or "TCP")
            if isinstance(pname, str) and isinstance(number, int) and proto is not None:
                ports.append((pname, proto, number))
    clean = {str(k): str(v) for k, v in labels.items()}
    return PodInfo(ns, name, clean, tuple(sorted(ports, key=lambda t: (t[0], t[1].value, t[2]))))


# ---- parsed policies ------------------------------------------------------------------------


@dataclass(frozen=True)
class PortSpec:
    proto: Proto
    number: int | None = None  # None with name None: every port of the protocol
    end: int | None = None
    name: str | None = None

    def entry(self) -> ServiceEntry:
        return ServiceEntry(self.proto, self.number, self.end if self.end is not None else self.number)


@dataclass(frozen=True)
class PeerSpec:
    pods: Selector | None = None
    namespaces: Selector | None = None
    block: AddressRanges | None = None


@dataclass(frozen=True)
class RuleSpec:
    direction: NetpolDirection
    index: int
    peers: tuple[PeerSpec, ...]  # empty: every peer
    ports: tuple[PortSpec, ...] | None  # None: every port of every protocol


@dataclass(frozen=True)
class PolicySpec:
    namespace: str
    name: str
    selector: Selector | None  # None: unreadable, isolate the whole namespace
    ingress: bool
    egress: bool
    rules: tuple[RuleSpec, ...]
    problems: tuple[str, ...] = ()

    def signature(self, ns_labels: Labels | None, pod: PodInfo | None) -> tuple[object, ...] | None:
        """What this policy's resolution reads of ``pod`` (in a namespace with ``ns_labels``): whether
        it is selected, which peers it matches, and its named ports when those matter; None when the
        pod is irrelevant. A pod change that keeps the signature cannot change the resolution."""
        if pod is None:
            return None
        flags: list[bool] = [pod.namespace == self.namespace
                             and (self.selector is None or self.selector.matches(pod.labels))]
        named = False
        for r in self.rules:
            has_named = r.ports is not None and any(p.name for p in r.ports)
            named = named or has_named
            if not r.peers:
                # an egress rule to every peer on a named port resolves it on every pod
                flags.append(has_named and r.direction is NetpolDirection.EGRESS)
            for p in r.peers:
                if p.block is not None:
                    continue
                if p.namespaces is None:
                    in_ns = pod.namespace == self.namespace
                else:
                    in_ns = ns_labels is not None and p.namespaces.matches(ns_labels)
                flags.append(in_ns and (p.pods is None or p.pods.matches(pod.labels)))
        if not any(flags):
            return None
        return (*flags, pod.ports if named else ())

    def namespace_signature(self, ns_labels: Labels | None) -> tuple[bool, ...]:
        """Which of this policy's namespace selectors match a namespace with ``ns_labels``."""
        return tuple(
            ns_labels is not None and p.namespaces.matches(ns_labels)
            for r in self.rules
            for p in r.peers
            if p.namespaces is not None
        )


def _parse_cidr(raw: object, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(raw, strict=False) if isinstance(raw, str) else _bad(where)
    except ValueError:
        raise Unsupported(f"{where} {raw!r} is not a CIDR") from None


def _bad(where: str) -> ipaddress.IPv4Network:
    raise Unsupported(f"{where} is not a CIDR")


def _parse_peer(raw: object, where: str) -> PeerSpec:
    if not isinstance(raw, dict):
        raise Unsupported(f"{where} is not a peer")
    if "ipBlock" in raw:
        if "podSelector" in raw or "namespaceSelector" in raw:
            raise Unsupported(f"{where}: ipBlock together with a selector")
        block = raw["ipBlock"]
        if not isinstance(block, dict):
            raise Unsupported(f"{where}.ipBlock is not an object")
        cidr = _parse_cidr(block.get("cidr"), f"{where}.ipBlock.cidr")
        excepts = block.get("except") or []
        if not isinstance(excepts, list):
            raise Unsupported(f"{where}.ipBlock.except is not a list")
        nets = [_parse_cidr(e, f"{where}.ipBlock.except[{i}]") for i, e in enumerate(excepts)]
        for i, n in enumerate(nets):
            if n.version != cidr.version or not n.subnet_of(cidr):  # type: ignore[arg-type]
                raise Unsupported(f"{where}.ipBlock.except[{i}] {n} is not inside {cidr}")
        return PeerSpec(block=AddressRanges.of([cidr]).minus(AddressRanges.of(nets)))
    pods = parse_selector(raw["podSelector"], f"{where}.podSelector") if raw.get("podSelector") is not None else None
    nss = (
        parse_selector(raw["namespaceSelector"], f"{where}.namespaceSelector")
        if raw.get("namespaceSelector") is not None
        else None
    )
    if pods is None and nss is None:
        raise Unsupported(f"{where} has no podSelector, namespaceSelector or ipBlock")
    return PeerSpec(pods, nss)


def _parse_port(raw: object, where: str) -> PortSpec:
    if not isinstance(raw, dict):
        raise Unsupported(f"{where} is not a port")
    proto_name = raw.get("protocol") or "TCP"
    proto = _PROTOS.get(proto_name) if isinstance(proto_name, str) else None
    if proto is None:
        raise Unsupported(f"{where}.protocol {proto_name!r} is not supported (TCP, UDP and SCTP are)")
    port, end = raw.get("port"), raw.get("endPort")
    if port is None:
        if end is not None:
            raise Unsupported(f"{where}.endPort without port")
        return PortSpec(proto)
    if isinstance(port, str) and not port.isdigit():
        if end is not None:
            raise Unsupported(f"{where}.endPort with a named port")
        return PortSpec(proto, name=port)
    number = int(port) if isinstance(port, str | int) and not isinstance(port, bool) else -1
    if not 1 <= number <= 65535:
        raise Unsupported(f"{where}.port {port!r} is not 1-65535 or a port name")
    if end is not None and (not isinstance(end, int) or isinstance(end, bool) or not number <= end <= 65535):
        raise Unsupported(f"{where}.endPort {end!r} is not between port and 65535")
    return PortSpec(proto, number, end)


def parse_policy(obj: Mapping[str, Any]) -> PolicySpec:
    """A NetworkPolicy API object (dict, camelCase) as a :class:`PolicySpec`, problems included."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    ns, name = str((meta or {}).get("namespace") or ""), str((meta or {}).get("name") or "")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return PolicySpec(ns, name, None, True, True, (), ("spec is missing",))
    problems: list[str] = []
    selector: Selector | None
    try:
        selector = parse_selector(spec.get("podSelector") or {}, "spec.podSelector")
    except Unsupported as exc:
        selector, problems = None, [str(exc)]
    egress_raw = spec.get("egress")
    types = spec.get("policyTypes")
    if types is None:
        ingress, egress = True, bool(egress_raw)
    elif isinstance(types, list) and set(types) <= {"Ingress", "Egress"}:
        ingress, egress = "Ingress" in types, "Egress" in types
    else:
        problems.append(f"spec.policyTypes {types!r} is not a list of Ingress/Egress")
        ingress = egress = True
    rules: list[RuleSpec] = []
    try:
        for direction, key, peer_key in (
            (NetpolDirection.INGRESS, "ingress", "from"),
            (NetpolDirection.EGRESS, "egress", "to"),
        ):
            raw_rules = spec.get(key) or []
            if not isinstance(raw_rules, list):
                raise Unsupported(f"spec.{key} is not a list")
            for i, r in enumerate(raw_rules):
                where = f"spec.{key}[{i}]"
                if not isinstance(r, dict):
                    raise Unsupported(f"{where} is not a rule")
                peers_raw, ports_raw = r.get(peer_key) or [], r.get("ports")
                if not isinstance(peers_raw, list) or not isinstance(ports_raw or [], list):
                    raise Unsupported(f"{where}.{peer_key}/ports is not a list")
                peers = tuple(_parse_peer(p, f"{where}.{peer_key}[{j}]") for j, p in enumerate(peers_raw))
                ports = (
                    tuple(_parse_port(p, f"{where}.ports[{j}]") for j, p in enumerate(ports_raw))
                    if ports_raw
                    else None
                )
                rules.append(RuleSpec(direction, i, peers, ports))
    except Unsupported as exc:
        problems.append(str(exc))
    if problems:
        rules = []  # never widen: what is left isolates and allows nothing
    return PolicySpec(ns, name, selector, ingress, egress, tuple(rules), tuple(problems))


# ---- the resolver ---------------------------------------------------------------------------


@dataclass
class NetpolResolver:
    """The cluster picture and its resolved NetworkPolicies, re-resolved per dirty policy."""

    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: dict[tuple[str, str], PodInfo] = field(default_factory=dict)
    policies: dict[tuple[str, str], PolicySpec] = field(default_factory=dict)
    _by_ns: dict[str, dict[str, PodInfo]] = field(default_factory=dict)
    _resolved: dict[tuple[str, str], KubeNetworkPolicy] = field(default_factory=dict)
    _dirty: set[tuple[str, str]] = field(default_factory=set)

    # -- changes --
    def set_policy(self, obj: Mapping[str, Any]) -> PolicySpec:
        spec = parse_policy(obj)
        key = (spec.namespace, spec.name)
        self.policies[key] = spec
        self._dirty.add(key)
        return spec

    def remove_policy(self, namespace: str, name: str) -> None:
        self.policies.pop((namespace, name), None)
        self._resolved.pop((namespace, name), None)
        self._dirty.discard((namespace, name))

    def set_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        old = self.namespaces.get(name)
        self.namespaces[name] = dict(labels)
        if old != labels:
            self._touch_namespace(name, old)

    def remove_namespace(self, name: str) -> None:
        old = self.namespaces.pop(name, None)
        self._touch_namespace(name, old)

    def set_pod(self, pod: PodInfo) -> None:
        old = self.pods.get((pod.namespace, pod.name))
        if old == pod:
            return
        self.pods[(pod.namespace, pod.name)] = pod
        self._by_ns.setdefault(pod.namespace, {})[pod.name] = pod
        self._touch_pod(pod.namespace, old, pod)

    def remove_pod(self, namespace: str, name: str) -> None:
        old = self.pods.pop((namespace, name), None)
        if old is not None:
            self._by_ns.get(namespace, {}).pop(name, None)
            self._touch_pod(namespace, old, None)

    def _touch_pod(self, namespace: str, old: PodInfo | None, new: PodInfo | None) -> None:
        """Mark dirty the policies whose view of the pod differs between its two versions (None:
        the pod did not exist before / does not any more)."""
        labels = self.namespaces.get(namespace)
        for key, spec in self.policies.items():
            if key not in self._dirty and spec.signature(labels, old) != spec.signature(labels, new):
                self._dirty.add(key)

    def _touch_namespace(self, name: str, old: Mapping[str, str] | None) -> None:
        new = self.namespaces.get(name)
        if not self._by_ns.get(name):
            return
        for key, spec in self.policies.items():
            if key not in self._dirty and spec.namespace_signature(old) != spec.namespace_signature(new):
                self._dirty.add(key)

    def mark_all_dirty(self) -> None:
        """Re-resolve every policy on the next :meth:`resolved` (tests compare with this)."""
        self._dirty.update(self.policies)

    # -- reading --
    @property
    def dirty_count(self) -> int:
        """How many policies the next :meth:`resolved` re-resolves."""
        return len(self._dirty)

    def resolved(self) -> tuple[KubeNetworkPolicy, ...]:
        """Every policy, resolved (only the dirty ones are recomputed), sorted by namespace/name."""
        for key in sorted(self._dirty):
            spec = self.policies.get(key)
            if spec is not None:
                self._resolved[key] = self._resolve(spec)
        self._dirty.clear()
        return tuple(self._resolved[k] for k in sorted(self._resolved))

    def _pods_in(self, namespaces: Iterable[str]) -> Iterable[PodInfo]:
        for ns in namespaces:
            yield from self._by_ns.get(ns, {}).values()

    def _peer_pods(self, policy_ns: str, peer: PeerSpec) -> list[PodInfo]:
        if peer.namespaces is None:
            nss: list[str] = [policy_ns]
        else:
            sel = peer.namespaces
            nss = [n for n, labels in self.namespaces.items() if sel.matches(labels)]
        return [p for p in self._pods_in(nss) if peer.pods is None or peer.pods.matches(p.labels)]

    def _resolve(self, spec: PolicySpec) -> KubeNetworkPolicy:
        selected_pods = [
            p for p in self._pods_in([spec.namespace]) if spec.selector is None or spec.selector.matches(p.labels)
        ]
        selected = frozenset(p.workload for p in selected_pods)
        rules: list[NetpolRule] = []
        for r in spec.rules:
            rules += self._resolve_rule(spec, r, selected_pods)
        return KubeNetworkPolicy(
            spec.namespace, spec.name, selected, spec.ingress, spec.egress, tuple(sorted(rules)), spec.problems
        )

    def _resolve_rule(self, spec: PolicySpec, r: RuleSpec, targets: list[PodInfo]) -> list[NetpolRule]:
        if (r.direction is NetpolDirection.INGRESS and not spec.ingress) or (
            r.direction is NetpolDirection.EGRESS and not spec.egress
        ):
            return []  # rules of a direction the policy does not govern have no effect
        any_peer = not r.peers
        cidrs = AddressRanges()
        peer_pods: dict[str, PodInfo] = {}
        for p in r.peers:
            if p.block is not None:
                cidrs = cidrs.union(p.block)
            else:
                peer_pods.update((x.workload, x) for x in self._peer_pods(spec.namespace, p))
        if r.ports is None:
            target_names = frozenset(p.workload for p in targets)
            return [NetpolRule(r.direction, r.index, target_names, any_peer, frozenset(peer_pods), cidrs,
                               (ANY_SERVICE_ENTRY,))]
        fixed = tuple(sorted({p.entry() for p in r.ports if p.name is None}))
        named = [p for p in r.ports if p.name is not None]
        if not named:
            return [NetpolRule(r.direction, r.index, frozenset(p.workload for p in targets), any_peer,
                               frozenset(peer_pods), cidrs, fixed)]
        out: list[NetpolRule] = []
        if r.direction is NetpolDirection.INGRESS:  # the named port is the target's own
            groups: dict[tuple[ServiceEntry, ...], set[str]] = {}
            for t in targets:
                groups.setdefault(_with_named(fixed, named, t), set()).add(t.workload)
            for services, names in groups.items():
                if services:
                    out.append(NetpolRule(r.direction, r.index, frozenset(names), any_peer,
                                          frozenset(peer_pods), cidrs, services))
            return out
        target_names = frozenset(p.workload for p in targets)
        if any_peer:  # every destination: each pod that has the named port, on its number
            peer_pods = {p.workload: p for p in self.pods.values()}
        by_services: dict[tuple[ServiceEntry, ...], set[str]] = {}
        for name, pod in peer_pods.items():
            by_services.setdefault(_with_named(fixed, named, pod), set()).add(name)
        # addresses that are no pod get the numbered ports only: with the group of pods that has
        # exactly those (one rule per distinct port set: its peer set's name derives from the ports)
        others = fixed and (any_peer or not cidrs.is_empty())
        if others:
            by_services.setdefault(fixed, set())
        for services, names in by_services.items():
            if not services:
                continue
            if others and services == fixed:
                out.append(NetpolRule(r.direction, r.index, target_names, any_peer,
                                      frozenset() if any_peer else frozenset(names), cidrs, services))
            else:
                out.append(NetpolRule(r.direction, r.index, target_names, False, frozenset(names), AddressRanges(),
                                      services))
        return out


def _with_named(fixed: tuple[ServiceEntry, ...], named: list[PortSpec], pod: PodInfo) -> tuple[ServiceEntry, ...]:
    found = set(fixed)
    for p in named:
        number = pod.named_port(p.name or "", p.proto)
        if number is not None:
            found.add(ServiceEntry(p.proto, number, number))
    return tuple(sorted(found))


def resolve(
    policies: Iterable[Mapping[str, Any]],
    pods: Iterable[PodInfo],
    namespaces: Mapping[str, Mapping[str, str]],
) -> tuple[KubeNetworkPolicy, ...]:
    """One-shot translation: NetworkPolicy objects against pods and namespaces."""
    r = NetpolResolver()
    for n, labels in namespaces.items():
        r.set_namespace(n, labels)
    for p in pods:
        r.set_pod(p)
    for obj in policies:
        r.set_policy(obj)
    return r.resolved()
