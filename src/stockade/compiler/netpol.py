"""Kubernetes NetworkPolicies in the HostPolicy IR: the per-pod layer on top of the label rules.

A resolved NetworkPolicy (``stockade.model.netpol``) governs pods by name, not by label set, so
it is compiled per host as a layer over the label-set rules, with the IR every backend already
renders (no backend learns a new action):

* a direction some NetworkPolicy isolates on the host loses Stockade's ``allow`` and ``deny``
  rules of that direction (override-deny stays: it still comes first);
* each NetworkPolicy rule that targets the host becomes an ``allow`` rule
  (``netpol/<ns>/<name>/<direction>/<i>``) to an address set of its peers: the peer pods'
  addresses plus its ipBlocks minus their excepts, named by a hash of the policy, direction,
  rule index and resolved ports, so a pod joining or leaving the peers is a set delta;
* the isolated direction ends in a ``deny`` of every address (``netpol/<ns>/<name>/<direction>``).

First-match order in the IR (override-deny > allow > deny > mode default) is then exactly the
evaluator's order (override-deny, then NetworkPolicy for isolated directions).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.model.addresses import AddressRanges, Family, IPAddress, merge_ranges
from stockade.model.netpol import KubeNetworkPolicy, NetpolDirection, NetpolRule
from stockade.model.rules import Action
from stockade.model.services import ANY_SERVICE_ENTRY
from stockade.model.workloads import Workload

ALL_ADDRESSES = "k" + hashlib.sha256(b"netpol:every-address").hexdigest()[:12]
_ALL_SETS = (
    AddressSet(ALL_ADDRESSES, Family.V4, (ipaddress.IPv4Network("0.0.0.0/0"),), "every address"),
    AddressSet(ALL_ADDRESSES, Family.V6, (ipaddress.IPv6Network("::/0"),), "every address"),
)
_DIRECTION = {NetpolDirection.INGRESS: Direction.INBOUND, NetpolDirection.EGRESS: Direction.OUTBOUND}


def netpol_set_name(np: KubeNetworkPolicy, rule: NetpolRule) -> str:
    """Stable name of a rule's peer set: changes with the rule's identity, never with its members."""
    ports = ",".join(str(e) for e in rule.services)
    key = f"netpol:{np.namespace}/{np.name}/{rule.direction.value}/{rule.index}/{ports}"
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:12]


class _PeerSet:
    __slots__ = ("canonical", "cidrs", "workloads")

    def __init__(self, workloads: frozenset[str], cidrs: AddressRanges, canonical: str) -> None:
        self.workloads, self.cidrs, self.canonical = workloads, cidrs, canonical


class NetpolLayer:
    """The NetworkPolicy part of every host's policy, indexed by host and by peer workload."""

    def __init__(self, policies: Iterable[KubeNetworkPolicy]) -> None:
        self._iso: dict[str, dict[Direction, set[str]]] = {}  # host -> direction -> isolating ids
        self.allows: dict[str, set[HostRule]] = defaultdict(set)
        self.peer_sets: dict[str, _PeerSet] = {}
        self.sets_of_workload: dict[str, set[str]] = defaultdict(set)
        self.hosts_of_set: dict[str, set[str]] = defaultdict(set)
        self._cache: dict[str, tuple[AddressSet, AddressSet]] = {}
        for np in policies:
            self.add(np)

    @property
    def active(self) -> bool:
        return bool(self._iso)

    def isolation(self, host: str) -> dict[Direction, str]:
        """The isolated directions of ``host`` and the id of the first isolating policy of each."""
        return {d: min(ids) for d, ids in self._iso.get(host, {}).items() if ids}

    def _contributions(self, np: KubeNetworkPolicy) -> Iterable[tuple[NetpolRule, str, HostRule]]:
        for r in np.rules:
            if not r.services or not np.isolates(r.direction):
                continue
            peer = ALL_ADDRESSES if r.any_peer else netpol_set_name(np, r)
            yield r, peer, HostRule(Action.ALLOW, _DIRECTION[r.direction], np.rule_id(r.direction, r.index), peer,
                                    r.services)

    def add(self, np: KubeNetworkPolicy) -> None:
        """Add one policy's isolation, allow rules and peer sets (incremental: O(its size))."""
        for d in NetpolDirection:
            if np.isolates(d):
                rid = np.isolation_id(d)
                for host in np.selected:
                    self._iso.setdefault(host, {}).setdefault(_DIRECTION[d], set()).add(rid)
        for r, peer, rule in self._contributions(np):
            if peer != ALL_ADDRESSES and peer not in self.peer_sets:
                canonical = f"netpol({np.namespace}/{np.name} {r.direction.value}[{r.index}])"
                self.peer_sets[peer] = _PeerSet(r.peer_workloads, r.peer_cidrs, canonical)
                for w in r.peer_workloads:
                    self.sets_of_workload[w].add(peer)
            for host in r.targets & np.selected:
                self.allows[host].add(rule)
                self.hosts_of_set[peer].add(host)

    def remove(self, np: KubeNetworkPolicy) -> None:
        """Undo :meth:`add` of the same policy value."""
        for d in NetpolDirection:
            if np.isolates(d):
                rid = np.isolation_id(d)
                for host in np.selected:
                    by_dir = self._iso.get(host, {})
                    ids = by_dir.get(_DIRECTION[d], set())
                    ids.discard(rid)
                    if not ids:
                        by_dir.pop(_DIRECTION[d], None)
                    if not by_dir:
                        self._iso.pop(host, None)
        for r, peer, rule in self._contributions(np):
            for host in r.targets & np.selected:
                self.allows[host].discard(rule)
                if not self.allows[host]:
                    del self.allows[host]
                self.hosts_of_set[peer].discard(host)
            if peer != ALL_ADDRESSES and peer in self.peer_sets:
                ps = self.peer_sets.pop(peer)
                self._cache.pop(peer, None)
                self.hosts_of_set.pop(peer, None)
                for w in ps.workloads:
                    self.sets_of_workload[w].discard(peer)

    def replace(self, old: KubeNetworkPolicy | None, new: KubeNetworkPolicy | None) -> None:
        """Swap one policy; a peer set whose members did not change keeps its computed addresses."""
        kept: dict[str, tuple[_PeerSet, tuple[AddressSet, AddressSet]]] = {}
        if old is not None:
            for _, peer, _ in self._contributions(old):
                cached = self._cache.get(peer)
                if cached is not None and peer in self.peer_sets:
                    kept[peer] = (self.peer_sets[peer], cached)
            self.remove(old)
        if new is not None:
            self.add(new)
            for peer, (ps, cached) in kept.items():
                now = self.peer_sets.get(peer)
                if now is not None and now.workloads == ps.workloads and now.cidrs == ps.cidrs:
                    self._cache[peer] = cached

    def affects(self, host: str) -> bool:
        return host in self._iso

    def hosts_referencing(self, workloads: Iterable[str]) -> set[str]:
        """Hosts whose peer sets contain any of ``workloads`` (their addresses are members)."""
        found: set[str] = set()
        for w in workloads:
            for s in self.sets_of_workload.get(w, ()):
                found |= self.hosts_of_set[s]
        return found

    def sets_of(self, workloads: Iterable[str]) -> set[str]:
        return {s for w in workloads for s in self.sets_of_workload.get(w, ())}

    def forget(self, set_names: Iterable[str]) -> None:
        for s in set_names:
            self._cache.pop(s, None)

    def address_sets(self, name: str, addresses: Callable[[str], tuple[IPAddress, ...]]) -> tuple[AddressSet, ...]:
        if name == ALL_ADDRESSES:
            return _ALL_SETS
        found = self._cache.get(name)
        if found is None:
            ps = self.peer_sets[name]
            v4: list[tuple[int, int]] = list(ps.cidrs.v4)
            v6: list[tuple[int, int]] = list(ps.cidrs.v6)
            for w in ps.workloads:
                for a in addresses(w):
                    value = int(a)
                    (v4 if a.version == 4 else v6).append((value, value))
            ranges = AddressRanges(merge_ranges(v4), merge_ranges(v6))
            found = (
                AddressSet(name, Family.V4, ranges.networks(Family.V4), ps.canonical),
                AddressSet(name, Family.V6, ranges.networks(Family.V6), ps.canonical),
            )
            self._cache[name] = found
        return found

    def apply(self, hp: HostPolicy, addresses: Callable[[str], tuple[IPAddress, ...]]) -> HostPolicy:
        """``hp`` (label rules only) with this layer added for its workload."""
        isolated = self.isolation(hp.workload)
        if not isolated:
            return hp
        rules = [r for r in hp.rules if r.action is Action.OVERRIDE_DENY or r.direction not in isolated]
        rules += self.allows.get(hp.workload, ())
        rules += [HostRule(Action.DENY, d, rid, ALL_ADDRESSES, (ANY_SERVICE_ENTRY,)) for d, rid in isolated.items()]
        names = {r.peer for r in rules}
        sets = [s for s in hp.sets if s.name in names]
        for name in sorted(names - {s.name for s in sets}):
            sets += self.address_sets(name, addresses)
        return HostPolicy(
            workload=hp.workload,
            mode=hp.mode,
            local_addresses=hp.local_addresses,
            rules=tuple(sorted(set(rules))),
            sets=tuple(sorted(sets, key=lambda s: (s.name, s.family.value))),
            failsafe=hp.failsafe,
            # the tunnel stays: a peer whose own side still encrypts sends through it, and the
            # NetworkPolicy then decides on what arrives (as the evaluator does)
            wireguard=hp.wireguard,
            backend=hp.backend,
        )


def addresses_from(workloads: Mapping[str, Workload]) -> Callable[[str], tuple[IPAddress, ...]]:
    def addresses(name: str) -> tuple[IPAddress, ...]:
        w = workloads.get(name)
        return w.addresses if w is not None else ()

    return addresses
