"""The stored body of a resolved Kubernetes NetworkPolicy (kind ``network_policy``), both ways.

The cluster sync resolves NetworkPolicies against the cluster (``stockade.k8s.netpol``) and
stores the result through the REST API as an inventory object: it takes effect at once, like a
pod's workload, and is not part of provisioned versions (the cluster, not the draft, owns it).
Body (canonical: sorted lists, compressed CIDR text)::

    {"name": "k8s.x.deny", "namespace": "x", "policy": "deny",
     "selected": ["k8s.x.a"], "isolates": ["ingress"],
     "rules": [{"direction": "ingress", "index": 0, "targets": ["k8s.x.a"], "any_peer": false,
                "peer_workloads": ["k8s.y.b"], "peer_cidrs": ["10.0.0.0/8"], "ports": ["80/tcp"]}],
     "problems": []}

``decode`` checks every field and reports each problem with its path; nothing is defaulted into
something wider (a missing ``isolates`` is an error, not "none").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from stockade.codec.syntax import BadValue, format_service_entry, parse_network, parse_service_entry
from stockade.errors import Issue, ValidationError
from stockade.model.addresses import AddressRanges, Family
from stockade.model.labels import is_valid_name
from stockade.model.netpol import KubeNetworkPolicy, NetpolDirection, NetpolRule

_K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$")
MAX_MEMBERS = 100_000  # workloads named in one list
MAX_RULES = 10_000


def object_name(namespace: str, name: str) -> str:
    """The stored object's name: ``k8s.<ns>.<name>``, shortened with a hash past 63 characters
    (``_`` never occurs in a Kubernetes name, so a shortened name can't collide with a full one)."""
    full = f"k8s.{namespace}.{name}"
    if len(full) <= 63:
        return full
    return f"k8s.{namespace[:20]}.{name[:24]}_{hashlib.sha256(f'{namespace}/{name}'.encode()).hexdigest()[:12]}"


def encode(np: KubeNetworkPolicy) -> dict[str, Any]:
    return {
        "name": object_name(np.namespace, np.name),
        "namespace": np.namespace,
        "policy": np.name,
        "selected": sorted(np.selected),
        "isolates": [d.value for d in NetpolDirection if np.isolates(d)],
        "rules": [
            {
                "direction": r.direction.value,
                "index": r.index,
                "targets": sorted(r.targets),
                "any_peer": r.any_peer,
                "peer_workloads": sorted(r.peer_workloads),
                "peer_cidrs": [str(n) for f in (Family.V4, Family.V6) for n in r.peer_cidrs.networks(f)],
                "ports": [format_service_entry(e) for e in r.services],
            }
            for r in np.rules
        ],
        "problems": list(np.problems),
    }


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.issues: list[Issue] = []

    def bad(self, field: str, message: str) -> None:
        self.issues.append(Issue(self.source, 0, field, message))

    def names(self, data: Mapping[str, Any], key: str, where: str) -> frozenset[str]:
        raw = data.get(key)
        if not isinstance(raw, list) or len(raw) > MAX_MEMBERS:
            self.bad(f"{where}{key}", f"must be a list of at most {MAX_MEMBERS} workload names")
            return frozenset()
        for i, n in enumerate(raw):
            if not isinstance(n, str) or not is_valid_name(n):
                self.bad(f"{where}{key}[{i}]", "must be a workload name")
        return frozenset(n for n in raw if isinstance(n, str))


def decode(data: Any, source: str = "api") -> KubeNetworkPolicy:
    """The resolved NetworkPolicy of a body; ValidationError with every issue otherwise."""
    rd = _Reader(source)
    if not isinstance(data, Mapping):
        raise ValidationError([Issue(source, 0, "", "the body must be an object")])
    ns, pol = data.get("namespace"), data.get("policy")
    if not isinstance(ns, str) or not _K8S_NAME.match(ns) or len(ns) > 63:
        rd.bad("namespace", "must be a Kubernetes namespace name")
    if not isinstance(pol, str) or not _K8S_NAME.match(pol):
        rd.bad("policy", "must be a Kubernetes object name")
    if isinstance(ns, str) and isinstance(pol, str) and data.get("name") != object_name(ns, pol):
        rd.bad("name", f"must be {object_name(ns, pol)!r} for namespace {ns!r} and policy {pol!r}")
    unknown = set(data) - {"name", "namespace", "policy", "selected", "isolates", "rules", "problems"}
    for key in sorted(unknown):
        rd.bad(str(key), "unknown field")
    selected = rd.names(data, "selected", "")
    isolates = data.get("isolates")
    directions = {d.value: d for d in NetpolDirection}
    if not isinstance(isolates, list) or not all(x in directions for x in isolates):
        rd.bad("isolates", "must be a list of 'ingress' and 'egress'")
        isolates = []
    problems = data.get("problems", [])
    if not isinstance(problems, list) or not all(isinstance(p, str) and len(p) <= 1024 for p in problems):
        rd.bad("problems", "must be a list of texts (at most 1024 characters each)")
        problems = []
    rules_raw = data.get("rules")
    rules: list[NetpolRule] = []
    if not isinstance(rules_raw, list) or len(rules_raw) > MAX_RULES:
        rd.bad("rules", f"must be a list of at most {MAX_RULES} rules")
        rules_raw = []
    for i, r in enumerate(rules_raw):
        rule = _rule(rd, r, f"rules[{i}]", directions)
        if rule is not None:
            rules.append(rule)
    if rd.issues:
        raise ValidationError(rd.issues)
    assert isinstance(ns, str) and isinstance(pol, str)
    return KubeNetworkPolicy(ns, pol, selected, "ingress" in isolates, "egress" in isolates, tuple(sorted(rules)),
                             tuple(problems))


def _rule(rd: _Reader, r: Any, where: str, directions: Mapping[str, NetpolDirection]) -> NetpolRule | None:
    if not isinstance(r, Mapping):
        rd.bad(where, "must be an object")
        return None
    before = len(rd.issues)
    for key in sorted(set(r) - {"direction", "index", "targets", "any_peer", "peer_workloads", "peer_cidrs", "ports"}):
        rd.bad(f"{where}.{key}", "unknown field")
    direction = directions.get(r.get("direction"))  # type: ignore[arg-type]
    if direction is None:
        rd.bad(f"{where}.direction", "must be 'ingress' or 'egress'")
    index = r.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_RULES:
        rd.bad(f"{where}.index", f"must be an integer 0-{MAX_RULES - 1}")
    any_peer = r.get("any_peer")
    if not isinstance(any_peer, bool):
        rd.bad(f"{where}.any_peer", "must be true or false")
    targets = rd.names(r, "targets", f"{where}.")
    peers = rd.names(r, "peer_workloads", f"{where}.")
    cidrs_raw = r.get("peer_cidrs")
    nets = []
    if not isinstance(cidrs_raw, list) or len(cidrs_raw) > MAX_MEMBERS:
        rd.bad(f"{where}.peer_cidrs", "must be a list of CIDRs")
        cidrs_raw = []
    for j, c in enumerate(cidrs_raw):
        try:
            nets.append(parse_network(c if isinstance(c, str) else ""))
        except BadValue as exc:
            rd.bad(f"{where}.peer_cidrs[{j}]", str(exc))
    ports_raw = r.get("ports")
    entries = []
    if not isinstance(ports_raw, list) or len(ports_raw) > 1024:
        rd.bad(f"{where}.ports", "must be a list of at most 1024 ports")
        ports_raw = []
    for j, p in enumerate(ports_raw):
        try:
            entries.append(parse_service_entry(p if isinstance(p, str) else ""))
        except BadValue as exc:
            rd.bad(f"{where}.ports[{j}]", str(exc))
    if len(rd.issues) > before or direction is None or not isinstance(index, int) or not isinstance(any_peer, bool):
        return None
    return NetpolRule(direction, index, targets, any_peer, peers, AddressRanges.of(nets), tuple(sorted(set(entries))))
