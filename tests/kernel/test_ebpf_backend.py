"""The eBPF backend in real namespaces: real TCP/UDP/ICMP through the tc programs.

One lab (hosts ``a``, ``b``, ``c`` and the unmanaged ``d`` on a bridge) serves every test;
each test enforces host policies with :class:`EbpfBackend` and probes v4 and v6. Covered:
full mode allow/deny per port, protocol, port range and ICMP type; outbound rules at the
client; override-deny > allow > deny; selective and visibility modes (would-be drops pass,
are counted and reported on the ring buffer with their rule id); set deltas (host and CIDR,
nested); verify/read-back and tamper; coexistence with an nftables table and with another
tc BPF program on the same interface; remove and idle leaving nothing behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ebpf.events import FlowAction
from stockade.backends.ebpf.netlink import in_netns
from stockade.bpf.build import BuildError, find_clang
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.lab import HostSpec, Lab, Probe, ProbeKind
from stockade.model.addresses import Family, IPAddress, IPNetwork
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode


def ebpf_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "eBPF tests need root"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"eBPF tests need {tool!r}"
    try:
        find_clang()
    except BuildError as exc:
        return str(exc)
    return None


SKIP = ebpf_skip_reason()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

ADDR = {
    name: (ipaddress.ip_address(f"10.71.0.{n}"), ipaddress.ip_address(f"fd71::{n}"))
    for name, n in (("a", 11), ("b", 12), ("c", 13), ("d", 14))
}
TCP_PORTS = (80, 443, 8080)
UDP_PORTS = (53,)
HOSTS = tuple(HostSpec(n, ADDR[n], TCP_PORTS, UDP_PORTS) for n in ADDR)
NO_MANAGEMENT = Failsafe(management=())
ECHO6 = ServiceEntry(Proto.ICMPV6, 128, 128)


def tcp(first: int, last: int | None = None) -> ServiceEntry:
    return ServiceEntry(Proto.TCP, first, first if last is None else last)


def udp(first: int) -> ServiceEntry:
    return ServiceEntry(Proto.UDP, first, first)


def net(addr: IPAddress | str) -> IPNetwork:
    return ipaddress.ip_network(addr)


def host_policy(
    workload: str,
    rules: Iterable[HostRule],
    sets: dict[str, Iterable[IPAddress | IPNetwork]],
    mode: EnforcementMode = EnforcementMode.FULL,
    failsafe: Failsafe = NO_MANAGEMENT,
) -> HostPolicy:
    """A HostPolicy with ``sets`` (name -> members of both families) in both families."""
    address_sets = []
    for name, members in sets.items():
        nets = [m if isinstance(m, ipaddress.IPv4Network | ipaddress.IPv6Network) else net(m) for m in members]
        for family in (Family.V4, Family.V6):
            fam = tuple(sorted(n for n in nets if n.version == family.value))
            address_sets.append(AddressSet(name, family, fam))  # type: ignore[arg-type]
    return HostPolicy(workload, mode, ADDR[workload], tuple(sorted(rules)), tuple(sorted(address_sets)), failsafe)


def rule(action: Action, direction: Direction, rid: str, peer: str, *services: ServiceEntry) -> HostRule:
    return HostRule(action, direction, rid, peer, services)


Key = tuple[str, str, str, int, int | None]  # src, dst, kind, family, port


def probes(pairs: Iterable[tuple[str, str]]) -> list[Probe]:
    out = []
    for src, dst in pairs:
        for i in (0, 1):
            s, d = ADDR[src][i], ADDR[dst][i]
            out += [Probe(src, dst, ProbeKind.TCP, s, d, p) for p in TCP_PORTS]
            out += [Probe(src, dst, ProbeKind.UDP, s, d, p) for p in UDP_PORTS]
            out.append(Probe(src, dst, ProbeKind.ICMP_ECHO, s, d))
    return out


def outcomes(lab: Lab, pairs: Iterable[tuple[str, str]]) -> dict[Key, bool]:
    results = lab.probe(probes(pairs), timeout=0.4)
    return {(r.probe.src_host, r.probe.dst_host, r.probe.kind.value, r.probe.family.value, r.probe.port): r.succeeded
            for r in results}


def reachable(got: dict[Key, bool], src: str, dst: str, kind: str, port: int | None = None) -> tuple[bool, bool]:
    """(v4, v6) outcome of one probe kind between two hosts."""
    return got[(src, dst, kind, 4, port)], got[(src, dst, kind, 6, port)]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(HOSTS) as the_lab:
        yield the_lab


@pytest.fixture
def backends(lab: Lab) -> Iterator[dict[str, EbpfBackend]]:
    made = {name: EbpfBackend(netns=lab.netns(name)) for name in lab.hosts}
    try:
        yield made
    finally:
        for b in made.values():
            b.remove()
            b.close()


def enforce(backend: EbpfBackend, hp: HostPolicy) -> None:
    artifact = backend.render(hp)
    backend.apply(artifact)
    report = backend.verify(artifact)
    assert report.ok, report.problems


# ---- tests -------------------------------------------------------------------------------


def test_full_mode_allows_the_rule_and_drops_the_rest(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    hp = host_policy(
        "b",
        [rule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "clients", tcp(80), ServiceEntry(Proto.ICMP, 8, 8))],
        {"clients": [*ADDR["a"]]},
    )
    enforce(backends["b"], hp)
    got = outcomes(lab, [("a", "b"), ("c", "b"), ("b", "a")])
    assert reachable(got, "a", "b", "tcp", 80) == (True, True)
    assert reachable(got, "a", "b", "tcp", 443) == (False, False)
    assert reachable(got, "a", "b", "udp", 53) == (False, False)
    assert reachable(got, "a", "b", "icmp-echo") == (True, False)  # ICMP type 8 rule: v4 only
    assert reachable(got, "c", "b", "tcp", 80) == (False, False)  # not in the set
    assert reachable(got, "b", "a", "tcp", 80) == (False, False)  # full: outbound default deny
    stats = backends["b"].stats()
    assert stats["allow_new"] >= 3 and stats["block"] > 0 and stats["pass_nd"] > 0


def test_outbound_rules_are_enforced_at_the_client(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    hp = host_policy(
        "a",
        [rule(Action.ALLOW, Direction.OUTBOUND, "ruleset/out/0", "servers", tcp(443), udp(53))],
        {"servers": [*ADDR["b"]]},
    )
    enforce(backends["a"], hp)
    got = outcomes(lab, [("a", "b"), ("a", "c"), ("c", "a")])
    assert reachable(got, "a", "b", "tcp", 443) == (True, True)
    assert reachable(got, "a", "b", "udp", 53) == (True, True)  # the reply passes as the flow's
    assert reachable(got, "a", "b", "tcp", 80) == (False, False)
    assert reachable(got, "a", "c", "tcp", 443) == (False, False)
    assert reachable(got, "c", "a", "tcp", 443) == (False, False)  # full: inbound default deny


def test_port_ranges_icmpv6_types_and_precedence(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    hp = host_policy(
        "b",
        [
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/r/0", "all", tcp(1, 1000), ECHO6),
            rule(Action.DENY, Direction.INBOUND, "deny/web", "all", tcp(80), udp(53)),  # crossed by the allow
            rule(Action.OVERRIDE_DENY, Direction.INBOUND, "deny/override", "c_only", tcp(443)),
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/r/1", "all", tcp(8000, 8100)),
        ],
        {"all": [*ADDR["a"], *ADDR["c"]], "c_only": [*ADDR["c"]]},
    )
    enforce(backends["b"], hp)
    got = outcomes(lab, [("a", "b"), ("c", "b")])
    assert reachable(got, "a", "b", "tcp", 80) == (True, True)  # allow > deny
    assert reachable(got, "a", "b", "tcp", 443) == (True, True)
    assert reachable(got, "c", "b", "tcp", 443) == (False, False)  # override-deny > allow
    assert reachable(got, "c", "b", "tcp", 80) == (True, True)
    assert reachable(got, "a", "b", "tcp", 8080) == (True, True)  # range 8000-8100
    assert reachable(got, "a", "b", "udp", 53) == (False, False)  # only the deny matches
    assert reachable(got, "a", "b", "icmp-echo") == (False, True)  # ICMPv6 echo only


def test_selective_mode_enforces_only_uncrossed_denies(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    hp = host_policy(
        "b",
        [
            rule(Action.DENY, Direction.INBOUND, "deny/block-web", "all", tcp(80), tcp(443)),
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/r/0", "a_only", tcp(443)),
        ],
        {"all": [*ADDR["a"], *ADDR["c"]], "a_only": [*ADDR["a"]]},
        mode=EnforcementMode.SELECTIVE,
    )
    enforce(backends["b"], hp)
    got = outcomes(lab, [("a", "b"), ("c", "b"), ("d", "b"), ("b", "d")])
    assert reachable(got, "a", "b", "tcp", 80) == (False, False)
    assert reachable(got, "a", "b", "tcp", 443) == (True, True)  # the allow crosses the deny
    assert reachable(got, "c", "b", "tcp", 443) == (False, False)
    assert reachable(got, "c", "b", "tcp", 8080) == (True, True)  # default allow
    assert reachable(got, "d", "b", "tcp", 80) == (True, True)  # d is in no set
    assert reachable(got, "b", "d", "udp", 53) == (True, True)


def test_visibility_passes_counts_and_reports_would_be_drops(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    hp = host_policy(
        "b",
        [rule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "clients", tcp(80))],
        {"clients": [*ADDR["a"]]},
        mode=EnforcementMode.VISIBILITY,
    )
    backend = backends["b"]
    enforce(backend, hp)
    with backend.flow_events() as events:
        events.poll()  # forget older events
        got = outcomes(lab, [("a", "b"), ("c", "b")])
        assert all(got.values()), [k for k, ok in got.items() if not ok]
        seen = events.poll(timeout=1.0)
    assert backend.stats()["would_block"] > 0
    by_key = {(e.src, e.dst_port, e.action): e.rule_id for e in seen if e.direction is Direction.INBOUND}
    assert by_key.get((ADDR["a"][0], 80, FlowAction.ALLOW)) == "ruleset/web/0"
    assert by_key.get((ADDR["c"][0], 80, FlowAction.WOULD_BLOCK)) == "default"
    assert by_key.get((ADDR["a"][1], 443, FlowAction.WOULD_BLOCK)) == "default"


def test_blocked_connections_are_reported_with_the_deciding_rule(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    hp = host_policy(
        "b",
        [rule(Action.DENY, Direction.INBOUND, "deny/no-dns", "clients", udp(53))],
        {"clients": [*ADDR["a"]]},
        mode=EnforcementMode.SELECTIVE,
    )
    backend = backends["b"]
    enforce(backend, hp)
    with backend.flow_events() as events:
        events.poll()
        outcomes(lab, [("a", "b")])
        seen = events.poll(timeout=1.0)
    blocked = {(e.src, e.dst_port) for e in seen if e.action is FlowAction.BLOCK and e.rule_id == "deny/no-dns"}
    assert blocked == {(ADDR["a"][0], 53), (ADDR["a"][1], 53)}
    allowed = {e.dst_port for e in seen if e.action is FlowAction.ALLOW and e.src == ADDR["a"][0]}
    assert {80, 443, 8080} <= allowed


def test_set_deltas_change_members_without_a_reload(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    backend = backends["b"]
    hp = host_policy(
        "b",
        [rule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "clients", tcp(80))],
        {"clients": [*ADDR["a"]]},
    )
    enforce(backend, hp)
    serial = backend.read_back().splitlines()[1]
    a4 = net(ADDR["a"][0])
    c4, c6 = (net(x) for x in ADDR["c"])
    backend.apply_delta((SetDelta("clients", Family.V4, (c4,), (a4,)), SetDelta("clients", Family.V6, (c6,), ())))
    got = outcomes(lab, [("a", "b"), ("c", "b")])
    assert reachable(got, "a", "b", "tcp", 80) == (False, True)
    assert reachable(got, "c", "b", "tcp", 80) == (True, True)
    # a CIDR containing c and d, then c leaving its own entry: d and c keep the set through the CIDR
    cidr = net("10.71.0.12/30")  # .12-.15: b, c, d
    backend.apply_delta((SetDelta("clients", Family.V4, (cidr,), ()),))
    backend.apply_delta((SetDelta("clients", Family.V4, (), (c4,)),))
    got = outcomes(lab, [("c", "b"), ("d", "b")])
    assert reachable(got, "c", "b", "tcp", 80)[0] and reachable(got, "d", "b", "tcp", 80)[0]
    backend.apply_delta((SetDelta("clients", Family.V4, (), (cidr,)),))
    got = outcomes(lab, [("c", "b"), ("d", "b")])
    assert not reachable(got, "c", "b", "tcp", 80)[0] and not reachable(got, "d", "b", "tcp", 80)[0]
    expected = host_policy(
        "b",
        [rule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "clients", tcp(80))],
        {"clients": [ADDR["a"][1], *ADDR["c"][1:]]},
    )
    assert backend.verify(backend.render(expected)).ok
    assert backend.read_back().splitlines()[1].split()[:4] == serial.split()[:4]  # same serial: no reload


def test_verify_and_read_back_detect_tampering(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    backend = backends["b"]
    hp = host_policy("b", [rule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "c", tcp(80))], {"c": [*ADDR["a"]]})
    artifact = backend.render(hp)
    backend.apply(artifact)
    baseline = backend.read_back()
    assert backend.read_back() == baseline
    assert "ruleset/web/0" in baseline and "eth0 ingress stockade_in" in baseline
    lab.run_in("b", ["tc", "filter", "del", "dev", "eth0", "ingress", "pref", "1000", "handle", "1", "bpf"])
    assert backend.read_back() != baseline
    assert any("no Stockade program attached" in p for p in backend.verify(artifact).problems)
    # egress alone still judges b's SYN-ACK as a new outbound connection: nothing gets in
    assert reachable(outcomes(lab, [("a", "b")]), "a", "b", "tcp", 80) == (False, False)
    backend.apply(artifact)
    assert backend.verify(artifact).ok
    assert reachable(outcomes(lab, [("a", "b")]), "a", "b", "tcp", 80) == (True, True)
    other = backend.render(host_policy("b", [], {"c": [*ADDR["a"]]}))
    assert backend.verify(other).problems  # a different policy does not verify


def test_coexistence_with_nftables(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    script = (
        "table inet othertool {\n"
        "  chain input { type filter hook input priority 0; policy accept; tcp dport 8080 drop; }\n"
        "}\n"
    )
    lab.run_in("b", ["nft", "-f", "-"], input=script)
    try:
        hp = host_policy(
            "b",
            [rule(Action.ALLOW, Direction.INBOUND, "ruleset/r/0", "clients", tcp(80), tcp(8080))],
            {"clients": [*ADDR["a"]]},
        )
        enforce(backends["b"], hp)
        got = outcomes(lab, [("a", "b")])
        assert reachable(got, "a", "b", "tcp", 80) == (True, True)
        assert reachable(got, "a", "b", "tcp", 8080) == (False, False)  # nftables still drops it
        assert reachable(got, "a", "b", "tcp", 443) == (False, False)  # eBPF drops it
        backends["b"].remove()
        listing = lab.run_in("b", ["nft", "list", "table", "inet", "othertool"]).stdout
        assert "tcp dport 8080 drop" in listing
    finally:
        lab.run_in("b", ["nft", "delete", "table", "inet", "othertool"], check=False)


OTHER_TC_PROGRAM = r"""
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
/* Someone else's tc program: drops IPv4 TCP to port 8080, lets the rest continue. */
SEC("tc")
int other(struct __sk_buff *skb)
{
    __u8 ip[20];
    __u16 dport;
    if (skb->protocol != bpf_htons(0x0800) || bpf_skb_load_bytes(skb, 14, ip, 20) < 0 || ip[9] != 6)
        return TC_ACT_UNSPEC;
    if (bpf_skb_load_bytes(skb, 14 + (ip[0] & 15) * 4 + 2, &dport, 2) < 0)
        return TC_ACT_UNSPEC;
    return dport == bpf_htons(8080) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
char _license[] SEC("license") = "GPL";
"""


def test_coexistence_with_another_tc_program(lab: Lab, backends: dict[str, EbpfBackend], tmp_path: Path) -> None:
    source = tmp_path / "other.bpf.c"
    source.write_text(OTHER_TC_PROGRAM)
    obj = tmp_path / "other.o"
    subprocess.run(
        [find_clang(), "-O2", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c", str(source), "-o", str(obj)],
        check=True,
        capture_output=True,
    )
    lab.run_in("b", ["tc", "qdisc", "add", "dev", "eth0", "clsact"], check=False)
    lab.run_in("b", ["tc", "filter", "add", "dev", "eth0", "ingress", "pref", "2000", "bpf", "da", "obj", str(obj),
                     "sec", "tc"])
    try:
        hp = host_policy(
            "b",
            [rule(Action.ALLOW, Direction.INBOUND, "ruleset/r/0", "clients", tcp(80), tcp(8080))],
            {"clients": [*ADDR["a"]]},
        )
        enforce(backends["b"], hp)
        got = outcomes(lab, [("a", "b")])
        assert reachable(got, "a", "b", "tcp", 80) == (True, True)
        assert reachable(got, "a", "b", "tcp", 8080) == (False, True)  # ours passed it on; theirs dropped v4
        assert reachable(got, "a", "b", "tcp", 443) == (False, False)
        backends["b"].remove()
        shown = json.loads(lab.run_in("b", ["tc", "-j", "filter", "show", "dev", "eth0", "ingress"]).stdout)
        assert {f.get("pref") for f in shown} == {2000}  # theirs stays, ours is gone
        got = outcomes(lab, [("a", "b")])
        assert reachable(got, "a", "b", "tcp", 8080) == (False, True)
        assert reachable(got, "a", "b", "tcp", 443) == (True, True)
    finally:
        lab.run_in("b", ["tc", "filter", "del", "dev", "eth0", "ingress", "pref", "2000"], check=False)


def test_remove_and_idle_leave_nothing_behind(lab: Lab, backends: dict[str, EbpfBackend]) -> None:
    backend = backends["b"]
    hp = host_policy("b", [], {})
    enforce(backend, hp)
    assert not any(outcomes(lab, [("a", "b")]).values())
    pins = backend.loader.pin_dir
    assert (pins / "stk_current").exists() and (pins / "prog_in").exists()
    idle = backend.render(host_policy("b", [], {}, mode=EnforcementMode.IDLE))
    assert "idle" in idle.to_text()
    backend.apply(idle)
    assert not pins.exists()
    assert backend.read_back() == ""
    assert backend.attachments() == []
    assert all(outcomes(lab, [("a", "b")]).values())
    backend.remove()  # idempotent


def test_backend_without_netns_follows_the_namespace_it_runs_in(lab: Lab) -> None:
    """The agent's way (``--netns``): join the namespace first, then build the backend without one."""
    hp = host_policy("b", [rule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "c", tcp(80))], {"c": [*ADDR["a"]]})

    def inside() -> EbpfBackend:
        backend = EbpfBackend()
        assert backend.loader.pin_dir.name.startswith("_ns")  # never the host's directory
        enforce(backend, hp)
        return backend

    backend = in_netns(lab.netns("b"), inside)
    try:
        got = outcomes(lab, [("a", "b"), ("c", "b")])
        assert reachable(got, "a", "b", "tcp", 80) == (True, True)
        assert reachable(got, "a", "b", "tcp", 443) == (False, False)
        assert reachable(got, "c", "b", "tcp", 80) == (False, False)
    finally:
        in_netns(lab.netns("b"), backend.remove)
    assert all(outcomes(lab, [("c", "b")]).values())
