"""Sanity of the kernel lab itself: the prober is trustworthy and teardown is complete.

Before any policy is applied, every probe between lab hosts must succeed (TCP, UDP,
ICMP echo; IPv4 and IPv6) and probes to closed ports must fail; a firewall that
drops or rejects must turn probes into failures; conntrack flushing must forget
flows; and nothing (namespaces, processes, state files) may outlive a lab.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from stockade.lab import HostSpec, Lab, LabError, Outcome, ProbeKind, list_namespaces, probe_matrix
from stockade.lab import netns as lab_netns
from stockade.model import Family, IPAddress

pytestmark = pytest.mark.kernel

TCP_PORTS = (80, 443, 8080)
UDP_PORTS = (53,)
CLOSED_TCP = 81
CLOSED_UDP = 54
SCTP_PORTS = (3868,)  # raw-socket SCTP (INIT -> INIT-ACK; closed port -> ABORT)
CLOSED_SCTP = 3869


def _hosts(n: int) -> list[HostSpec]:
    return [
        HostSpec(
            f"h{i}",
            (ipaddress.ip_address(f"10.70.0.{10 + i}"), ipaddress.ip_address(f"fd70::{10 + i:x}")),
            TCP_PORTS,
            UDP_PORTS,
            SCTP_PORTS,
        )
        for i in range(n)
    ]


def _pairs(hosts: list[HostSpec]) -> list[tuple[str, tuple[IPAddress, ...]]]:
    return [(h.name, h.addresses) for h in hosts]


def test_without_firewall_every_probe_succeeds_and_closed_ports_fail() -> None:
    hosts = _hosts(4)
    with Lab(hosts) as lab:
        probes = probe_matrix(
            _pairs(hosts), tcp_ports=(*TCP_PORTS, CLOSED_TCP), udp_ports=(*UDP_PORTS, CLOSED_UDP),
            sctp_ports=(*SCTP_PORTS, CLOSED_SCTP),
        )
        # 4*3 ordered pairs x (4 tcp + 2 udp + 2 sctp + icmp) x 2 families
        assert len(probes) == 12 * 9 * 2
        # generous: successes return in milliseconds, only a loaded machine gets near it
        results = lab.probe(probes, timeout=2.0)
    assert [r.probe for r in results] == list(probes)
    kinds = Counter((r.probe.kind, r.probe.family) for r in results if r.succeeded)
    for kind in ProbeKind:
        for fam in Family:
            assert kinds[(kind, fam)] > 0, (kind, fam)
    for r in results:
        closed = r.probe.port in (CLOSED_TCP, CLOSED_UDP, CLOSED_SCTP)
        if closed:
            assert r.outcome is Outcome.REFUSED, str(r)
        else:
            assert r.outcome is Outcome.OK, f"{r.probe}: {r.outcome.value} {r.detail}"
        if r.probe.kind is ProbeKind.TCP and not closed:
            assert r.detail == f"banner {r.probe.dst_host}"


def _nft(lab: Lab, host: str, ruleset: str) -> None:
    lab.run_in(host, ["nft", "-f", "-"], input=ruleset)


def test_dropping_and_rejecting_firewalls_make_probes_fail() -> None:
    hosts = _hosts(3)
    with Lab(hosts) as lab:
        _nft(
            lab,
            "h1",
            textwrap.dedent(
                """
                table inet sanity {
                    chain input { type filter hook input priority 0; policy drop; }
                }
                """
            ),
        )
        _nft(
            lab,
            "h2",
            textwrap.dedent(
                """
                table inet sanity {
                    chain input {
                        type filter hook input priority 0; policy accept;
                        ct state established,related accept
                        meta l4proto tcp reject with tcp reset
                        meta l4proto udp reject
                        icmp type echo-request drop
                        icmpv6 type echo-request drop
                    }
                }
                """
            ),
        )
        probes = probe_matrix(_pairs(hosts), tcp_ports=TCP_PORTS, udp_ports=UDP_PORTS)
        started = time.monotonic()
        results = lab.probe(probes, timeout=1.0)
        elapsed = time.monotonic() - started
    by_outcome: Counter[Outcome] = Counter()
    for r in results:
        by_outcome[r.outcome] += 1
        if r.probe.dst_host == "h0" and r.probe.src_host == "h2":
            # h2 accepts the answers to its own connections, so h2 -> h0 works
            assert r.succeeded, str(r)
        elif "h1" in (r.probe.src_host, r.probe.dst_host):
            # dropped on h1's input: the request (to h1) or the answer (from h1's peers) vanishes
            assert r.outcome is Outcome.TIMEOUT, f"{r.probe}: {r.outcome.value} {r.detail}"
        elif r.probe.dst_host == "h2":
            if r.probe.kind is ProbeKind.ICMP_ECHO:
                assert r.outcome is Outcome.TIMEOUT, str(r)
            elif r.probe.kind is ProbeKind.TCP:
                assert r.outcome is Outcome.REFUSED, str(r)
            else:
                # ICMP errors are rate-limited per peer by the kernel: some may never come
                assert r.outcome in (Outcome.REFUSED, Outcome.UNREACHABLE, Outcome.TIMEOUT), str(r)
        else:
            assert r.succeeded, str(r)
    assert by_outcome[Outcome.OK] > 0 and by_outcome[Outcome.TIMEOUT] > 0
    assert by_outcome[Outcome.REFUSED] > 0
    # all probes ran in parallel: the whole batch takes about one timeout, not one per probe
    assert elapsed < 6.0


_UDP_FIXED_PORT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 40000))
    s.settimeout(1.0)
    s.sendto(b"hello", (sys.argv[2], 53))
    try:
        print("ok" if s.recv(100) == b"hello" else "wrong")
    except OSError:
        print("fail")
    """
)


def test_flush_conntrack_forgets_established_flows() -> None:
    hosts = _hosts(2)
    src, dst = hosts[0].addresses[0], hosts[1].addresses[0]
    with Lab(hosts) as lab:

        def exchange() -> str:
            argv = [sys.executable, "-I", "-c", _UDP_FIXED_PORT, str(src), str(dst)]
            return lab.run_in("h0", argv).stdout.strip()

        base = "table inet cttest {\n chain input {\n type filter hook input priority 0; policy drop;\n"
        base += " %s\n }\n}\n"
        _nft(lab, "h1", base % "ct state established,related accept; udp dport 53 accept")
        assert exchange() == "ok"
        _nft(lab, "h1", "delete table inet cttest\n" + base % "ct state established,related accept")
        assert exchange() == "ok", "the tracked flow should still pass"
        lab.flush_conntrack()
        assert exchange() == "fail", "after a flush the flow is new and must be dropped"


def test_teardown_leaves_nothing_behind_even_after_an_error() -> None:
    hosts = _hosts(3)
    lab = Lab(hosts)
    with pytest.raises(RuntimeError), lab:
        names = lab.namespaces
        pids = lab.agent_pids
        assert set(names) <= set(list_namespaces())
        assert all(_alive(p) for p in pids)
        raise RuntimeError("a test failed inside the lab")
    present = set(list_namespaces())
    assert not set(names) & present
    assert not any(_alive(p) for p in pids)
    assert not lab_netns.state_path(lab.run_id).exists()
    with pytest.raises(LabError):
        lab.probe(())


def test_parallel_labs_do_not_collide() -> None:
    hosts = _hosts(2)
    with Lab(hosts) as one, Lab(hosts) as two:
        assert not set(one.namespaces) & set(two.namespaces)
        for lab in (one, two):
            results = lab.probe(probe_matrix(_pairs(hosts), tcp_ports=(80,), families=(Family.V4,)), timeout=2.0)
            assert all(r.succeeded for r in results)


_LAB_SCRIPT = textwrap.dedent(
    """
    import ipaddress, sys, time
    from stockade.lab import HostSpec, Lab
    lab = Lab([HostSpec("a", (ipaddress.ip_address("10.70.0.10"),), (80,))])
    lab.start()
    print(" ".join(lab.namespaces), flush=True)
    time.sleep(60)
    """
)


def _start_lab_process() -> tuple[subprocess.Popen[str], list[str]]:
    argv = [sys.executable, "-c", _LAB_SCRIPT]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert names and set(names) <= set(list_namespaces())
    return proc, names


def test_sigterm_tears_the_lab_down() -> None:
    proc, names = _start_lab_process()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert not set(names) & set(list_namespaces())


def test_a_killed_lab_is_swept_by_the_next_one() -> None:
    proc, names = _start_lab_process()
    proc.kill()  # SIGKILL: the lab cannot clean up after itself
    proc.wait(timeout=20)
    # (a lab starting concurrently in another test process may sweep it first: fine too)
    lab_netns.sweep_stale()
    assert not set(names) & set(list_namespaces())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_lab_ranges_are_blackholed_in_the_root_namespace_while_the_lab_runs() -> None:
    """A packet to a lab address whose namespace is not up fails here, never leaves by the default route."""
    hosts = [HostSpec("a", (ipaddress.ip_address("10.79.3.10"), ipaddress.ip_address("fd79:3::10")), (80,))]
    with Lab(hosts) as lab:
        assert lab.blackholed == ["10.79.3.0/24", "fd79:3::/64"]
        for addr in ("10.79.3.99", "fd79:3::99"):  # no namespace has these
            route = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True, check=False)
            assert route.returncode != 0 or route.stdout.startswith("blackhole"), route.stdout + route.stderr
            assert "dev eth" not in route.stdout and " via " not in route.stdout, route.stdout
