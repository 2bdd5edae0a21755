"""Proposed labels: imported address groups become label values, so imported policy is label-based.

A peer address group (an ipset, an nft set, a ``-s a,b,c`` list, a Windows remote-address list)
made only of single host addresses is a candidate. Each address belongs to an owner: the
imported host that has it, or a new idle ``peer-...`` workload (no agent, so it enforces
nothing). Owners that appear in exactly the same groups ("addresses that always appear
together") share one ``group=`` label value; a group of several values becomes a label group.

A label selector means every address of every workload carrying the label, so a group is only
label-ized when it holds all of each owner's addresses. A label also gives the *peer* side a rule:
an allow with an imported host as peer would add an allow to that host's own policy, so it is
label-based only when that host allows everything in that direction anyway; otherwise the rule
keeps an IP list (reported). Groups of networks, or of more than ``MAX_GROUP`` addresses, stay IP lists.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stockade.codec.syntax import non_host_address
from stockade.importers.chains import Direction
from stockade.importers.report import Finding, Origin, Outcome
from stockade.model.addresses import AddressRanges, Family, IPAddress
from stockade.model.labels import Label, LabelGroup
from stockade.model.selectors import LabelSelector
from stockade.model.workloads import EnforcementMode, Interface, Workload

if TYPE_CHECKING:
    from stockade.importers.translate import Emitted

MAX_GROUP = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_name(text: str, prefix: str = "x") -> str:
    """``text`` as a Stockade object name (1-63 of ``A-Za-z0-9_.-``, starting alphanumeric); cut with a hash."""
    clean = _UNSAFE.sub("-", text).strip("-._") or prefix
    if not clean[0].isalnum():
        clean = f"{prefix}-{clean}"
    if len(clean) > 63:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        clean = f"{clean[:54]}-{digest}"
    return clean

GroupKey = tuple[Family, AddressRanges]


@dataclass
class Proposal:
    selectors: dict[GroupKey, LabelSelector] = field(default_factory=dict)
    members: dict[GroupKey, frozenset[str]] = field(default_factory=dict)  # group -> owners
    host_labels: dict[str, set[Label]] = field(default_factory=dict)
    peer_workloads: list[Workload] = field(default_factory=list)
    label_groups: list[LabelGroup] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    proposed: tuple[tuple[str, tuple[str, ...]], ...] = ()
    open_dirs: Mapping[str, frozenset[Direction]] = field(default_factory=dict)
    hosts: frozenset[str] = frozenset()

    def allow_ok(self, family: Family, ranges: AddressRanges | None, direction: Direction) -> bool:
        """May an allow at a host (``direction``) name this group by label without widening a peer host?"""
        if ranges is None:
            return False
        needed = Direction.OUTBOUND if direction is Direction.INBOUND else Direction.INBOUND
        owners = self.members.get((family, ranges), frozenset())
        return all(needed in self.open_dirs.get(o, frozenset()) for o in owners if o in self.hosts)


def _peer_name(address: IPAddress) -> str:
    return "peer-" + str(address).replace(":", "-")


def propose_labels(peers: Sequence[tuple[Emitted, str]], host_addresses: Mapping[str, tuple[IPAddress, ...]],
                   open_dirs: Mapping[str, frozenset[Direction]]) -> Proposal:
    owner_of = {a: h for h, addrs in host_addresses.items() for a in addrs}
    groups: dict[GroupKey, tuple[str, ...]] = {}
    origins: dict[GroupKey, Origin] = {}
    for e, _host in peers:
        if e.match.peer is not None:
            key = (e.match.family, e.match.peer)
            groups.setdefault(key, e.match.peer_names)
            origins.setdefault(key, e.origin)
    prop = Proposal(open_dirs=open_dirs, hosts=frozenset(host_addresses))
    owners_of_group: dict[GroupKey, frozenset[str]] = {}
    owner_addresses: dict[str, set[IPAddress]] = defaultdict(set)
    for key in sorted(groups, key=lambda k: (k[0].value, k[1])):
        family, ranges = key
        nets = ranges.networks(family)
        # single addresses (adjacent ones merge into small blocks: /31, /30); larger blocks are networks
        if len(nets) > MAX_GROUP or any(n.prefixlen < family.bits - 2 for n in nets):
            continue
        addrs = [a for n in nets for a in (n if n.prefixlen < family.bits else [n.network_address])]
        if len(addrs) > MAX_GROUP:
            continue
        if any(non_host_address(a) for a in addrs):
            continue
        owners: set[str] = set()
        whole = True
        for a in addrs:
            owner = owner_of.get(a, _peer_name(a))
            owners.add(owner)
            owner_addresses[owner].add(a)
            if owner in host_addresses and not set(host_addresses[owner]) <= set(addrs):
                whole = False
        if not whole:
            prop.findings.append(Finding(Outcome.APPROXIMATED, origins[key], "", f"address group {_short(nets)}",
                                         "holds some but not all addresses of an imported host: kept as an IP list"))
            continue
        owners_of_group[key] = frozenset(owners)
    signature: dict[str, frozenset[GroupKey]] = defaultdict(frozenset)
    for key, group_owners in owners_of_group.items():
        for o in group_owners:
            signature[o] = signature[o] | {key}
    atoms: dict[frozenset[GroupKey], list[str]] = defaultdict(list)
    for owner, sig in signature.items():
        atoms[sig].append(owner)
    value_of: dict[str, str] = {}
    used: set[str] = set()
    proposed: list[tuple[str, tuple[str, ...]]] = []
    for sig, atom in sorted(atoms.items(), key=lambda kv: sorted(kv[1])):
        atom.sort()
        exact = [k for k in sig if owners_of_group[k] == frozenset(atom) and len(groups[k]) == 1]
        if exact:
            base = groups[exact[0]][0]
        elif len(atom) == 1:
            base = atom[0].removeprefix("peer-")
        else:
            base = "g-" + hashlib.sha256(",".join(atom).encode()).hexdigest()[:8]
        value = safe_name(base, "g")
        while value in used:
            value = safe_name(value + "-x", "g")
        used.add(value)
        for o in atom:
            value_of[o] = value
        shown = tuple(str(a) for o in atom for a in sorted(owner_addresses[o], key=lambda a: (a.version, int(a))))
        proposed.append((f"group={value}", shown))
    prop.proposed = tuple(proposed)
    for owner, value in sorted(value_of.items()):
        label = Label("group", value)
        if owner in host_addresses:
            prop.host_labels.setdefault(owner, set()).add(label)
        else:
            own = tuple(sorted(owner_addresses[owner], key=lambda a: (a.version, int(a))))
            prop.peer_workloads.append(Workload(owner, frozenset({label}), (Interface("imported", own),),
                                                EnforcementMode.IDLE, "nftables",
                                                "imported peer address (no agent: idle)"))
    lg_used: set[str] = set()
    for key, members in sorted(owners_of_group.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        values = frozenset(value_of[o] for o in members)
        prop.members[key] = members
        if len(values) == 1:
            prop.selectors[key] = LabelSelector((Label("group", next(iter(values))),))
            continue
        names = groups[key]
        base = safe_name(names[0], "lg") if len(names) == 1 else \
            "lg-" + hashlib.sha256(",".join(sorted(values)).encode()).hexdigest()[:8]
        name = base
        while name in lg_used:
            name = safe_name(name + "-x", "lg")
        lg_used.add(name)
        prop.label_groups.append(LabelGroup(name, "group", values))
        prop.selectors[key] = LabelSelector((), (name,))
    return prop


def _short(nets: Sequence[object]) -> str:
    text = ", ".join(str(n) for n in nets[:4])
    return text + (f" (+{len(nets) - 4})" if len(nets) > 4 else "")
