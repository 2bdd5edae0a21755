"""Random, valid HostPolicies of a chosen size: the prover's test and benchmark inputs.

Seeded (``random.Random``), so a failing case is replayed from its seed. The policies use
every construct the renderers emit: the three precedence tiers in both directions, TCP/UDP
ports and ranges, whole protocols, ICMP and ICMPv6 types, ``any``, overlapping rules,
single-address and CIDR set members in both families, empty sets, a controller path and
management ports, and every enforcing mode.
"""

from __future__ import annotations

import ipaddress
import random

from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, WireGuardConfig
from stockade.model.addresses import Family, IPNetwork, merge_ranges, network_range, ranges_to_networks
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

MODES = (EnforcementMode.FULL, EnforcementMode.FULL, EnforcementMode.SELECTIVE, EnforcementMode.VISIBILITY)


def _service(rng: random.Random, ports: tuple[int, ...]) -> ServiceEntry:
    roll = rng.random()
    if roll < 0.55:
        proto = rng.choice((Proto.TCP, Proto.UDP))
        lo = rng.choice(ports)
        hi = lo if rng.random() < 0.7 else min(65535, lo + rng.randint(1, 40))
        return ServiceEntry(proto, lo, hi)
    if roll < 0.65:
        return ServiceEntry(rng.choice((Proto.TCP, Proto.UDP)))
    if roll < 0.75:
        return ServiceEntry(Proto.ICMP, *((8, 8) if rng.random() < 0.7 else (None, None)))
    if roll < 0.85:
        return ServiceEntry(Proto.ICMPV6, *((128, 129) if rng.random() < 0.7 else (None, None)))
    if roll < 0.9:
        return ServiceEntry(Proto.ANY)
    lo = rng.randint(1024, 60000)
    return ServiceEntry(Proto.TCP, lo, lo + rng.randint(0, 500))


def _members(rng: random.Random, family: Family, count: int, pool: list[int]) -> tuple[IPNetwork, ...]:
    bits = 32 if family is Family.V4 else 128
    ranges = []
    for _ in range(count):
        if rng.random() < 0.9:
            a = rng.choice(pool)
            ranges.append((a, a))
        else:
            plen = rng.randint(bits - 12, bits - 2) if family is Family.V4 else rng.randint(64, 120)
            net = ipaddress.ip_network((rng.choice(pool), plen), strict=False)
            ranges.append(network_range(net))
    return ranges_to_networks(merge_ranges(ranges), family)


def random_host_policy(
    rng: random.Random,
    *,
    rules: int = 8,
    peers: int = 6,
    sets: int = 4,
    local_v4: str = "10.78.0.1",
    local_v6: str = "fd78::1",
    extra_peers: tuple[str, ...] = (),
    mode: EnforcementMode | None = None,
    identities: int | None = None,
    encrypted: float = 0.0,
) -> HostPolicy:
    """A random HostPolicy with ``rules`` rules over ``sets`` peer sets holding ~``peers`` members.

    ``identities``: the peers are split into that many groups (workloads sharing labels, as
    the compiler's label index sees them) and each set is the union of one to three groups, as
    selectors make them; without it every set draws its members from all peers at random
    (the worst case for the prover: almost every address in its own combination of sets).
    ``encrypted``: the share of allow rules that encrypt (with a WireGuard config when any does)."""
    v4_base = int(ipaddress.IPv4Address("10.0.0.0"))
    v6_base = int(ipaddress.IPv6Address("fd00::"))
    pool4 = [v4_base + rng.randrange(1 << 24) for _ in range(max(4, peers))]
    pool6 = [v6_base + rng.randrange(1 << 40) for _ in range(max(4, peers))]
    for p in extra_peers:
        a = ipaddress.ip_address(p)
        (pool4 if a.version == 4 else pool6).append(int(a))
    ports = tuple(sorted({rng.randint(1, 1024) for _ in range(8)} | {80, 443, 53}))
    names = [f"p{i:04d}" for i in range(sets)]
    per_set = max(1, peers // max(1, sets))
    address_sets: list[AddressSet] = []
    if identities:
        groups4 = [pool4[i::identities] for i in range(identities)]
        groups6 = [pool6[i::identities] for i in range(identities)]
        for name in names:
            picks = rng.sample(range(identities), min(identities, rng.randint(1, 3)))
            for fam, groups in ((Family.V4, groups4), (Family.V6, groups6)):
                ranges = [(a, a) for g in picks for a in groups[g]]
                address_sets.append(AddressSet(name, fam, ranges_to_networks(merge_ranges(ranges), fam)))
        names_iter: list[str] = []
    else:
        names_iter = names
    for name in names_iter:
        n4 = rng.randint(0, 2 * per_set)
        n6 = rng.randint(0, 2 * per_set)
        address_sets.append(AddressSet(name, Family.V4, _members(rng, Family.V4, n4, pool4)))
        address_sets.append(AddressSet(name, Family.V6, _members(rng, Family.V6, n6, pool6)))
    host_rules = []
    for i in range(rules):
        roll = rng.random()
        action = Action.ALLOW if roll < 0.6 else Action.DENY if roll < 0.85 else Action.OVERRIDE_DENY
        direction = Direction.INBOUND if rng.random() < 0.6 else Direction.OUTBOUND
        services = tuple(sorted({_service(rng, ports) for _ in range(rng.randint(1, 3))}))
        rule_id = f"ruleset/r{i}/0" if action is Action.ALLOW else f"deny/d{i}"
        encrypt = bool(encrypted) and action is Action.ALLOW and rng.random() < encrypted
        host_rules.append(HostRule(action, direction, rule_id, rng.choice(names), services, encrypt))
    controller: tuple[IPNetwork, ...] = ()
    if rng.random() < 0.7:
        controller = (ipaddress.ip_network(f"10.79.{rng.randint(0, 255)}.{rng.randint(1, 254)}/32"),)
        if rng.random() < 0.3:
            controller += (ipaddress.ip_network("fd79::/120"),)
    management = tuple(sorted({ServiceEntry(Proto.TCP, 22, 22), *(
        [ServiceEntry(Proto.TCP, 2222, 2222)] if rng.random() < 0.3 else []
    )}))
    return HostPolicy(
        workload=f"w{rng.randrange(1000)}",
        mode=mode or rng.choice(MODES),
        local_addresses=(ipaddress.ip_address(local_v4), ipaddress.ip_address(local_v6)),
        rules=tuple(sorted(host_rules)),
        sets=tuple(sorted(address_sets)),
        failsafe=Failsafe(controller, rng.choice((8443, 443, 9000)), management),
        wireguard=WireGuardConfig(51820, ()) if any(r.encrypt for r in host_rules) else None,
    )
