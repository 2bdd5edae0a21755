"""Hypothesis strategies for random estates and policies that fit the kernel lab.

Every generated ``Policy`` is in the policy loader's canonical form (collections sorted
by name, the built-in ``any`` service present), so ``load_documents(dump_policy(p))
== p`` and a shrunk failure can be saved as YAML and replayed exactly.

Workloads occupy fixed *slots* (``w0``..``w4``, each with one IPv4 and one IPv6 address in
the lab subnet 10.70.0.0/24 / fd70::/64), so one long-lived lab can host every generated
estate: an example picks 3-5 of the slots. ``OFFICE`` is an unmanaged client that is in
some IP lists but never a workload. Services, IP lists and label vocabularies are small
on purpose, so that rules overlap and interact often. ``PROBE_TCP_PORTS`` /
``PROBE_UDP_PORTS`` are the ports the differential test probes: each is matched by a
different subset of the services.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import strategies as st

from stockade.lab.estate import PortPlan
from stockade.lab.lab import HostSpec
from stockade.model import (
    ALL_WORKLOADS,
    AllowRule,
    ConsumerScope,
    DenyRule,
    EnforcementMode,
    Failsafe,
    Interface,
    IPAddress,
    IPList,
    IPListSelector,
    Label,
    LabelGroup,
    LabelSelector,
    Policy,
    Proto,
    Ruleset,
    Selector,
    Service,
    ServiceEntry,
    Workload,
)
from stockade.model.services import ANY_SERVICE_ENTRY

LAB_V4 = ipaddress.ip_network("10.70.0.0/24")
LAB_V6 = ipaddress.ip_network("fd70::/64")

SLOTS: tuple[str, ...] = tuple(f"w{i}" for i in range(5))


def slot_addresses(name: str) -> tuple[IPAddress, IPAddress]:
    """w0 -> 10.70.0.11 and fd70::11, w1 -> 10.70.0.12 and fd70::12, ..."""
    n = 11 + SLOTS.index(name)
    return ipaddress.ip_address(f"10.70.0.{n}"), ipaddress.ip_address(f"fd70::{n}")


OFFICE: tuple[str, tuple[IPAddress, ...]] = (
    "office",
    (ipaddress.ip_address("10.70.0.200"), ipaddress.ip_address("fd70::c8")),
)

PROBE_TCP_PORTS: tuple[int, ...] = (80, 443, 8080)
PROBE_UDP_PORTS: tuple[int, ...] = (53,)
PROBE_PLAN = PortPlan(PROBE_TCP_PORTS, PROBE_UDP_PORTS, icmp_echo=True)

# Every slot plus the office client, each serving the probed ports: one lab hosts every estate.
LAB_HOSTS: tuple[HostSpec, ...] = (
    *(HostSpec(name, slot_addresses(name), PROBE_TCP_PORTS, PROBE_UDP_PORTS) for name in SLOTS),
    HostSpec(OFFICE[0], OFFICE[1], PROBE_TCP_PORTS, PROBE_UDP_PORTS),
)

VOCAB: dict[str, tuple[str, ...]] = {"role": ("web", "app", "db"), "env": ("prod", "dev"), "app": ("shop",)}
GROUPS = (LabelGroup("tiers", "role", frozenset({"web", "app"})),)


def _tcp(first: int | None, last: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.TCP, first, last if last is not None else first)


def _udp(first: int | None) -> ServiceEntry:
    return ServiceEntry(Proto.UDP, first, first)


# The loader's built-in service, exactly as it builds it.
ANY_SERVICE = Service("any", (ANY_SERVICE_ENTRY,), "every protocol and port")

SERVICES: tuple[Service, ...] = tuple(
    sorted(
        (
            ANY_SERVICE,
            Service("alt", (_tcp(8000, 8100),)),
            Service("dns", (_udp(53),)),
            Service("http", (_tcp(80),)),
            Service("https", (_tcp(443),)),
            Service("icmp-all", (ServiceEntry(Proto.ICMP), ServiceEntry(Proto.ICMPV6))),
            Service("low-tcp", (_tcp(1, 1024),)),
            Service("ntp", (_udp(123),)),
            Service("ping", (ServiceEntry(Proto.ICMP, 8, 8), ServiceEntry(Proto.ICMPV6, 128, 128))),
            Service("ping4", (ServiceEntry(Proto.ICMP, 8, 8),)),
            Service("ping6", (ServiceEntry(Proto.ICMPV6, 128, 128),)),
            Service("timestamp", (ServiceEntry(Proto.ICMP, 13, 13),)),
            Service("tcp-all", (ServiceEntry(Proto.TCP),)),
            Service("udp-all", (ServiceEntry(Proto.UDP),)),
            Service("web", (_tcp(80), _tcp(8000, 8100))),
        ),
        key=lambda s: s.name,
    )
)
SERVICE_NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


IP_LISTS: tuple[IPList, ...] = (
    IPList("anywhere", (_net("0.0.0.0/0"), _net("::/0"))),
    # w0, w1, w2 in both families
    IPList("low", (_net("10.70.0.8/30"), _net("10.70.0.12/31"), _net("fd70::10/126"))),
    IPList("office", (_net("10.70.0.192/26"), _net("fd70::c0/122")), (_net("10.70.0.254/32"),)),
    # every IPv4 lab address except w2's, and no IPv6 at all
    IPList("v4-lab", (LAB_V4,), (_net("10.70.0.13/32"),)),
    # w3 over IPv6 only
    IPList("w3-v6", (_net("fd70::14/128"),)),
)
IP_LIST_NAMES: tuple[str, ...] = tuple(i.name for i in IP_LISTS)


@st.composite
def labels(draw: st.DrawFn) -> frozenset[Label]:
    keys = draw(st.sets(st.sampled_from(sorted(VOCAB))))
    return frozenset(Label(k, draw(st.sampled_from(VOCAB[k]))) for k in sorted(keys))


@st.composite
def workload(draw: st.DrawFn, name: str) -> Workload:
    return Workload(
        name,
        draw(labels()),
        (Interface("eth0", slot_addresses(name)),),
        draw(st.sampled_from(list(EnforcementMode))),
    )


@st.composite
def label_selector(draw: st.DrawFn) -> LabelSelector:
    require = draw(labels())
    groups: tuple[str, ...] = ("tiers",) if draw(st.integers(0, 5)) == 0 else ()
    exclude: frozenset[Label] = frozenset()
    if draw(st.integers(0, 4)) == 0:
        exclude = draw(labels()) - require
    if not require and not groups and not exclude:
        require = frozenset({Label("role", draw(st.sampled_from(VOCAB["role"])))})
    return LabelSelector(tuple(sorted(require)), groups, tuple(sorted(exclude)))


def selector() -> st.SearchStrategy[Selector]:
    return st.one_of(
        label_selector(),
        label_selector(),
        st.just(ALL_WORKLOADS),
        st.builds(IPListSelector, st.sampled_from(IP_LIST_NAMES)),
    )


def selectors() -> st.SearchStrategy[tuple[Selector, ...]]:
    return st.lists(selector(), min_size=1, max_size=2, unique=True).map(tuple)


service_names = st.lists(st.sampled_from(SERVICE_NAMES), min_size=1, max_size=2, unique=True).map(tuple)


@st.composite
def allow_rule(draw: st.DrawFn) -> AllowRule:
    return AllowRule(draw(selectors()), draw(selectors()), draw(service_names), draw(st.sampled_from(ConsumerScope)))


@st.composite
def ruleset(draw: st.DrawFn, index: int) -> Ruleset:
    scopes = tuple(draw(st.lists(label_selector(), max_size=2, unique=True)))
    rules = tuple(draw(st.lists(allow_rule(), min_size=1, max_size=3)))
    return Ruleset(f"rs{index}", scopes, rules)


@st.composite
def deny_rule(draw: st.DrawFn, index: int) -> DenyRule:
    return DenyRule(f"d{index}", draw(selectors()), draw(selectors()), draw(service_names), draw(st.booleans()))


@st.composite
def failsafe(draw: st.DrawFn, names: tuple[str, ...]) -> Failsafe:
    """Mostly the default; sometimes a management service or a controller on a probed port."""
    management = draw(
        st.sampled_from(
            [
                (_tcp(22),),
                (_tcp(22),),
                (_tcp(22),),
                (),
                (_tcp(8080),),
                (_udp(53),),
            ]
        )
    )
    controller: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    port = 8443
    if draw(st.integers(0, 4)) == 0:
        v4, v6 = slot_addresses(draw(st.sampled_from(names)))
        controller = (ipaddress.ip_network(v4), ipaddress.ip_network(v6))
        port = draw(st.sampled_from([443, 8080]))
    return Failsafe(controller=controller, controller_port=port, management=management)


@st.composite
def policy(draw: st.DrawFn) -> Policy:
    """3-5 workloads in lab slots, 0-3 rulesets, 0-2 deny rules, sometimes odd failsafes."""
    names = tuple(sorted(draw(st.lists(st.sampled_from(SLOTS), min_size=3, max_size=5, unique=True))))
    workloads = tuple(draw(workload(n)) for n in names)
    n_rulesets = draw(st.integers(0, 3))
    n_denies = draw(st.integers(0, 2))
    return Policy(
        label_groups=GROUPS,
        workloads=workloads,
        ip_lists=IP_LISTS,
        services=SERVICES,
        rulesets=tuple(draw(ruleset(i)) for i in range(n_rulesets)),
        deny_rules=tuple(draw(deny_rule(i)) for i in range(n_denies)),
        failsafe=draw(failsafe(names)),
    )


@st.composite
def policy_steps(draw: st.DrawFn) -> tuple[Policy, ...]:
    """A policy, then 1-3 successive one-workload changes: relabel, mode change, join, leave.

    Consecutive policies differ in exactly one workload (added, replaced or removed), as
    the controller's incremental compiler sees inventory churn; at least 2 workloads remain.
    """
    steps = [draw(policy())]
    for _ in range(draw(st.integers(1, 3))):
        current = steps[-1]
        present = [w.name for w in current.workloads]
        absent = [n for n in SLOTS if n not in present]
        kinds = ["relabel", "relabel", "mode"]
        kinds += ["join"] if absent else []
        kinds += ["leave"] if len(present) > 2 else []
        kind = draw(st.sampled_from(kinds))
        if kind == "join":
            steps.append(current.with_workload(draw(workload(draw(st.sampled_from(absent))))))
        elif kind == "leave":
            steps.append(current.without_workload(draw(st.sampled_from(present))))
        else:
            old = current.workload_map()[draw(st.sampled_from(present))]
            if kind == "relabel":
                new = replace(old, labels=draw(labels().filter(lambda ls, old=old: ls != old.labels)))
            else:
                modes = [m for m in EnforcementMode if m is not old.mode]
                new = replace(old, mode=draw(st.sampled_from(modes)))
            steps.append(current.with_workload(new))
    return tuple(steps)
