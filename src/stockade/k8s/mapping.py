"""From a Kubernetes pod (and its namespace) to a Stockade workload body: pure functions.

The sync receives raw API objects (dicts) and never trusts their shape: anything missing,
mistyped or not representable in Stockade becomes a :class:`Skip` with a reason, never an
exception and never a widened workload.

Naming: Stockade names are 1-63 chars of ``[A-Za-z0-9_.-]`` (no ``/``), so pod ``ns/name`` becomes
``k8s.<ns>.<name>`` - unambiguous because a namespace name has no dot. When that is longer than
63 chars it becomes ``k8s.<ns[:20]>.<name[:24]>_<12 hex of sha256("ns/name")>``; ``_`` never occurs
in a Kubernetes name, so a shortened name can't collide with a full one. The ``k8s.`` prefix
marks the workloads the sync owns: it creates, changes and deletes those and no others.

Labels: a declared :class:`LabelMapping` names which pod label keys and which namespace label
keys feed which Stockade key. When both feed one key the namespace wins: namespace labels are set
by whoever administers the cluster, pod labels by whoever deploys into it, so a pod can't claim
``env=prod`` inside a ``dev`` namespace. A mapped value that is not a valid Stockade name, or not
allowed by the declared Stockade key, skips the pod (it is not a peer) - dropping only that label
could take the pod out of a deny rule's scope, which would be a widening.

A pod bound to a node (``spec.nodeName``, carried by the node label) is a workload from that
moment, before it has an IP: an **address-less** workload. It is in no address set (a set's
members are workloads' addresses), so no rule anywhere admits anything more because of it; but
its node agent can enrol it and hold its compiled policy before the sandbox exists, and program
the pod's namespace the moment it finds it instead of waiting for the IP's round trip through
the API, this sync and the controller. ``status.podIPs`` later make it a peer (a set delta to
the hosts whose sets select it). A pod with neither IP nor node label is not a workload yet.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.model.labels import LabelKey, is_valid_name
from stockade.model.workloads import EnforcementMode

PREFIX = "k8s."
MAX_LABELS = 256  # more labels than this on one object is treated as malformed (bounded work per event)
MAX_IPS = 16


@dataclass(frozen=True)
class LabelMapping:
    """Which Kubernetes label keys feed which Stockade label keys (pod and namespace separately)."""

    pod: tuple[tuple[str, str], ...] = (("app.kubernetes.io/name", "app"), ("app", "app"))
    namespace: tuple[tuple[str, str], ...] = (("env", "env"),)
    # the Stockade key that carries pod.spec.nodeName: node agents may enrol only their own pods
    # (stockade.controller.services.pod_enrolment); omitted while the key is not declared
    node: str | None = "k8s-node"
    # the Stockade key that carries the pod's namespace name (the map groups pods per app and namespace
    # with ``keys=app,k8s-namespace``); omitted while the key is not declared
    namespace_name: str | None = "k8s-namespace"

    @staticmethod
    def parse(pod: Mapping[str, str], namespace: Mapping[str, str], node: str | None = "k8s-node",
              namespace_name: str | None = "k8s-namespace") -> LabelMapping:
        for source in (pod, namespace):
            for target in source.values():
                if not is_valid_name(target):
                    raise ValueError(f"label mapping target {target!r} is not a valid Stockade key")
        for extra in (node, namespace_name):
            if extra is not None and not is_valid_name(extra):
                raise ValueError(f"label {extra!r} is not a valid Stockade key")
        return LabelMapping(tuple(pod.items()), tuple(namespace.items()), node, namespace_name)


@dataclass(frozen=True)
class PodKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Skip:
    """A pod that is not a workload now, and why (``event`` True: worth an event - it is malformed
    or unmappable; False: simply not a peer yet, e.g. no IP)."""

    pod: PodKey | None
    reason: str
    event: bool = True


@dataclass(frozen=True)
class DesiredWorkload:
    pod: PodKey
    name: str
    labels: tuple[tuple[str, str], ...]
    addresses: tuple[str, ...]
    mode: EnforcementMode

    def body(self) -> dict[str, Any]:
        """The REST body of ``PUT /api/v1/workloads/{name}``."""
        return {
            "name": self.name,
            "labels": dict(self.labels),
            "interfaces": [{"name": "eth0", "addresses": list(self.addresses)}],
            "mode": self.mode.value,
            "backend": "nftables",
            "description": f"Kubernetes pod {self.pod}",
        }


def workload_name(pod: PodKey) -> str:
    full = f"{PREFIX}{pod.namespace}.{pod.name}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(str(pod).encode()).hexdigest()[:12]
    return f"{PREFIX}{pod.namespace[:20]}.{pod.name[:24]}_{digest}"


def _str_map(value: object) -> dict[str, str] | None:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return dict(value)


def _identity(obj: Mapping[str, Any]) -> tuple[str, str] | str:
    """(namespace, name) of an object ("" namespace for cluster-scoped ones), or what is wrong."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return "no metadata"
    name, ns = meta.get("name"), meta.get("namespace", "")
    if not isinstance(name, str) or not name or not isinstance(ns, str):
        return "metadata.name/namespace missing or not strings"
    return ns, name


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, dict[str, str]] | str:
    """(namespace, name, labels) of an object, or what is wrong with it."""
    ident = _identity(obj)
    if isinstance(ident, str):
        return ident
    labels = _str_map(obj["metadata"].get("labels"))
    if labels is None:
        return f"metadata.labels is not a map of at most {MAX_LABELS} strings"
    return ident[0], ident[1], labels


def namespace_labels(obj: Mapping[str, Any]) -> tuple[str, dict[str, str]] | Skip:
    m = _meta(obj)
    if isinstance(m, str):
        return Skip(None, f"namespace: {m}")
    return m[1], m[2]


def pod_key(obj: Mapping[str, Any]) -> PodKey | None:
    ident = _identity(obj)
    if isinstance(ident, str) or not ident[0]:
        return None
    return PodKey(ident[0], ident[1])


def _pod_addresses(status: object) -> tuple[str, ...] | str:
    if not isinstance(status, dict):
        return ()
    raw = status.get("podIPs")
    if raw is None:
        single = status.get("podIP")
        raw = [{"ip": single}] if single else []
    if not isinstance(raw, list) or len(raw) > MAX_IPS:
        return f"status.podIPs is not a list of at most {MAX_IPS}"
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for i, entry in enumerate(raw):
        ip = entry.get("ip") if isinstance(entry, dict) else None
        try:
            addr = ipaddress.ip_address(ip) if isinstance(ip, str) else None
        except ValueError:
            addr = None
        if addr is None:
            return f"status.podIPs[{i}] is not an IP address"
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            return f"status.podIPs[{i}] {addr} is not a unicast pod address"
        found.add(addr)
    return tuple(str(a) for a in sorted(found, key=lambda a: (a.version, int(a))))


def desired_workload(
    pod: Mapping[str, Any],
    ns_labels: Mapping[str, str] | None,
    mapping: LabelMapping,
    keys: Mapping[str, LabelKey],
    mode: EnforcementMode = EnforcementMode.FULL,
) -> DesiredWorkload | Skip:
    """The workload a pod should be, or why it is none. ``ns_labels`` None: namespace not seen yet."""
    m = _meta(pod)
    if isinstance(m, str):
        return Skip(pod_key(pod), f"pod: {m}")
    key = PodKey(m[0], m[1])
    if not key.namespace:
        return Skip(key, "pod: metadata.namespace missing")
    if ns_labels is None:
        return Skip(key, f"namespace {key.namespace!r} not seen yet", event=False)
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, dict) else None
    if phase in ("Succeeded", "Failed"):
        return Skip(key, f"pod phase {phase}", event=False)
    addrs = _pod_addresses(status)
    if isinstance(addrs, str):
        return Skip(key, addrs)
    labels: dict[str, str] = {}
    for source, table in ((m[2], mapping.pod), (ns_labels, mapping.namespace)):  # namespace last: it wins
        for k8s_key, target in table:
            if k8s_key not in source:
                continue
            value = source[k8s_key]
            declared = keys.get(target)
            if declared is None:
                return Skip(key, f"label {k8s_key} maps to {target!r}, which is not a declared Stockade key")
            if not is_valid_name(value) or not declared.accepts(value):
                return Skip(key, f"label {k8s_key}={value!r}: not an allowed value of Stockade key {target!r}")
            labels[target] = value
    node = _node_label(pod, mapping, keys)
    if isinstance(node, Skip):
        return Skip(key, node.reason)
    if node is not None:
        labels[node[0]] = node[1]
    elif not addrs:
        return Skip(key, "no pod IP yet and not bound to a node", event=False)
    ns_key = mapping.namespace_name
    if ns_key is not None and ns_key in keys:
        if not is_valid_name(key.namespace) or not keys[ns_key].accepts(key.namespace):
            return Skip(key, f"namespace {key.namespace!r} is not an allowed value of Stockade key {ns_key!r}")
        labels[ns_key] = key.namespace
    return DesiredWorkload(key, workload_name(key), tuple(sorted(labels.items())), addrs, mode)


def _node_label(pod: Mapping[str, Any], mapping: LabelMapping,
                keys: Mapping[str, LabelKey]) -> tuple[str, str] | Skip | None:
    """(key, pod.spec.nodeName) for the node label; None when no node label is declared or the pod
    is not bound yet; a Skip when the node name can't be a label value (no node could enrol it)."""
    if mapping.node is None or mapping.node not in keys:
        return None
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, dict) else None
    if node is None or node == "":
        return None
    if not isinstance(node, str) or not is_valid_name(node) or not keys[mapping.node].accepts(node):
        return Skip(None, f"spec.nodeName {str(node)[:64]!r} is not an allowed value of Stockade key {mapping.node!r}")
    return mapping.node, node
