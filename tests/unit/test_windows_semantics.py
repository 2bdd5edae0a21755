"""Windows Firewall semantics vs the reference evaluator, without Windows.

A small interpreter of the rendered plan applies Windows' own evaluation: any matching
block rule wins, then any matching allow rule, then the profile default; rules have no
order. Addresses are read back from the textual items the script carries (keywords or
``-RemoteAddress`` lists). For random policies, every side decision of every probe must be
the evaluator's (a visibility side's "would-block" must pass: nothing is blocked).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from itertools import permutations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.backends.setalgebra import ServiceSpace, Subtrahend, SubtrahendKind, carve
from stockade.backends.windows.backend import WindowsFirewallBackend
from stockade.backends.windows.model import (
    NOTHING_ADDRESS,
    OTHER_PROTOCOL_RANGES,
    OtherProtocols,
    PeerMode,
    ProfileAction,
    RemoteKind,
    WinAction,
    WinDirection,
    WindowsPlan,
    WinProtocol,
    WinRule,
)
from stockade.compiler import compile_policy
from stockade.errors import UnsupportedFeatureError
from stockade.evaluator import Evaluator
from stockade.model import Failsafe, IPAddress, Policy, Proto, ServiceEntry
from tests.unit import policy_strategies as ps

PROBES: tuple[tuple[Proto, int | None], ...] = (
    (Proto.TCP, 22),
    (Proto.TCP, 80),
    (Proto.TCP, 7999),  # range edges of the "web" service (8000-8100)
    (Proto.TCP, 8000),
    (Proto.TCP, 8100),
    (Proto.TCP, 8101),
    (Proto.TCP, 8443),
    (Proto.UDP, 53),
    (Proto.UDP, 161),
    (Proto.ICMP, 8),
    (Proto.ICMPV6, 128),
    (Proto.ICMPV6, 135),
    (Proto.ANY, None),  # an "other" IP protocol (GRE)
)
IP_NUMBER = {Proto.TCP: 6, Proto.UDP: 17, Proto.ICMP: 1, Proto.ICMPV6: 58, Proto.ANY: 47}
WIN_NUMBER = {WinProtocol.TCP: 6, WinProtocol.UDP: 17, WinProtocol.ICMPV4: 1, WinProtocol.ICMPV6: 58}


def _in_item(addr: IPAddress, item: str) -> bool:
    if "-" in item:
        lo, hi = (ipaddress.ip_address(x) for x in item.split("-"))
        return lo.version == addr.version and int(lo) <= int(addr) <= int(hi)
    net = ipaddress.ip_network(item)
    return net.version == addr.version and addr in net


def _remote_items(plan: WindowsPlan, rule: WinRule) -> list[str] | None:
    r = rule.remote
    if r.kind is RemoteKind.ANY:
        return None
    if r.kind is RemoteKind.LIST:
        assert r.addresses, "an empty remote address list would mean any address"
        return list(r.addresses)
    return plan.keyword(r.keyword).address_text().split(",")


def _matches(plan: WindowsPlan, rule: WinRule, direction: WinDirection, peer: IPAddress, proto: Proto,
             port: int | None) -> bool:  # fmt: skip
    if rule.direction is not direction:
        return False
    number = IP_NUMBER[proto]
    if rule.protocol is WinProtocol.OTHER:
        if not any(lo <= number <= hi for lo, hi in OTHER_PROTOCOL_RANGES):
            return False
    elif rule.protocol is not WinProtocol.ANY and WIN_NUMBER[rule.protocol] != number:
        return False
    if rule.ports and (port is None or not any(lo <= port <= hi for lo, hi in rule.ports)):
        return False
    if rule.icmp_types and (port is None or not any(lo <= port <= hi for lo, hi in rule.icmp_types)):
        return False
    items = _remote_items(plan, rule)
    return items is None or any(_in_item(peer, i) for i in items)


def windows_side(plan: WindowsPlan, direction: WinDirection, peer: IPAddress, proto: Proto, port: int | None) -> str:
    hits = {r.action for r in plan.rules if _matches(plan, r, direction, peer, proto, port)}
    if WinAction.BLOCK in hits:
        return "block"
    if WinAction.ALLOW in hits:
        return "allow"
    default = plan.default_inbound if direction is WinDirection.INBOUND else plan.default_outbound
    assert default is not ProfileAction.NOT_CONFIGURED
    return "allow" if default is ProfileAction.ALLOW else "block"


ENFORCED = {"allow": "allow", "block": "block", "would-block": "allow"}


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    policy = draw(ps.policy())
    if draw(st.booleans()):
        fs = Failsafe(
            controller=(ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("fd00::5/128")),
            controller_port=8443,
            management=(ServiceEntry(Proto.TCP, 22, 22), ServiceEntry(Proto.UDP, 161, 161)),
        )
        policy = replace(policy, failsafe=fs)
    return policy


def check_policy(policy: Policy, peer_mode: PeerMode) -> int:
    compiled = compile_policy(policy)
    backend = WindowsFirewallBackend(peer_mode)
    plans = {name: backend.render(hp).plan for name, hp in compiled.items()}
    ev = Evaluator(policy)
    outsiders = [ipaddress.ip_address("10.0.0.3"), ipaddress.ip_address("fd00::3")]
    endpoints = [a for w in policy.workloads for a in w.addresses] + outsiders
    checked = 0
    for src, dst in permutations(endpoints, 2):
        if src.version != dst.version:
            continue
        if ev.owner(src) is not None and ev.owner(src) is ev.owner(dst):
            continue
        for proto, port in PROBES:
            if (proto is Proto.ICMP and src.version == 6) or (proto is Proto.ICMPV6 and src.version == 4):
                continue
            e = ev.evaluate(src, dst, proto, port)
            for side, host, peer, direction in (
                (e.outbound, ev.owner(src), dst, WinDirection.OUTBOUND),
                (e.inbound, ev.owner(dst), src, WinDirection.INBOUND),
            ):
                if side is None:
                    assert host is None or not plans[host.name].present
                    continue
                got = windows_side(plans[side.workload], direction, peer, proto, port)
                want = ENFORCED[side.action]
                assert got == want, (
                    f"{src}->{dst} {proto.value}/{port} at {side.workload} ({direction.value}): "
                    f"windows {got}, evaluator {side.action} by {side.rule_id}"
                )
                checked += 1
    return checked


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_keyword_rendering_agrees_with_evaluator(policy: Policy) -> None:
    check_policy(policy, PeerMode.DYNAMIC_KEYWORDS)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_address_list_rendering_agrees_with_evaluator(policy: Policy) -> None:
    check_policy(policy, PeerMode.ADDRESS_LISTS)


def test_interpreter_can_fail() -> None:
    """The interpreter is not vacuous: dropping the subtraction makes it disagree."""
    from tests.golden.nft_cases import CASES

    case = next(c for c in CASES if c.name == "deny_crossed_by_allow")
    plan = WindowsFirewallBackend().render(case.policy).plan
    peer = ipaddress.ip_address("10.0.0.11")  # in WEB (allowed on 3306/tcp) and in CORP (denied)
    assert windows_side(plan, WinDirection.INBOUND, peer, Proto.TCP, 3306) == "allow"
    assert windows_side(plan, WinDirection.INBOUND, peer, Proto.UDP, 3306) == "block"
    assert windows_side(plan, WinDirection.INBOUND, ipaddress.ip_address("10.0.0.99"), Proto.TCP, 3306) == "block"
    # a naive rendering (no subtraction) would block the crossing allow
    naive = carve("pcorp0000004", ServiceSpace.of((ServiceEntry(Proto.TCP, 3306, 3306),)), [])
    assert naive[0].peer.minus == ()


def test_keyword_never_empty() -> None:
    from tests.golden.nft_cases import CASES

    case = next(c for c in CASES if c.name == "empty_sets")
    plan = WindowsFirewallBackend().render(case.policy).plan
    assert plan.keywords and all(k.address_text() == NOTHING_ADDRESS for k in plan.keywords)
    lists = WindowsFirewallBackend(PeerMode.ADDRESS_LISTS).render(case.policy).plan
    assert all(r.remote.kind is not RemoteKind.LIST or r.remote.addresses for r in lists.rules)
    assert not any(r.rule_id == "ruleset/none/0" for r in lists.rules)


def test_refuse_other_protocols_names_rule() -> None:
    from tests.golden.nft_cases import CASES

    case = next(c for c in CASES if c.name == "override_deny")
    with pytest.raises(UnsupportedFeatureError) as info:
        WindowsFirewallBackend(other_protocols=OtherProtocols.REFUSE).render(case.policy)
    assert info.value.rule_id == "deny/quarantine"
    assert "exclude protocols" in str(info.value)


def test_carve_subtracts_everywhere_and_self() -> None:
    mgmt = Subtrahend(SubtrahendKind.EVERYWHERE, ServiceSpace.of((ServiceEntry(Proto.TCP, 22, 22),)))
    same = Subtrahend(SubtrahendKind.PEER, ServiceSpace.of((ServiceEntry(Proto.UDP),)), peer="a")
    pieces = carve("a", ServiceSpace.of((ServiceEntry(Proto.TCP), ServiceEntry(Proto.UDP))), [mgmt, same])
    assert len(pieces) == 1
    assert pieces[0].space.tcp == ((0, 21), (23, 65535)) and pieces[0].space.udp == ()
