"""Host policies covering every nftables rule shape and mode, built directly (no compiler).

Shared by the golden test (render -> checked-in ``.nft``) and the kernel test (apply each
case in a namespace, then ``verify`` must report nothing).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.model.addresses import Family, IPNetwork
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

ALLOW, DENY, OVERRIDE = Action.ALLOW, Action.DENY, Action.OVERRIDE_DENY
IN, OUT = Direction.INBOUND, Direction.OUTBOUND
FULL, SELECTIVE = EnforcementMode.FULL, EnforcementMode.SELECTIVE
VISIBILITY, IDLE = EnforcementMode.VISIBILITY, EnforcementMode.IDLE


def tcp(first: int | None = None, last: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.TCP, first, last if last is not None else first)


def udp(first: int | None = None, last: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.UDP, first, last if last is not None else first)


def icmp(t: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.ICMP, t, t)


def icmp6(t: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.ICMPV6, t, t)


ANY = ServiceEntry(Proto.ANY)


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def peer(name: str, *members: str) -> tuple[AddressSet, AddressSet]:
    """Both families of one peer set; members sorted as the compiler emits them."""
    ms = nets(*members)
    v4 = tuple(sorted(m for m in ms if m.version == 4))
    v6 = tuple(sorted(m for m in ms if m.version == 6))
    return AddressSet(name, Family.V4, v4, f"sel:{name}"), AddressSet(name, Family.V6, v6, f"sel:{name}")


@dataclass(frozen=True)
class Case:
    name: str
    policy: HostPolicy
    forward: bool = False
    table: str = "stockade"
    log_group: int = 100
    notes: str = field(default="", compare=False)


def host(
    mode: EnforcementMode,
    rules: list[HostRule],
    sets: list[tuple[AddressSet, AddressSet]],
    failsafe: Failsafe | None = None,
    local: tuple[str, ...] = ("10.0.0.10", "fd00::10"),
) -> HostPolicy:
    return HostPolicy(
        workload="web-1",
        mode=mode,
        local_addresses=tuple(ipaddress.ip_address(a) for a in local),
        rules=tuple(rules),
        sets=tuple(sorted(s for pair in sets for s in pair)),
        failsafe=failsafe or Failsafe(),
    )


WEB = peer("pweb00000001", "10.0.0.11", "10.0.0.12/31", "fd00::11")
DB = peer("pdb000000002", "10.0.1.20", "fd00:1::20")
BAD = peer("pbad00000003", "192.0.2.0/24", "2001:db8::/32")
CORP = peer("pcorp0000004", "10.0.0.0/8", "172.16.0.0/12", "10.0.0.1", "fd00::/48")
EMPTY = peer("pnone0000005")
V6 = peer("pv6000000006", "fd00:2::1", "fd00:2::2", "fd00:3::/64")

CASES: tuple[Case, ...] = (
    Case(
        "full_basic",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/shop/0", WEB[0].name, (tcp(80),)),
                HostRule(ALLOW, OUT, "ruleset/shop/1", DB[0].name, (tcp(5432),)),
            ],
            [WEB, DB],
        ),
    ),
    Case(
        "selective",
        host(
            SELECTIVE,
            [
                HostRule(ALLOW, IN, "ruleset/shop/0", WEB[0].name, (tcp(80),)),
                HostRule(DENY, IN, "deny/no-corp-ssh-alt", CORP[0].name, (tcp(2222),)),
            ],
            [WEB, CORP],
        ),
    ),
    Case(
        "visibility",
        host(
            VISIBILITY,
            [
                HostRule(OVERRIDE, IN, "deny/quarantine", BAD[0].name, (ANY,)),
                HostRule(ALLOW, IN, "ruleset/shop/0", WEB[0].name, (tcp(80), tcp(443))),
                HostRule(DENY, OUT, "deny/no-db-from-web", DB[0].name, (tcp(5432),)),
            ],
            [BAD, WEB, DB],
        ),
    ),
    Case("idle", host(IDLE, [HostRule(ALLOW, IN, "ruleset/shop/0", WEB[0].name, (tcp(80),))], [WEB])),
    Case(
        "override_deny",
        host(
            FULL,
            [
                HostRule(OVERRIDE, IN, "deny/quarantine", BAD[0].name, (ANY,)),
                HostRule(OVERRIDE, OUT, "deny/quarantine-out", BAD[0].name, (tcp(25), udp(53))),
                HostRule(ALLOW, IN, "ruleset/shop/0", CORP[0].name, (tcp(443),)),
            ],
            [BAD, CORP],
        ),
    ),
    Case(
        "deny_crossed_by_allow",
        host(
            SELECTIVE,
            [
                HostRule(
                    ALLOW,
                    IN,
                    "ruleset/ops/0",
                    WEB[0].name,
                    (
                        tcp(22, 22),
                        tcp(3306),
                    ),
                ),
                HostRule(DENY, IN, "deny/corp-db", CORP[0].name, (tcp(3306), udp(3306))),
                HostRule(DENY, OUT, "deny/corp-out", CORP[0].name, (ANY,)),
            ],
            [WEB, CORP],
        ),
    ),
    Case(
        "port_ranges",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/apps/0", WEB[0].name, (tcp(8000, 8080), udp(5000, 5100))),
                HostRule(ALLOW, OUT, "ruleset/apps/1", DB[0].name, (tcp(1, 65535),)),
            ],
            [WEB, DB],
        ),
    ),
    Case(
        "port_sets",
        host(
            FULL,
            [
                HostRule(
                    ALLOW,
                    IN,
                    "ruleset/web/0",
                    WEB[0].name,
                    (tcp(80), tcp(81), tcp(443), tcp(8443), tcp(9000, 9010), tcp(9005, 9020), udp(53), udp(123)),
                ),
            ],
            [WEB],
        ),
    ),
    Case(
        "icmp_types",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/ping/0", WEB[0].name, (icmp(8), icmp(13), icmp6(128), icmp6(200))),
                HostRule(ALLOW, OUT, "ruleset/ping/1", DB[0].name, (icmp(), icmp6())),
                HostRule(ALLOW, IN, "ruleset/ping/2", CORP[0].name, (icmp(8), tcp(22))),
            ],
            [WEB, DB, CORP],
        ),
    ),
    Case(
        "any_service",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/trust/0", CORP[0].name, (ANY,)),
                HostRule(ALLOW, OUT, "ruleset/trust/1", CORP[0].name, (ANY, tcp(80))),
                HostRule(ALLOW, IN, "ruleset/trust/2", WEB[0].name, (tcp(),)),
                HostRule(ALLOW, IN, "ruleset/trust/3", DB[0].name, (udp(), tcp(5432))),
            ],
            [CORP, WEB, DB],
        ),
    ),
    Case(
        "empty_sets",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/none/0", EMPTY[0].name, (tcp(80),)),
                HostRule(DENY, OUT, "deny/none", EMPTY[0].name, (ANY,)),
            ],
            [EMPTY],
        ),
    ),
    Case(
        "ip_list_peers",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/corp/0", CORP[0].name, (tcp(22), tcp(443))),
                HostRule(OVERRIDE, OUT, "deny/docs", BAD[0].name, (ANY,)),
            ],
            [CORP, BAD],
        ),
    ),
    Case(
        "v6_only",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/v6/0", V6[0].name, (tcp(80), icmp6(128))),
                HostRule(ALLOW, OUT, "ruleset/v6/1", V6[0].name, (udp(53),)),
            ],
            [V6],
            Failsafe(controller=nets("fd00:ff::1")),
            local=("fd00::10",),
        ),
    ),
    Case(
        "controller_failsafe",
        host(
            FULL,
            [HostRule(ALLOW, OUT, "ruleset/shop/1", DB[0].name, (tcp(5432),))],
            [DB],
            Failsafe(
                controller=nets("10.9.0.1", "10.9.0.2", "10.9.0.3", "10.10.0.0/16", "fd00:ff::1"),
                controller_port=9443,
            ),
        ),
    ),
    Case(
        "management_ports",
        host(
            FULL,
            [HostRule(ALLOW, IN, "ruleset/shop/0", WEB[0].name, (tcp(80),))],
            [WEB],
            Failsafe(management=(tcp(22), tcp(2222, 2223), udp(161), icmp(8), icmp6(128))),
        ),
    ),
    Case(
        "no_management",
        host(SELECTIVE, [HostRule(DENY, IN, "deny/all-web", WEB[0].name, (ANY,))], [WEB], Failsafe(management=())),
    ),
    Case(
        "forward",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/k8s/0", WEB[0].name, (tcp(8080),)),
                HostRule(ALLOW, OUT, "ruleset/k8s/1", DB[0].name, (tcp(5432),)),
            ],
            [WEB, DB],
            local=("10.244.1.5", "10.244.1.6", "fd00:244::5"),
        ),
        forward=True,
    ),
    Case(
        "custom_table_log_group",
        host(VISIBILITY, [HostRule(DENY, IN, "deny/x", WEB[0].name, (udp(514),))], [WEB]),
        table="stk_lab",
        log_group=7,
    ),
)


def sctp(first: int | None = None, last: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.SCTP, first, last if last is not None else first)


# SCTP (NetworkPolicy's third protocol): the netfilter backends and F5 express it; eBPF,
# Windows Firewall and ipfilter refuse it (fail closed), so these cases are kept apart.
SCTP_CASES: tuple[Case, ...] = (
    Case(
        "sctp_ports",
        host(
            FULL,
            [
                HostRule(OVERRIDE, IN, "deny/bad-sctp", BAD[0].name, (sctp(),)),
                HostRule(ALLOW, IN, "netpol/x/diameter/ingress/0", WEB[0].name, (sctp(3868), tcp(3868))),
                HostRule(ALLOW, IN, "netpol/x/m3ua/ingress/0", DB[0].name, (sctp(2905, 2910), sctp(9900), udp(53))),
                HostRule(ALLOW, IN, "ruleset/any/0", CORP[0].name, (ANY,)),
                HostRule(DENY, IN, "deny/sctp-range", CORP[0].name, (sctp(1, 1023),)),
                HostRule(ALLOW, OUT, "netpol/x/diameter/egress/0", DB[0].name, (sctp(3868),)),
            ],
            [WEB, DB, BAD, CORP],
        ),
    ),
)
