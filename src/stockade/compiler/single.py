"""One host's policy without compiling the fleet (``compile_host``): the reference path for a
single host (``stockade render``, ``explain``), equal to the incremental compiler's answer.

Split from :mod:`stockade.compiler.compile` (the incremental ``Compiler``), whose helpers it shares.
"""

from __future__ import annotations

from stockade.compiler.compile import _bulk_allocation
from stockade.compiler.expand import expand_rules, set_name
from stockade.compiler.index import LabelIndex
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.compiler.members import MemberSet
from stockade.compiler.netpol import NetpolLayer, addresses_from
from stockade.compiler.wireguard import config_for
from stockade.errors import NotFoundError
from stockade.model.addresses import Family
from stockade.model.policy import Policy
from stockade.model.selectors import AllWorkloads, IPListSelector, LabelSelector, Selector
from stockade.model.workloads import EnforcementMode, Workload


def _ints(w: Workload, version: int) -> list[int]:
    return [int(a) for a in w.addresses if a.version == version]


def _set_key(s: AddressSet) -> tuple[str, int]:
    return s.name, s.family.value


def compile_host(policy: Policy, workload: str) -> HostPolicy:
    """One host's policy without compiling the fleet: only its rules and the sets they reference.

    Gives exactly ``Compiler(policy).host_policy(workload)`` (a property test checks it).
    """
    w = next((x for x in policy.workloads if x.name == workload), None)
    if w is None:
        raise NotFoundError(f"no workload named {workload!r}")
    groups = policy.group_map()

    def selects(sel: Selector) -> bool:
        if isinstance(sel, AllWorkloads):
            return True
        return isinstance(sel, LabelSelector) and sel.matches(w.labels, groups)

    with _bulk_allocation():
        rules: set[HostRule] = set()
        peers: dict[str, Selector] = {}
        encrypted: set[str] = set()
        for r in expand_rules(policy):
            for direction, mine, theirs in (
                (Direction.INBOUND, r.providers, r.consumers),
                (Direction.OUTBOUND, r.consumers, r.providers),
            ):
                if any(selects(sel) for sel in mine):
                    for peer in theirs:
                        name = set_name(peer)
                        peers[name] = peer
                        rules.add(HostRule(r.action, direction, r.rule_id, name, r.services, r.encrypt))
                        if r.encrypt:
                            encrypted.add(name)
        index = LabelIndex()
        by_name = {x.name: x for x in policy.workloads}
        for x in policy.workloads:
            index.add(x.name, x.labels)
        iplists = policy.ip_list_map()
        sets: list[AddressSet] = []
        for name, sel in peers.items():
            if isinstance(sel, IPListSelector):
                iplist = iplists.get(sel.ip_list)
                if iplist is None:
                    raise NotFoundError(f"unknown IP list {sel.ip_list!r}")
                ranges = iplist.ranges()
                v4n, v6n = ranges.networks(Family.V4), ranges.networks(Family.V6)
            else:
                members = [by_name[m] for m in index.members(sel, groups)]
                v4n = MemberSet(Family.V4, (a for m in members for a in _ints(m, 4))).networks()
                v6n = MemberSet(Family.V6, (a for m in members for a in _ints(m, 6))).networks()
            canonical = sel.canonical()
            sets += [AddressSet(name, Family.V4, v4n, canonical), AddressSet(name, Family.V6, v6n, canonical)]
        wireguard = None
        if encrypted and w.mode is not EnforcementMode.IDLE:
            tunnel_peers = {m for name in encrypted for m in index.members(peers[name], groups)}
            wireguard = config_for(w, (by_name[m] for m in tunnel_peers))
    hp = HostPolicy(
        workload=w.name,
        mode=w.mode,
        local_addresses=w.addresses,
        rules=tuple(sorted(rules)),
        sets=tuple(sorted(sets, key=_set_key)),
        failsafe=policy.failsafe,
        wireguard=wireguard,
        backend=w.backend,
    )
    if policy.network_policies:
        hp = NetpolLayer(policy.network_policies).apply(hp, addresses_from(by_name))
    return hp
