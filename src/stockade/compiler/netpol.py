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

    def __init__(self, policies: Iterable[KubeNetworkPolicy], previous: NetpolLayer | None = None) -> None:
        self.isolation: dict[str, dict[Direction, str]] = defaultdict(dict)
        self.allows: dict[str, list[HostRule]] = defaultdict(list)
        self.peer_sets: dict[str, _PeerSet] = {}
        self.sets_of_workload: dict[str, set[str]] = defaultdict(set)
        self.hosts_of_set: dict[str, set[str]] = defaultdict(set)
        self._cache: dict[str, tuple[AddressSet, AddressSet]] = {}
        for np in policies:
            for d in NetpolDirection:
                if np.isolates(d):
                    rid = np.isolation_id(d)
                    for host in np.selected:
                        have = self.isolation[host].get(_DIRECTION[d])
                        if have is None or rid < have:
                            self.isolation[host][_DIRECTION[d]] = rid
            for r in np.rules:
                if not r.services or not np.isolates(r.direction):
                    continue
                if r.any_peer:
                    peer = ALL_ADDRESSES
                else:
                    peer = netpol_set_name(np, r)
                    if peer not in self.peer_sets:
                        canonical = f"netpol({np.namespace}/{np.name} {r.direction.value}[{r.index}])"
                        self.peer_sets[peer] = _PeerSet(r.peer_workloads, r.peer_cidrs, canonical)
                        for w in r.peer_workloads:
                            self.sets_of_workload[w].add(peer)
                rule = HostRule(Action.ALLOW, _DIRECTION[r.direction], np.rule_id(r.direction, r.index), peer,
                                r.services)
                for host in r.targets & np.selected:
                    self.allows[host].append(rule)
                    self.hosts_of_set[peer].add(host)
        if previous is not None:  # peer sets that did not change keep their computed members
            for name, ps in self.peer_sets.items():
                old = previous.peer_sets.get(name)
                cached = previous._cache.get(name)
                if cached is not None and old is not None and old.workloads == ps.workloads and old.cidrs == ps.cidrs:
                    self._cache[name] = cached

    def affects(self, host: str) -> bool:
        return host in self.isolation

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
        isolated = self.isolation.get(hp.workload)
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
        )


def addresses_from(workloads: Mapping[str, Workload]) -> Callable[[str], tuple[IPAddress, ...]]:
    def addresses(name: str) -> tuple[IPAddress, ...]:
        w = workloads.get(name)
        return w.addresses if w is not None else ()

    return addresses
