"""Backend contract: the central capability check (fail closed), the lazy registry, the optional
capabilities as typed protocols (and the enforcer finding them), the shared helpers, the one place
the NFLOG prefixes are written, and the pure parts of the nftables backend (render errors, delta
splitting, netlink batch encoding)."""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.agent.enforcer import Enforcer
from stockade.agent.flows import EventFlowReader, reader_factory_for
from stockade.backends import flowlog
from stockade.backends import nfnetlink as nfnl
from stockade.backends.base import (
    Capability,
    ChangeFeedSource,
    EventFlows,
    FlowSource,
    NetlinkGroup,
    NetnsBound,
    NflogFlows,
    TunnelReporting,
    Verifying,
    check_capabilities,
    check_delta_capabilities,
    required_capabilities,
)
from stockade.backends.common import ProtoGroup, entry_bounds, service_groups, validate_netns
from stockade.backends.flowlog import FlowAction, FlowEvent, FlowReason
from stockade.backends.nftables import netlink as nl
from stockade.backends.nftables.backend import NftablesBackend, delta_changes, delta_script, listing_form
from stockade.backends.nftables.render import render_nftables, service_matches
from stockade.backends.registry import BACKEND_CLASSES, BACKENDS, get_backend
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.errors import ApplyError, BackendError, NotFoundError, RenderError, UnsupportedFeatureError
from stockade.evaluator import Verdict
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode


def n(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def policy(
    rules: tuple[HostRule, ...],
    v4: tuple[str, ...] = ("10.0.0.1",),
    v6: tuple[str, ...] = (),
    mode: EnforcementMode = EnforcementMode.FULL,
    failsafe: Failsafe | None = None,
) -> HostPolicy:
    return HostPolicy(
        workload="w",
        mode=mode,
        local_addresses=(),
        rules=rules,
        sets=(
            AddressSet("ppeer", Family.V4, tuple(n(a) for a in v4)),
            AddressSet("ppeer", Family.V6, tuple(n(a) for a in v6)),
        ),
        failsafe=failsafe or Failsafe(),
    )


def rule(*services: ServiceEntry, action: Action = Action.ALLOW, rid: str = "ruleset/a/0") -> HostRule:
    return HostRule(action, Direction.INBOUND, rid, "ppeer", services)


class FakeBackend:
    """A backend that only knows plain TCP/UDP ports over IPv4, inbound, full mode."""

    name = "fake"
    capabilities = frozenset(
        {Capability.IPV4, Capability.INBOUND, Capability.TCP, Capability.UDP, Capability.MODE_FULL}
    )

    def check(self, hp: HostPolicy) -> None:
        check_capabilities(self.name, self.capabilities, hp)


NO_MGMT = Failsafe(management=())


@pytest.mark.parametrize(
    ("hp", "feature", "rule_id"),
    [
        (policy((rule(ServiceEntry(Proto.TCP, 80, 90)),), failsafe=NO_MGMT), "port ranges", "ruleset/a/0"),
        (policy((rule(ServiceEntry(Proto.ICMP, 8, 8)),), failsafe=NO_MGMT), "ICMP services", "ruleset/a/0"),
        (policy((rule(ServiceEntry(Proto.ICMPV6)),), failsafe=NO_MGMT), "ICMPv6 services", "ruleset/a/0"),
        (policy((rule(ServiceEntry(Proto.ANY)),), failsafe=NO_MGMT), "any-protocol services", "ruleset/a/0"),
        (
            policy((rule(ServiceEntry(Proto.TCP, 80, 80), action=Action.DENY, rid="deny/x"),), failsafe=NO_MGMT),
            "deny rules",
            "deny/x",
        ),
        (
            policy((rule(ServiceEntry(Proto.TCP, 80, 80), action=Action.OVERRIDE_DENY, rid="deny/o"),)),
            "override-deny rules",
            "deny/o",
        ),
        (policy((rule(ServiceEntry(Proto.TCP, 80, 80)),), v6=("fd00::1",)), "IPv6 peers", "ruleset/a/0"),
        (policy((), mode=EnforcementMode.SELECTIVE), "selective enforcement mode", "mode:selective"),
        (policy((), mode=EnforcementMode.VISIBILITY), "visibility mode", "mode:visibility"),
        (policy((), failsafe=Failsafe(controller=(n("10.9.0.1"),))), "controller failsafe", "failsafe:controller"),
        (
            policy((), failsafe=Failsafe(management=(ServiceEntry(Proto.TCP, 22, 23),))),
            "port ranges",
            "failsafe:management",
        ),
    ],
)
def test_capability_check_fails_closed_naming_feature_and_rule(hp: HostPolicy, feature: str, rule_id: str) -> None:
    with pytest.raises(UnsupportedFeatureError) as err:
        FakeBackend().check(hp)
    assert err.value.feature == feature
    assert err.value.rule_id == rule_id
    assert err.value.backend == "fake"
    assert feature in str(err.value) and rule_id in str(err.value)


def test_capability_check_passes_what_the_fake_supports() -> None:
    FakeBackend().check(policy((rule(ServiceEntry(Proto.TCP, 80, 80), ServiceEntry(Proto.UDP)),)))
    # an empty IPv6 set needs no IPv6 support; idle needs nothing at all
    FakeBackend().check(policy((rule(ServiceEntry(Proto.TCP, 443, 443)),), v6=()))
    idle = policy((rule(ServiceEntry(Proto.ANY)),), mode=EnforcementMode.IDLE, v6=("fd00::1",))
    assert list(required_capabilities(idle)) == []
    FakeBackend().check(idle)


def test_outbound_rule_needs_outbound() -> None:
    hp = policy((dataclasses.replace(rule(ServiceEntry(Proto.TCP, 80, 80)), direction=Direction.OUTBOUND),))
    with pytest.raises(UnsupportedFeatureError, match="outbound rules"):
        FakeBackend().check(hp)


def test_delta_capabilities() -> None:
    caps = frozenset({Capability.IPV4, Capability.SET_DELTAS})
    check_delta_capabilities("x", caps, (SetDelta("ppeer", Family.V4, (n("10.0.0.1/32"),), ()),))
    check_delta_capabilities("x", caps, (SetDelta("ppeer", Family.V6, (), (n("fd00::1/128"),)),))
    with pytest.raises(UnsupportedFeatureError, match="IPv6"):
        check_delta_capabilities("x", caps, (SetDelta("ppeer", Family.V6, (n("fd00::1/128"),), ()),))
    with pytest.raises(UnsupportedFeatureError, match="incremental"):
        check_delta_capabilities("x", frozenset(), (SetDelta("ppeer", Family.V4, (), ()),))


def test_nftables_declares_everything_and_render_checks() -> None:
    backend = NftablesBackend()
    assert backend.capabilities == frozenset(Capability)
    backend.render(policy((rule(ServiceEntry(Proto.ANY)),), v6=("fd00::1",)))


def test_registry() -> None:
    assert BACKENDS["nftables"] is NftablesBackend
    b = get_backend("nftables", table="stk_x", netns="lab-1")
    assert isinstance(b, NftablesBackend) and b.table == "stk_x" and b.netns == "lab-1"
    with pytest.raises(NotFoundError, match=r"unknown backend 'pf'.*nftables"):
        get_backend("pf")


# ---- nftables render errors and helpers -------------------------------------------------


@pytest.mark.parametrize("table", ["", "1abc", "a b", "x;flush ruleset", "t" * 40])
def test_bad_table_names_are_refused(table: str) -> None:
    with pytest.raises(RenderError):
        render_nftables(policy(()), table)
    with pytest.raises(ApplyError):
        NftablesBackend(table=table)


def test_bad_netns_name_is_refused() -> None:
    with pytest.raises(BackendError, match="network namespace"):
        NftablesBackend(netns="../etc; rm")


@pytest.mark.parametrize("rid", ['x" accept', "a b", "x\nflush ruleset", "r" * 200])
def test_unsafe_rule_ids_are_refused(rid: str) -> None:
    with pytest.raises(RenderError):
        render_nftables(policy((rule(ServiceEntry(Proto.TCP, 80, 80), rid=rid),)))


def test_bad_set_names_and_missing_sets_are_refused() -> None:
    hp = policy((rule(ServiceEntry(Proto.TCP, 80, 80)),))
    bad = dataclasses.replace(hp, sets=tuple(dataclasses.replace(s, name="1x; flush") for s in hp.sets))
    with pytest.raises(RenderError):
        render_nftables(bad)
    missing = dataclasses.replace(hp, sets=hp.sets[:1])
    with pytest.raises(RenderError, match="missing set"):
        render_nftables(missing)


def test_out_of_range_ports_are_refused() -> None:
    with pytest.raises(RenderError):
        render_nftables(policy((rule(ServiceEntry(Proto.TCP, 80, 70000)),)))
    with pytest.raises(RenderError):
        render_nftables(policy((rule(ServiceEntry(Proto.ICMP, 300, 300)),)))


def test_service_matches() -> None:
    tcp = [ServiceEntry(Proto.TCP, 22, 22), ServiceEntry(Proto.TCP, 23, 25), ServiceEntry(Proto.TCP, 80, 80)]
    assert service_matches(tcp, Family.V4) == ["tcp dport { 22-25, 80 }"]
    assert service_matches([ServiceEntry(Proto.TCP, 443, 443), ServiceEntry(Proto.TCP)], None) == ["meta l4proto tcp"]
    icmps = [ServiceEntry(Proto.ICMP, 8, 8), ServiceEntry(Proto.ICMPV6, 128, 128)]
    assert service_matches(icmps, Family.V4) == ["icmp type echo-request"]
    assert service_matches(icmps, Family.V6) == ["icmpv6 type echo-request"]
    assert service_matches([*icmps, ServiceEntry(Proto.ANY)], Family.V6) == [""]


def test_log_prefix_round_trip() -> None:
    assert flowlog.log_prefix(FlowAction.WOULD_BLOCK, "deny/x") == "stk:pb:deny/x"
    for action in FlowAction:
        assert flowlog.parse_prefix(flowlog.log_prefix(action, "ruleset/a/0")) == (action, "ruleset/a/0")
    assert flowlog.parse_prefix("docker: ") is None


def test_listing_form_normalises_counters() -> None:
    assert listing_form("ip saddr @s counter drop") == "ip saddr @s counter packets 0 bytes 0 drop"


# ---- deltas -------------------------------------------------------------------------------


def test_delta_is_split_between_host_and_net_sets() -> None:
    d = SetDelta("ppeer", Family.V4, (n("10.0.0.1/32"), n("10.1.0.0/16")), (n("10.0.0.2/32"),))
    changes = delta_changes((d,))
    assert [(c.set_name, c.interval, c.add, c.delete) for c in changes] == [
        ("ppeer_v4_host", False, (n("10.0.0.1/32"),), (n("10.0.0.2/32"),)),
        ("ppeer_v4_net", True, (n("10.1.0.0/16"),), ()),
    ]
    script = delta_script("stockade", changes)
    assert script.splitlines() == [
        "delete element inet stockade ppeer_v4_host { 10.0.0.2 }",
        "add element inet stockade ppeer_v4_host { 10.0.0.1 }",
        "add element inet stockade ppeer_v4_net { 10.1.0.0/16 }",
    ]
    assert delta_changes((SetDelta("ppeer", Family.V6, (), ()),)) == ()


def _messages(batch: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    off = 0
    while off < len(batch):
        length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", batch, off)
        out.append((mtype, flags, seq, batch[off + 16 : off + length]))
        off += length
    return out


def test_netlink_batch_layout() -> None:
    change = nl.ElementChange("ppeer_v4_net", True, (n("10.0.0.0/24"),), (n("10.0.1.0/24"),))
    batch, seqs = nl.build_batch("stockade", (change,), first_seq=100)
    msgs = _messages(batch)
    assert [m[0] for m in msgs] == [
        nl.NFNL_MSG_BATCH_BEGIN,
        (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_DELSETELEM,  # deletes first
        (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_NEWSETELEM,
        nl.NFNL_MSG_BATCH_END,
    ]
    assert seqs == [101, 102]
    assert [m[2] for m in msgs] == [100, 101, 102, 103]
    assert msgs[1][1] & nl.NLM_F_ACK and msgs[2][1] & nl.NLM_F_CREATE
    begin_body = msgs[0][3]
    assert struct.unpack("!BBH", begin_body[:4]) == (0, 0, nl.NFNL_SUBSYS_NFTABLES)
    body = msgs[2][3]
    assert body[0] == nl.NFPROTO_INET
    assert b"stockade\0" in body and b"ppeer_v4_net\0" in body
    assert bytes([10, 0, 0, 0]) in body and bytes([10, 0, 1, 0]) in body  # start, end (after last)


def test_netlink_element_encoding() -> None:
    assert len(nl.interval_elements(n("10.0.0.0/8"))) == 2
    assert len(nl.interval_elements(n("255.0.0.0/8"))) == 1  # reaches the top: no end element
    assert len(nl.interval_elements(n("::/0"))) == 1
    (single,) = nl.host_element(n("fd00::1/128"))
    assert ipaddress.ip_address("fd00::1").packed in single
    with pytest.raises(ApplyError):
        nl.host_element(n("10.0.0.0/31"))
    with pytest.raises(ApplyError):
        nl.build_batch("bad name", (), 1)


def test_netlink_ack_parsing() -> None:
    def ack(seq: int, err: int) -> bytes:
        inner = struct.pack("=IHHII", 16, 0, 0, seq, 0)
        payload = struct.pack("=i", err) + inner
        return struct.pack("=IHHII", 16 + len(payload), nfnl.NLMSG_ERROR, 0, 0, 0) + payload

    assert list(nfnl.parse_acks(ack(5, 0) + ack(6, -2))) == [(5, 0), (6, -2)]


def test_registry_refuses_an_option_the_backend_does_not_take() -> None:
    """Regression: ``--table`` with ``--backend iptables`` raised an uncaught TypeError."""
    from stockade.backends.registry import get_backend
    from stockade.errors import ValidationError

    with pytest.raises(ValidationError, match="does not take option 'table'"):
        get_backend("iptables", table="x")


# ---- the registry is a lazy table -----------------------------------------------------------

FAMILIES = ("nftables", "iptables", "ebpf", "windows", "ipfilter", "f5")


def test_registry_is_a_plain_table_imported_lazily() -> None:
    assert set(BACKEND_CLASSES) == set(FAMILIES)
    for name, target in BACKEND_CLASSES.items():
        module, _, cls = target.partition(":")
        assert module == f"stockade.backends.{name}.backend" and cls.endswith("Backend"), target
    code = (
        "import sys; import stockade.backends.registry as r; names = sorted(r.BACKENDS);"
        f"print(sorted(m for m in sys.modules if m.split('.')[2:3] and m.split('.')[2] in {FAMILIES!r}"
        " and m.startswith('stockade.backends.')));"
        "r.BACKENDS['f5']; print('stockade.backends.f5.backend' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True"]  # listing names imports no backend; a lookup imports one


# ---- optional capabilities: typed protocols, found once by the enforcer ----------------------


def _instance(name: str) -> object:
    if name == "f5":
        return BACKENDS["f5"]("https://bigip.invalid", "/Common/vs_web", ("u", "p"))  # type: ignore[call-arg]
    if name == "ebpf":
        return get_backend("ebpf", netns="lab-1")
    return get_backend(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nftables", {"verify", "flows", "changes", "netns", "tunnel"}),
        ("iptables", {"verify", "flows", "netns", "tunnel"}),
        ("ebpf", {"verify", "flows", "netns", "tunnel"}),
        ("windows", set()),
        ("ipfilter", set()),
        ("f5", set()),
    ],
)
def test_optional_capabilities_are_typed_protocols(name: str, expected: set[str]) -> None:
    backend = _instance(name)
    found = {
        tag
        for tag, proto in (("verify", Verifying), ("flows", FlowSource), ("changes", ChangeFeedSource),
                           ("netns", NetnsBound), ("tunnel", TunnelReporting))
        if isinstance(backend, proto)
    }
    assert found == expected


def test_the_enforcer_reads_the_seams_once() -> None:
    nft = Enforcer(NftablesBackend(netns="lab-1", log_group=7))
    assert nft.verifying and nft.netns == "lab-1"
    assert nft.flows == NflogFlows(7)
    # NETLINK_NETFILTER, NFNLGRP_NFTABLES; each transaction ends with NEWGEN ((NFNL_SUBSYS_NFTABLES 10) << 8 |
    # NFT_MSG_NEWGEN 15) naming the committing thread in NFTA_GEN_PROC_PID (2)
    assert nft.change_monitor == NetlinkGroup(12, 7, "lab-1", commit_type=(10 << 8) | 15, commit_tid_attr=2)
    ebpf = Enforcer(get_backend("ebpf", netns="lab-1"))
    assert isinstance(ebpf.flows, EventFlows) and ebpf.change_monitor is None and ebpf.verifying
    windows = Enforcer(get_backend("windows"))
    assert (windows.flows, windows.change_monitor, windows.netns, windows.verifying) == (None, None, None, False)


def test_an_ebpf_flow_event_becomes_the_packet_nflog_would_have_logged() -> None:
    def event(proto: Proto | None, reason: FlowReason = FlowReason.NEW, icmp: int | None = None) -> FlowEvent:
        return FlowEvent(123.5, Direction.INBOUND, Family.V4, 6, proto, ipaddress.ip_address("10.0.0.1"),
                         ipaddress.ip_address("10.0.0.2"), 40000, 443, icmp, FlowAction.WOULD_BLOCK, "default",
                         reason, 2, 1)

    class Stream:
        def __init__(self) -> None:
            self.events = [event(Proto.TCP), event(Proto.TCP, FlowReason.REVALIDATED), event(None)]
            self.closed = False

        def poll(self, timeout: float = 0.0) -> list[FlowEvent]:
            out, self.events = self.events, []
            return out

        def lost(self) -> int:
            return 4

        def close(self) -> None:
            self.closed = True

    stream = Stream()
    reader = EventFlowReader(stream)
    got = reader.read(0.1)
    assert [(p.key.proto, p.key.port, p.side, p.verdict, p.rule_id, p.time) for p in got] == [
        (Proto.TCP, 443, Direction.INBOUND, Verdict.POTENTIALLY_BLOCKED, "default", 123.5),
        (Proto.ANY, 443, Direction.INBOUND, Verdict.POTENTIALLY_BLOCKED, "default", 123.5),
    ]  # the re-validation of a known flow is not a new connection
    assert reader.overruns == 4
    reader.close()
    assert stream.closed
    factory, name = reader_factory_for(EventFlows(lambda: stream), None)
    assert isinstance(factory(0, None), EventFlowReader) and "eBPF" in name


# ---- written once: VerifyReport, NFLOG prefixes, shared helpers -------------------------------

SRC = Path(__file__).resolve().parents[2] / "src" / "stockade"


def test_one_verify_report() -> None:
    defined = [
        f"{path.relative_to(SRC)}:{node.name}"
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name.endswith("VerifyReport")
    ]
    assert defined == ["backends/base.py:VerifyReport"]


def test_nflog_prefixes_are_written_in_one_place() -> None:
    written = sorted(
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("stk:")
    )
    assert set(written) == {"backends/flowlog.py"}


def test_every_rendered_nflog_prefix_parses_back() -> None:
    from stockade.backends.iptables.render import render_iptables

    rules = (rule(ServiceEntry(Proto.TCP, 80, 80)), rule(ServiceEntry(Proto.UDP, 53, 53), action=Action.DENY))
    seen: set[FlowAction] = set()
    for mode in (EnforcementMode.FULL, EnforcementMode.VISIBILITY):
        hp = policy(rules, mode=mode)
        nft = re.findall(r'log prefix "([^"]*)"', render_nftables(hp).to_text())
        ipt = re.findall(r"--nflog-prefix (\S+)", render_iptables(hp).to_text())
        for prefix in [*nft, *(p.strip('"') for p in ipt)]:
            parsed = flowlog.parse_prefix(prefix)
            assert parsed is not None, prefix
            seen.add(parsed[0])
    assert seen == set(FlowAction)


def test_service_groups_are_shared_by_every_renderer() -> None:
    entries = [ServiceEntry(Proto.UDP, 53, 53), ServiceEntry(Proto.TCP, 80, 80), ServiceEntry(Proto.TCP, 81, 90),
               ServiceEntry(Proto.ICMP, 8, 8), ServiceEntry(Proto.ICMPV6)]
    assert service_groups(entries, Family.V4) == (
        ProtoGroup(Proto.TCP, ((80, 90),)), ProtoGroup(Proto.UDP, ((53, 53),)), ProtoGroup(Proto.ICMP, ((8, 8),)))
    assert service_groups(entries, None)[-1] == ProtoGroup(Proto.ICMPV6, None)  # type: ignore[index]
    assert service_groups([*entries, ServiceEntry(Proto.ANY)]) is None
    assert entry_bounds(ServiceEntry(Proto.TCP)) == (0, 65535) and entry_bounds(ServiceEntry(Proto.ICMP)) == (0, 255)
    with pytest.raises(RenderError, match="out of range 0-255"):
        entry_bounds(ServiceEntry(Proto.ICMP, 300, 300))
    for module in ("nftables.render", "iptables.render", "ipfilter.render", "f5.render", "setalgebra"):
        text = (SRC / "backends" / (module.replace(".", "/") + ".py")).read_text()
        assert "def _bounds" not in text and "def _entry_bounds" not in text, module


def test_netns_names_are_checked_in_one_place() -> None:
    assert validate_netns("lab-1") == "lab-1" and validate_netns(None) is None
    for bad in ("../x", "a b", "x;rm", ""):
        with pytest.raises(ApplyError, match="network namespace"):
            validate_netns(bad)
    with pytest.raises(ApplyError, match="network namespace"):
        get_backend("iptables", netns="../x")
