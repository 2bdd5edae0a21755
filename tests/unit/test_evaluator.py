"""The reference evaluator on hand-written scenarios: precedence, modes, scopes, IP lists."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from stockade.errors import ValidationError
from stockade.evaluator import Evaluator, Verdict, evaluate
from stockade.model import (
    AllowRule,
    ConsumerScope,
    DenyRule,
    EnforcementMode,
    Interface,
    IPList,
    IPListSelector,
    Label,
    LabelSelector,
    Policy,
    Proto,
    Ruleset,
    Service,
    ServiceEntry,
    Workload,
)

ip = ipaddress.ip_address


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(Label(k, v) for k, v in labels.items())))


def wl(name: str, addr: str, mode: EnforcementMode = EnforcementMode.FULL, **labels: str) -> Workload:
    return Workload(
        name, frozenset(Label(k, v) for k, v in labels.items()), (Interface("eth0", (ip(addr),)),), mode
    )


SERVICES = (
    Service("pg", (ServiceEntry(Proto.TCP, 5432, 5432),)),
    Service("https", (ServiceEntry(Proto.TCP, 443, 443),)),
    Service("smb", (ServiceEntry(Proto.TCP, 445, 445),)),
    Service("everything", (ServiceEntry(Proto.ANY),)),
)


def estate(
    dev_mode: EnforcementMode = EnforcementMode.FULL, db_mode: EnforcementMode = EnforcementMode.FULL
) -> Policy:
    return Policy(
        workloads=(
            wl("app-dev", "10.0.0.2", dev_mode, role="app", env="dev", app="shop"),
            wl("app-prod", "10.0.0.1", EnforcementMode.FULL, role="app", env="prod", app="shop"),
            wl("db-prod", "10.0.0.3", db_mode, role="db", env="prod", app="shop"),
            wl("mon", "10.0.0.9", EnforcementMode.FULL, role="monitoring"),
        ),
        services=SERVICES,
        ip_lists=(IPList("office", (ipaddress.ip_network("192.168.0.0/24"),)),),
        rulesets=(
            Ruleset(
                "shop",
                (sel(app="shop", env="prod"), sel(app="shop", env="dev")),
                (
                    AllowRule((sel(role="app"),), (sel(role="db"),), ("pg",)),
                    AllowRule((IPListSelector("office"),), (sel(role="app"),), ("https",)),
                ),
            ),
            Ruleset(
                "monitoring",
                (),
                (
                    AllowRule(
                        (sel(role="monitoring"),), (sel(app="shop"),), ("everything",), ConsumerScope.GLOBAL
                    ),
                ),
            ),
        ),
        deny_rules=(
            DenyRule("dev-to-prod", (sel(env="dev"),), (sel(env="prod"),), ("everything",)),
            DenyRule("no-smb", (sel(role="monitoring"),), (sel(app="shop"),), ("smb",), override=True),
        ),
    )


def test_intra_scope_allow_decides_on_both_sides() -> None:
    ev = evaluate(estate(), ip("10.0.0.1"), ip("10.0.0.3"), Proto.TCP, 5432)
    assert ev.verdict is Verdict.ALLOWED
    assert ev.outbound is not None and ev.outbound.rule_id == "ruleset/shop/0"
    assert ev.inbound is not None and ev.inbound.rule_id == "ruleset/shop/0"


def test_intra_scope_does_not_cross_scopes_and_deny_decides() -> None:
    # app-dev -> db-prod: the pg rule is intra-scope, dev and prod are different scopes
    ev = evaluate(estate(), ip("10.0.0.2"), ip("10.0.0.3"), Proto.TCP, 5432)
    assert ev.verdict is Verdict.BLOCKED
    assert ev.inbound is not None and ev.inbound.rule_id == "deny/dev-to-prod"


def test_wrong_port_falls_to_default_deny() -> None:
    ev = evaluate(estate(), ip("10.0.0.1"), ip("10.0.0.3"), Proto.TCP, 5433)
    assert ev.verdict is Verdict.BLOCKED
    assert ev.outbound is not None and ev.outbound.rule_id == "default"


def test_extra_scope_allow_crosses_deny_but_not_override_deny() -> None:
    pol = estate()
    ok = evaluate(pol, ip("10.0.0.9"), ip("10.0.0.3"), Proto.TCP, 9100)
    assert ok.verdict is Verdict.ALLOWED
    smb = evaluate(pol, ip("10.0.0.9"), ip("10.0.0.3"), Proto.TCP, 445)
    assert smb.verdict is Verdict.BLOCKED
    assert smb.inbound is not None and smb.inbound.rule_id == "deny/no-smb"


def test_selective_mode_enforces_only_denies() -> None:
    pol = estate(dev_mode=EnforcementMode.SELECTIVE, db_mode=EnforcementMode.SELECTIVE)
    # no rule at all between app-prod and db-prod on 22000: selective default is allow on db side,
    # but app-prod is in full mode and blocks outbound
    ev = evaluate(pol, ip("10.0.0.1"), ip("10.0.0.3"), Proto.TCP, 22000)
    assert ev.inbound is not None and ev.inbound.action == "allow" and ev.inbound.rule_id == "default"
    assert ev.verdict is Verdict.BLOCKED
    # dev -> prod is denied, and the selective db enforces that deny inbound
    ev2 = evaluate(pol, ip("10.0.0.2"), ip("10.0.0.3"), Proto.TCP, 22000)
    assert ev2.inbound is not None and ev2.inbound.action == "block"


def test_visibility_reports_potentially_blocked() -> None:
    pol = estate(dev_mode=EnforcementMode.VISIBILITY, db_mode=EnforcementMode.VISIBILITY)
    ev = evaluate(pol, ip("10.0.0.2"), ip("10.0.0.3"), Proto.TCP, 5432)
    assert ev.verdict is Verdict.POTENTIALLY_BLOCKED
    assert ev.inbound is not None and ev.inbound.action == "would-block"


def test_idle_has_no_side_and_unmanaged_has_none() -> None:
    pol = estate(db_mode=EnforcementMode.IDLE)
    ev = evaluate(pol, ip("192.168.0.7"), ip("10.0.0.3"), Proto.TCP, 1)
    assert ev.inbound is None and ev.outbound is None
    assert ev.verdict is Verdict.ALLOWED


def test_ip_list_consumer_reaches_provider() -> None:
    pol = estate()
    assert evaluate(pol, ip("192.168.0.7"), ip("10.0.0.1"), Proto.TCP, 443).verdict is Verdict.ALLOWED
    assert evaluate(pol, ip("192.168.1.7"), ip("10.0.0.1"), Proto.TCP, 443).verdict is Verdict.BLOCKED


@pytest.mark.parametrize(
    ("proto", "port", "rule"), [(Proto.TCP, 22, "failsafe:management"), (Proto.ICMPV6, 135, "failsafe:nd")]
)
def test_failsafe_always_allows(proto: Proto, port: int, rule: str) -> None:
    pol = estate()
    db6 = replace(pol.workload_map()["db-prod"], interfaces=(Interface("eth0", (ip("10.0.0.3"), ip("fd00::3"))),))
    src, dst = (ip("fe80::9"), ip("fd00::3")) if proto is Proto.ICMPV6 else (ip("192.168.9.9"), ip("10.0.0.3"))
    ev = Evaluator(pol.with_workload(db6)).evaluate(src, dst, proto, port)
    assert ev.verdict is Verdict.ALLOWED
    assert ev.inbound is not None and ev.inbound.rule_id == rule


# ---- ICMP and address families (issue 13: explain --port icmp --ipv6 asked about ICMPv4) -----------


def _ping_estate() -> Policy:
    """Ping allowed over IPv4 only: a v4 echo passes, a v6 echo is dropped by the kernel."""
    both = (Interface("eth0", (ip("10.0.0.1"), ip("fd00::1"))),)
    other = (Interface("eth0", (ip("10.0.0.2"), ip("fd00::2"))),)
    return Policy(
        workloads=(
            Workload("a", frozenset({Label("role", "a")}), both, EnforcementMode.FULL),
            Workload("b", frozenset({Label("role", "b")}), other, EnforcementMode.FULL),
        ),
        services=(Service("ping4", (ServiceEntry(Proto.ICMP, 8, 8),)),),
        rulesets=(Ruleset("r", (), (AllowRule((sel(role="a"),), (sel(role="b"),), ("ping4",)),)),),
    )


@pytest.mark.parametrize(
    ("src", "dst", "proto", "field"),
    [
        ("fd00::1", "fd00::2", Proto.ICMP, "proto"),
        ("10.0.0.1", "10.0.0.2", Proto.ICMPV6, "proto"),
        ("10.0.0.1", "fd00::2", Proto.TCP, "dst"),
    ],
)
def test_a_connection_that_cannot_exist_is_refused(src: str, dst: str, proto: Proto, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Evaluator(_ping_estate()).evaluate(ip(src), ip(dst), proto, 8)
    assert [i.field for i in info.value.issues] == [field]


def test_icmpv6_echo_is_not_allowed_by_an_icmpv4_rule() -> None:
    ev = Evaluator(_ping_estate())
    assert ev.evaluate(ip("10.0.0.1"), ip("10.0.0.2"), Proto.ICMP, 8).verdict is Verdict.ALLOWED
    assert ev.evaluate(ip("fd00::1"), ip("fd00::2"), Proto.ICMPV6, 128).verdict is Verdict.BLOCKED
