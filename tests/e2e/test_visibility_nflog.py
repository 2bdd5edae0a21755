"""Kernel: the nftables ruleset logs every new connection's first packet, and the agent's reader sees it.

Two lab hosts; the client's and the server's HostPolicies are compiled from one small policy and
applied with the real nftables backend in each namespace; an :class:`NflogReader` bound inside
each namespace (in a thread that entered it) collects what the kernel logs while real TCP, UDP
and ICMP probes run, IPv4 and IPv6. Checked per mode: full (accepted and dropped, with the
deciding rule), selective (the default accepts are logged too), visibility (would-be drops).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from stockade.agent.nflog import LoggedPacket, NflogReader
from stockade.backends.nftables.backend import NftablesBackend
from stockade.compiler import compile_host
from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.lab import HostSpec, Lab, Probe, ProbeKind
from stockade.model import (
    AllowRule,
    DenyRule,
    EnforcementMode,
    Interface,
    Label,
    LabelSelector,
    Policy,
    Proto,
    Ruleset,
    Service,
    ServiceEntry,
    Workload,
)

pytestmark = pytest.mark.kernel
A = ipaddress.ip_address
CLI = (A("10.71.0.1"), A("fd71::1"))
SRV = (A("10.71.0.2"), A("fd71::2"))
GROUP = 77
T = TypeVar("T")


def policy(mode: EnforcementMode) -> Policy:
    def w(name: str, addrs: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]) -> Workload:
        return Workload(name, frozenset({Label("role", name)}), (Interface("eth0", addrs),), mode)

    role = lambda r: LabelSelector(require=(Label("role", r),))  # noqa: E731
    return Policy(
        workloads=(w("cli", CLI), w("srv", SRV)),
        services=(Service("web", (ServiceEntry(Proto.TCP, 80, 80),)),
                  Service("alt", (ServiceEntry(Proto.TCP, 82, 82),)), Service("any", (ServiceEntry(Proto.ANY),))),
        rulesets=(Ruleset("lab", (), (AllowRule((role("cli"),), (role("srv"),), ("web",)),)),),
        deny_rules=(DenyRule("no-alt", (role("cli"),), (role("srv"),), ("alt",)),),
    )


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that entered network namespace ``ns`` (setns is per thread)."""
    box: dict[str, object] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert libc.setns(fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        try:
            box["out"] = fn()
        except BaseException as exc:  # handed to the caller
            box["err"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["out"]  # type: ignore[return-value]


class Collector:
    """A reader living in one namespace, collecting until asked."""

    def __init__(self, ns: str) -> None:
        self.packets: list[LoggedPacket] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: in_netns(ns, self._run))
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        with NflogReader(GROUP) as reader:
            self.ready.set()
            while not self.stop.is_set():
                self.packets += reader.read(0.1)

    def finish(self) -> list[LoggedPacket]:
        time.sleep(0.3)  # the kernel batches log messages for up to 0.1 s (NflogReader's timeout_cs)
        self.stop.set()
        self.thread.join(10)
        return self.packets


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab([HostSpec("cli", CLI, (80, 81, 82)), HostSpec("srv", SRV, (80, 81, 82))]) as lab:
        yield lab


def run(lab: Lab, mode: EnforcementMode) -> tuple[list[LoggedPacket], list[LoggedPacket], dict[Probe, bool]]:
    p = policy(mode)
    backends = {h: NftablesBackend(netns=lab.netns(h), log_group=GROUP) for h in ("cli", "srv")}
    for h, b in backends.items():
        b.apply(b.render(compile_host(p, h)))
    cli, srv = Collector(lab.netns("cli")), Collector(lab.netns("srv"))
    probes = [Probe("cli", "srv", ProbeKind.TCP, c, s, port) for c, s in zip(CLI, SRV, strict=True)
              for port in (80, 81, 82)]
    probes += [Probe("cli", "srv", ProbeKind.ICMP_ECHO, c, s) for c, s in zip(CLI, SRV, strict=True)]
    results = {r.probe: r.succeeded for r in lab.probe(probes, timeout=0.5)}
    out = cli.finish(), srv.finish(), results
    for b in backends.values():
        b.remove()
        b.close()
    return out


def seen(packets: list[LoggedPacket]) -> set[tuple[str, str, Proto, int | None, Direction, Verdict, str]]:
    return {(str(p.key.src), str(p.key.dst), p.key.proto, p.key.port, p.side, p.verdict, p.rule_id)
            for p in packets}


def test_full_mode_logs_accepted_and_dropped_first_packets(lab: Lab) -> None:
    cli, srv, results = run(lab, EnforcementMode.FULL)
    assert [ok for p, ok in results.items() if p.port == 80] == [True, True]
    assert not any(ok for p, ok in results.items() if p.port != 80)
    out, inn = seen(cli), seen(srv)
    for c, s in zip(CLI, SRV, strict=True):
        assert (str(c), str(s), Proto.TCP, 80, Direction.OUTBOUND, Verdict.ALLOWED, "ruleset/lab/0") in out
        assert (str(c), str(s), Proto.TCP, 80, Direction.INBOUND, Verdict.ALLOWED, "ruleset/lab/0") in inn
        # no rule at the client for 81: dropped there by the default, never reaching the server
        assert (str(c), str(s), Proto.TCP, 81, Direction.OUTBOUND, Verdict.BLOCKED, "default") in out
        assert (str(c), str(s), Proto.TCP, 82, Direction.OUTBOUND, Verdict.BLOCKED, "deny/no-alt") in out
    echo = {(x[2], x[3], x[5]) for x in out if x[2].is_icmp and x[3] in (8, 128)}  # (MLD reports show up too)
    assert echo == {(Proto.ICMP, 8, Verdict.BLOCKED), (Proto.ICMPV6, 128, Verdict.BLOCKED)}
    # one logged packet per connection attempt that passed: replies are established, never logged
    assert sum(1 for p in srv if p.key.port == 80) == 2


def test_selective_mode_logs_default_accepts_and_enforced_denies(lab: Lab) -> None:
    cli, srv, results = run(lab, EnforcementMode.SELECTIVE)
    assert {p.port: ok for p, ok in results.items() if p.src.version == 4 and p.port} == {80: True, 81: True,
                                                                                          82: False}
    inn = seen(srv)
    for c, s in zip(CLI, SRV, strict=True):
        assert (str(c), str(s), Proto.TCP, 81, Direction.INBOUND, Verdict.ALLOWED, "default") in inn
        assert (str(c), str(s), Proto.TCP, 80, Direction.INBOUND, Verdict.ALLOWED, "ruleset/lab/0") in inn
    out = seen(cli)
    assert (str(CLI[0]), str(SRV[0]), Proto.TCP, 82, Direction.OUTBOUND, Verdict.BLOCKED, "deny/no-alt") in out


def test_visibility_mode_logs_would_be_drops_and_drops_nothing(lab: Lab) -> None:
    _cli, srv, results = run(lab, EnforcementMode.VISIBILITY)
    assert all(results.values())
    inn = seen(srv)
    for c, s in zip(CLI, SRV, strict=True):
        assert (str(c), str(s), Proto.TCP, 81, Direction.INBOUND, Verdict.POTENTIALLY_BLOCKED, "default") in inn
        assert (str(c), str(s), Proto.TCP, 82, Direction.INBOUND, Verdict.POTENTIALLY_BLOCKED, "deny/no-alt") in inn
        assert (str(c), str(s), Proto.TCP, 80, Direction.INBOUND, Verdict.ALLOWED, "ruleset/lab/0") in inn
    assert (str(SRV[1]), str(CLI[1]), Proto.ICMPV6, 128, Direction.INBOUND, Verdict.POTENTIALLY_BLOCKED,
            "default") not in inn  # the server never pinged
