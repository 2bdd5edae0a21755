"""IPFilter semantics vs the reference evaluator, without IPFilter.

The rendered *text* (``ippool.conf``, ``ipf.conf``, ``ipf6.conf``) is parsed back by a small
parser of the IPFilter 4.1 rule subset we write, and evaluated the way IPFilter does with
``quick`` on every rule: the first matching rule decides. For random policies every side
decision must be the evaluator's: allow -> pass, block -> block, would-block (visibility) ->
``pass log`` (and a pass is logged only then).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from itertools import permutations

from hypothesis import HealthCheck, given, settings

from stockade.backends.ipfilter.backend import IpfilterBackend
from stockade.backends.ipfilter.render import IpfilterArtifact, Slot
from stockade.compiler import compile_policy
from stockade.evaluator import Evaluator
from stockade.model import Family, IPAddress, IPNetwork, Policy, Proto
from tests.unit import policy_strategies as ps
from tests.unit.test_windows_semantics import PROBES, policies

_TABLE_RE = re.compile(r"table role = ipf type = tree number = (\d+)\n\t\{ (.*); \};")
_EMPTY_RE = re.compile(r"# pool (\d+) .* is empty")


@dataclass(frozen=True)
class Line:
    action: str
    direction: str
    log: bool
    interface: str | None
    proto: str | None
    src: str | None  # None: "all"
    dst: str | None
    port: tuple[str, ...]
    icmp_type: int | None


def parse_pools(text: str) -> dict[str, list[IPNetwork]]:
    pools: dict[str, list[IPNetwork]] = {n: [] for n in _EMPTY_RE.findall(text)}
    for number, body in _TABLE_RE.findall(text):
        pools[number] = [ipaddress.ip_network(e) for e in body.split("; ")]
    return pools


def parse_rules(text: str) -> list[Line]:
    lines = []
    for raw in text.splitlines():
        body = raw.split(" # ", 1)[0].strip()
        if not body or body.startswith("#"):
            continue
        t = body.split()
        action, direction = t[0], t[1]
        i = 2
        log = t[i] == "log"
        i += log
        assert t[i] == "quick", raw
        i += 1
        interface = proto = None
        if t[i] == "on":
            interface, i = t[i + 1], i + 2
        if t[i] == "proto":
            proto, i = t[i + 1], i + 2
        src = dst = None
        port: tuple[str, ...] = ()
        icmp = None
        if t[i] == "all":
            i += 1
        else:
            assert t[i] == "from" and t[i + 2] == "to", raw
            src, dst, i = t[i + 1], t[i + 3], i + 4
            if i < len(t) and t[i] == "port":
                port, i = ((t[i + 1], t[i + 2]), i + 3) if t[i + 1] in ("=", "<=", ">=") else (
                    (t[i + 1], t[i + 2], t[i + 3]), i + 4)  # fmt: skip
            if i < len(t) and t[i] == "icmp-type":
                icmp, i = int(t[i + 1]), i + 2
        rest = t[i:]
        assert rest in ([], ["keep", "state"], ["flags", "S/SA", "keep", "state"]), raw
        lines.append(Line(action, direction, log, interface, proto, src, dst, port, icmp))
    return lines


def _port_ok(port: tuple[str, ...], value: int | None) -> bool:
    if not port:
        return True
    if value is None:
        return False
    if len(port) == 2:
        op, n = port[0], int(port[1])
        return {"=": value == n, "<=": value <= n, ">=": value >= n}[op]
    lo, op, hi = int(port[0]), port[1], int(port[2])
    assert op == "><"
    return lo < value < hi


PROTO_NAME = {Proto.TCP: "tcp", Proto.UDP: "udp", Proto.ICMP: "icmp", Proto.ICMPV6: "ipv6-icmp"}


def _addr_ok(obj: str, addr: IPAddress, pools: dict[str, list[IPNetwork]]) -> bool:
    if obj == "any":
        return True
    if obj.startswith("pool/"):
        return any(m.version == addr.version and addr in m for m in pools[obj[5:]])
    net = ipaddress.ip_network(obj)
    return net.version == addr.version and addr in net


def ipf_side(lines: list[Line], pools: dict[str, list[IPNetwork]], direction: str, peer: IPAddress, proto: Proto,
             port: int | None) -> str:  # fmt: skip
    for ln in lines:
        if ln.direction != direction or ln.interface is not None:  # probes never use loopback
            continue
        if ln.proto is not None and ln.proto != PROTO_NAME.get(proto):
            continue
        if ln.src is not None:
            obj = ln.src if direction == "in" else ln.dst
            assert obj is not None
            other = ln.dst if direction == "in" else ln.src
            assert other == "any"
            if not _addr_ok(obj, peer, pools):
                continue
            if not _port_ok(ln.port, port):
                continue
            if ln.icmp_type is not None and ln.icmp_type != port:
                continue
        if ln.action == "block":
            assert not ln.log
            return "block"
        return "would-block" if ln.log else "allow"
    raise AssertionError("no rule matched: every list must end with a default")


def check_policy(policy: Policy, inline_v6: bool) -> None:
    compiled = compile_policy(policy)
    backend = IpfilterBackend(inline_v6=inline_v6)
    parsed: dict[str, tuple[IpfilterArtifact, dict[Family, list[Line]], dict[str, list[IPNetwork]]]] = {}
    for name, hp in compiled.items():
        art = backend.render(hp)
        slot = Slot.B if len(name) % 2 else Slot.A  # both slots' text must work
        parsed[name] = (
            art,
            {f: parse_rules(art.ipf_conf(f, slot)) for f in Family},
            parse_pools(art.ippool_conf(slot)),
        )
    ev = Evaluator(policy)
    outsiders = [ipaddress.ip_address("10.0.0.3"), ipaddress.ip_address("fd00::3")]
    endpoints = [a for w in policy.workloads for a in w.addresses] + outsiders
    for src, dst in permutations(endpoints, 2):
        if src.version != dst.version or (ev.owner(src) is not None and ev.owner(src) is ev.owner(dst)):
            continue
        family = Family.V4 if src.version == 4 else Family.V6
        for proto, port in PROBES:
            if (proto is Proto.ICMP and family is Family.V6) or (proto is Proto.ICMPV6 and family is Family.V4):
                continue
            e = ev.evaluate(src, dst, proto, port)
            for side, host, peer, direction in ((e.outbound, ev.owner(src), dst, "out"),
                                                (e.inbound, ev.owner(dst), src, "in")):  # fmt: skip
                if side is None:
                    assert host is None or not parsed[host.name][0].present
                    continue
                _, lines, pools = parsed[side.workload]
                got = ipf_side(lines[family], pools, direction, peer, proto, port)
                assert got == side.action, (
                    f"{src}->{dst} {proto.value}/{port} at {side.workload} ({direction}): "
                    f"ipf {got}, evaluator {side.action} by {side.rule_id}"
                )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_pool_rendering_agrees_with_evaluator(policy: Policy) -> None:
    check_policy(policy, inline_v6=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps.policy())
def test_inline_v6_rendering_agrees_with_evaluator(policy: Policy) -> None:
    check_policy(policy, inline_v6=True)


def test_parser_catches_a_reordered_list() -> None:
    """Not vacuous: moving the deny above the crossing allow changes a decision."""
    from tests.golden.nft_cases import CASES

    case = next(c for c in CASES if c.name == "deny_crossed_by_allow")
    art = IpfilterBackend().render(case.policy)
    lines = parse_rules(art.ipf_conf(Family.V4))
    pools = parse_pools(art.ippool_conf())
    peer = ipaddress.ip_address("10.0.0.11")
    assert ipf_side(lines, pools, "in", peer, Proto.TCP, 3306) == "allow"
    deny = [ln for ln in lines if ln.action == "block" and ln.direction == "in"]
    reordered = deny + [ln for ln in lines if ln not in deny]
    assert ipf_side(reordered, pools, "in", peer, Proto.TCP, 3306) == "block"
