"""Hypothesis strategies for small random estates and policies (unit layer)."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from stockade.model import (
    ALL_WORKLOADS,
    AllowRule,
    ConsumerScope,
    DenyRule,
    EnforcementMode,
    Interface,
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

VOCAB = {"role": ["web", "app", "db"], "env": ["prod", "dev"], "app": ["shop", "crm"]}
NAMES = [f"w{i}" for i in range(8)]
SERVICES = (
    Service("http", (ServiceEntry(Proto.TCP, 80, 80),)),
    Service("web", (ServiceEntry(Proto.TCP, 80, 80), ServiceEntry(Proto.TCP, 8000, 8100))),
    Service("dns", (ServiceEntry(Proto.UDP, 53, 53),)),
    Service("ping", (ServiceEntry(Proto.ICMP, 8, 8), ServiceEntry(Proto.ICMPV6, 128, 128))),
    Service("all", (ServiceEntry(Proto.ANY),)),
)
IPLISTS = (
    IPList("low", (ipaddress.ip_network("10.0.0.0/29"), ipaddress.ip_network("fd00::/125"))),
    IPList(
        "mid",
        (ipaddress.ip_network("10.0.0.0/28"),),
        (ipaddress.ip_network("10.0.0.4/30"),),
    ),
)
GROUPS = (LabelGroup("tiers", "role", frozenset({"web", "app"})),)


@st.composite
def labels(draw: st.DrawFn) -> frozenset[Label]:
    keys = draw(st.sets(st.sampled_from(sorted(VOCAB))))
    return frozenset(Label(k, draw(st.sampled_from(VOCAB[k]))) for k in keys)


@st.composite
def workload(draw: st.DrawFn, name: str | None = None) -> Workload:
    n = name if name is not None else draw(st.sampled_from(NAMES))
    idx = NAMES.index(n)
    host = draw(st.sampled_from([idx + 1, idx + 20, idx + 40]))
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.ip_address(f"10.0.0.{host}")]
    if draw(st.booleans()):
        addrs.append(ipaddress.ip_address(f"fd00::{host:x}"))
    return Workload(
        n,
        draw(labels()),
        (Interface("eth0", tuple(addrs)),),
        draw(st.sampled_from(list(EnforcementMode))),
    )


@st.composite
def label_selector(draw: st.DrawFn) -> LabelSelector:
    require = draw(labels())
    exclude = frozenset()
    if draw(st.integers(0, 4)) == 0:
        exclude = draw(labels())
    groups: tuple[str, ...] = ("tiers",) if draw(st.integers(0, 5)) == 0 else ()
    sel = LabelSelector(tuple(sorted(require)), groups, tuple(sorted(exclude - require)))
    if not sel.require and not sel.groups and not sel.exclude:
        return LabelSelector((Label("env", draw(st.sampled_from(VOCAB["env"]))),))
    return sel


def selector() -> st.SearchStrategy[Selector]:
    return st.one_of(
        label_selector(),
        label_selector(),
        st.just(ALL_WORKLOADS),
        st.sampled_from([IPListSelector("low"), IPListSelector("mid")]),
    )


service_names = st.lists(st.sampled_from([s.name for s in SERVICES]), min_size=1, max_size=2, unique=True)


@st.composite
def allow_rule(draw: st.DrawFn) -> AllowRule:
    return AllowRule(
        tuple(draw(st.lists(selector(), min_size=1, max_size=2))),
        tuple(draw(st.lists(selector(), min_size=1, max_size=2))),
        tuple(draw(service_names)),
        draw(st.sampled_from(list(ConsumerScope))),
    )


@st.composite
def ruleset(draw: st.DrawFn, i: int) -> Ruleset:
    scopes = tuple(draw(st.lists(label_selector(), max_size=2)))
    return Ruleset(f"rs{i}", scopes, tuple(draw(st.lists(allow_rule(), min_size=1, max_size=3))))


@st.composite
def deny_rule(draw: st.DrawFn, i: int) -> DenyRule:
    return DenyRule(
        f"d{i}",
        tuple(draw(st.lists(selector(), min_size=1, max_size=2))),
        tuple(draw(st.lists(selector(), min_size=1, max_size=2))),
        tuple(draw(service_names)),
        draw(st.booleans()),
    )


@st.composite
def policy(draw: st.DrawFn) -> Policy:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True))
    workloads = tuple(sorted(draw(workload(n)) for n in names))
    n_rs = draw(st.integers(0, 3))
    n_deny = draw(st.integers(0, 2))
    return Policy(
        label_groups=GROUPS,
        workloads=workloads,
        ip_lists=IPLISTS,
        services=SERVICES,
        rulesets=tuple(draw(ruleset(i)) for i in range(n_rs)),
        deny_rules=tuple(draw(deny_rule(i)) for i in range(n_deny)),
    )


def wl_simple(name: str, i: int, role: str = "web") -> Workload:
    """A full-mode workload with role=``role`` and one v4 + one v6 address."""
    return Workload(
        name,
        frozenset({Label("role", role)}),
        (Interface("eth0", (ipaddress.ip_address(f"10.0.0.{i + 1}"), ipaddress.ip_address(f"fd00::{i + 1:x}"))),),
        EnforcementMode.FULL,
    )
