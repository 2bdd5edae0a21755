"""The application map: app groups and unmanaged peers as nodes, observed connections as edges.

Nodes (:class:`MapNode`):

* an **app group** per distinct combination of the grouping label keys (default ``app`` +
  ``env``; a workload lacking a key gets the empty value for it), listing its workloads;
* an **IP list** node per IP list that is the most specific list of some unmanaged address seen;
* one **internet** node for unmanaged addresses in no IP list.

Edges (:class:`MapEdge`) aggregate the connections between two nodes: how many distinct
connections, how many were seen, the verdict mix and the services. Drill-down goes
group -> workloads (:attr:`MapNode.workloads`) -> connections of an edge
(:func:`edge_connections`) -> the rule that decided each (:func:`explain`, the reference
evaluator on the given policy, beside what the hosts reported).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from stockade.errors import ValidationError
from stockade.evaluator import Evaluation, Evaluator, Verdict
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.services import Proto
from stockade.model.workloads import Workload
from stockade.visibility.flows import INTERNET, Connection, Endpoint, EndpointKind, Resolver

DEFAULT_GROUP_KEYS: tuple[str, ...] = ("app", "env")


class NodeKind(Enum):
    APP_GROUP = "app-group"
    IP_LIST = "ip-list"
    INTERNET = "internet"


@dataclass(frozen=True)
class MapNode:
    id: str  # "group:app=shop,env=prod", "iplist:office", "internet"
    kind: NodeKind
    name: str  # "shop/prod", the IP list name, "internet"
    labels: tuple[Label, ...] = ()  # app groups: the grouping labels (empty values omitted)
    workloads: tuple[str, ...] = ()  # app groups: member workloads, sorted


@dataclass(frozen=True)
class VerdictMix:
    """Connections per verdict."""

    allowed: int = 0
    potentially_blocked: int = 0
    blocked: int = 0

    def plus(self, verdict: Verdict, n: int = 1) -> VerdictMix:
        return VerdictMix(
            self.allowed + n * (verdict is Verdict.ALLOWED),
            self.potentially_blocked + n * (verdict is Verdict.POTENTIALLY_BLOCKED),
            self.blocked + n * (verdict is Verdict.BLOCKED),
        )


@dataclass(frozen=True)
class MapEdge:
    src: str  # node id
    dst: str
    connections: int  # distinct (src, dst, proto, port) connections
    count: int  # connections seen in total
    mix: VerdictMix
    services: tuple[str, ...]  # "443/tcp", "icmp:8", sorted
    encrypted: int = 0  # of ``connections``, those the policy in force sends through WireGuard (encrypt: true)


@dataclass(frozen=True)
class Link:
    """Connections as the map sees them: resolved ends, service, verdict, how often seen.

    ``connections`` > 1 when the caller already counted several connections with the same
    ends, service and verdict (the controller aggregates in its database).
    """

    src: Endpoint
    dst: Endpoint
    service: str
    verdict: Verdict
    count: int
    connections: int = 1
    encrypted: bool = False  # the policy in force encrypts it (see :class:`EncryptionOracle`)


@dataclass(frozen=True)
class AppMap:
    group_keys: tuple[str, ...]
    nodes: tuple[MapNode, ...]
    edges: tuple[MapEdge, ...]

    def node(self, node_id: str) -> MapNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)


# ---- grouping ----------------------------------------------------------------------------


def group_values(labels: Iterable[Label], keys: Sequence[str]) -> tuple[str, ...]:
    """The values of ``keys`` in ``labels`` ("" for a missing key), in key order."""
    found = {lab.key: lab.value for lab in labels}
    return tuple(found.get(k, "") for k in keys)


def group_id(values: Sequence[str], keys: Sequence[str]) -> str:
    return "group:" + ",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))


def group_labels(values: Sequence[str], keys: Sequence[str]) -> tuple[Label, ...]:
    return tuple(Label(k, v) for k, v in zip(keys, values, strict=True) if v)


def workload_group(w: Workload, keys: Sequence[str]) -> str:
    return group_id(group_values(w.labels, keys), keys)


def node_id_of(ep: Endpoint, keys: Sequence[str]) -> str:
    if ep.kind is EndpointKind.WORKLOAD:
        return group_id(group_values(ep.labels, keys), keys)
    if ep.kind is EndpointKind.IP_LIST:
        return f"iplist:{ep.name}"
    return INTERNET


def _group_name(values: Sequence[str]) -> str:
    return "/".join(v or "-" for v in values)


def links_of(connections: Iterable[Connection], resolver: Resolver) -> list[Link]:
    return [Link(resolver.endpoint(c.key.src), resolver.endpoint(c.key.dst), c.key.service_text(), c.verdict, c.count)
            for c in connections]


def build_app_map(
    policy: Policy,
    connections: Iterable[Connection],
    keys: Sequence[str] = DEFAULT_GROUP_KEYS,
    *,
    resolver: Resolver | None = None,
) -> AppMap:
    """The map of ``connections`` over ``policy``'s workloads, grouped by ``keys``.

    Every app group of the policy is a node, with or without traffic; unmanaged nodes appear
    only when an address of theirs was seen.
    """
    return map_of_links(policy, links_of(connections, resolver or Resolver(policy)), keys)


def map_of_links(policy: Policy, links: Iterable[Link], keys: Sequence[str] = DEFAULT_GROUP_KEYS) -> AppMap:
    """The map of already resolved connections (the controller resolves managed ends at ingest)."""
    keys = tuple(keys)
    members: dict[tuple[str, ...], list[str]] = {}
    for w in policy.workloads:
        members.setdefault(group_values(w.labels, keys), []).append(w.name)
    nodes: dict[str, MapNode] = {}
    for values in sorted(members):
        nid = group_id(values, keys)
        nodes[nid] = MapNode(nid, NodeKind.APP_GROUP, _group_name(values), group_labels(values, keys),
                             tuple(sorted(members[values])))

    acc: dict[tuple[str, str], _EdgeAcc] = {}
    for link in links:
        ends = []
        for ep in (link.src, link.dst):
            nid = node_id_of(ep, keys)
            if nid not in nodes:
                if ep.kind is EndpointKind.IP_LIST:
                    nodes[nid] = MapNode(nid, NodeKind.IP_LIST, ep.name)
                elif ep.kind is EndpointKind.INTERNET:
                    nodes[nid] = MapNode(nid, NodeKind.INTERNET, INTERNET)
                else:  # a group whose workloads have been relabelled or removed since
                    values = group_values(ep.labels, keys)
                    nodes[nid] = MapNode(nid, NodeKind.APP_GROUP, _group_name(values), group_labels(values, keys))
            ends.append(nid)
        e = acc.setdefault((ends[0], ends[1]), _EdgeAcc())
        e.connections += link.connections
        e.count += link.count
        e.mix = e.mix.plus(link.verdict, link.connections)
        e.services.add(link.service)
        e.encrypted += link.connections if link.encrypted else 0
    edges = tuple(
        MapEdge(s, d, e.connections, e.count, e.mix, tuple(sorted(e.services)), e.encrypted)
        for (s, d), e in sorted(acc.items())
    )
    return AppMap(keys, tuple(nodes[n] for n in sorted(nodes)), edges)


class _EdgeAcc:
    __slots__ = ("connections", "count", "encrypted", "mix", "services")

    def __init__(self) -> None:
        self.connections = 0
        self.encrypted = 0
        self.count = 0
        self.mix = VerdictMix()
        self.services: set[str] = set()


class EncryptionOracle:
    """Whether the policy encrypts a connection between two managed workloads (``encrypt: true``):
    the evaluator's ``encrypted`` on each workload's first address of a family both have. Costs
    nothing when no ruleset encrypts (the common case): no evaluator is built."""

    def __init__(self, policy: Policy) -> None:
        encrypts = any(rs.encrypts(i) for rs in policy.rulesets for i in range(len(rs.rules)))
        self._ev = Evaluator(policy) if encrypts else None
        self._workloads = {w.name: w for w in policy.workloads} if encrypts else {}
        self._memo: dict[tuple[str, str, Proto, int | None], bool] = {}

    def __call__(self, src: Endpoint, dst: Endpoint, proto: Proto, port: int | None) -> bool:
        if self._ev is None or src.kind is not EndpointKind.WORKLOAD or dst.kind is not EndpointKind.WORKLOAD:
            return False
        key = (src.name, dst.name, proto, port)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._evaluate(src.name, dst.name, proto, port)
        return found

    def _evaluate(self, src: str, dst: str, proto: Proto, port: int | None) -> bool:
        a, b = self._workloads.get(src), self._workloads.get(dst)
        if a is None or b is None or self._ev is None:
            return False
        for version in (4, 6):
            if proto is (Proto.ICMPV6 if version == 4 else Proto.ICMP):
                continue
            sa = next((x for x in a.addresses if x.version == version), None)
            da = next((x for x in b.addresses if x.version == version), None)
            if sa is not None and da is not None:
                try:
                    ev = self._ev.evaluate(sa, da, proto, port)
                except ValidationError:
                    return False
                return ev.verdict is Verdict.ALLOWED and ev.encrypted
        return False


# ---- drill-down ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainedConnection:
    """A recorded connection, its resolved ends and the evaluator's decision on each side."""

    connection: Connection
    src: Endpoint
    dst: Endpoint
    evaluation: Evaluation


def edge_connections(
    policy: Policy,
    connections: Iterable[Connection],
    src_node: str,
    dst_node: str,
    keys: Sequence[str] = DEFAULT_GROUP_KEYS,
    *,
    resolver: Resolver | None = None,
) -> list[Connection]:
    """The connections behind the edge ``src_node`` -> ``dst_node``."""
    res = resolver or Resolver(policy)
    out = []
    for c in connections:
        src = node_id_of(res.endpoint(c.key.src), keys)
        if src == src_node and node_id_of(res.endpoint(c.key.dst), keys) == dst_node:
            out.append(c)
    return out


def explain(
    policy: Policy,
    connections: Iterable[Connection],
    *,
    evaluator: Evaluator | None = None,
    resolver: Resolver | None = None,
) -> list[ExplainedConnection]:
    """Each connection with the deciding rule on each side under ``policy`` (``explain``)."""
    ev = evaluator or Evaluator(policy)
    res = resolver or Resolver(policy)
    out = []
    for c in connections:
        k = c.key
        out.append(ExplainedConnection(c, res.endpoint(k.src), res.endpoint(k.dst),
                                       ev.evaluate(k.src, k.dst, k.proto, k.port)))
    return out
