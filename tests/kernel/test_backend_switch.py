"""Backend switch with no gap: for every ordered pair of Linux backends, a server namespace moves
from one to the other (Enforcer.switch_backend, make-before-break) while a client keeps a
continuous probe stream going: persistent connections (v4 and v6) stay up and answer every round,
new allowed connections always succeed, new connections the policy blocks never get through. After
the switch only the new backend's rules are in force."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.agent.enforcer import Enforcer
from stockade.backends.registry import get_backend
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.lab import HostSpec, Lab
from stockade.lab import netns as labnetns
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from tests.kernel.test_ebpf_backend import ebpf_skip_reason

pytestmark = pytest.mark.kernel

STREAM = Path(__file__).with_name("switch_stream.py")
SERVER = (ipaddress.ip_address("10.70.244.1"), ipaddress.ip_address("fd70:244::1"))
CLIENT = (ipaddress.ip_address("10.70.244.2"), ipaddress.ip_address("fd70:244::2"))
ECHO, ALLOWED, BLOCKED = 7000, 80, 81
LINUX = ["nftables", "iptables", "ebpf"]
PAIRS = list(itertools.permutations(LINUX, 2))
ECHO_SERVER = (
    "import socket, threading\n"
    "def serve(fam, addr):\n"
    "    s = socket.socket(fam, socket.SOCK_STREAM)\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
    "    s.bind((addr, 7000)); s.listen(16)\n"
    "    while True:\n"
    "        c, _ = s.accept()\n"
    "        threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(64), b'')],\n"
    "                         daemon=True).start()\n"
    "threading.Thread(target=serve, args=(socket.AF_INET6, '::'), daemon=True).start()\n"
    "print('listening', flush=True)\n"
    "serve(socket.AF_INET, '0.0.0.0')\n"
)


def server_policy() -> HostPolicy:
    entries = (ServiceEntry(Proto.TCP, ALLOWED, ALLOWED), ServiceEntry(Proto.TCP, ECHO, ECHO))
    return HostPolicy(
        workload="server",
        mode=EnforcementMode.FULL,
        local_addresses=SERVER,
        rules=(HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/switch/0", "client", entries),),
        sets=(AddressSet("client", Family.V4, (ipaddress.ip_network(f"{CLIENT[0]}/32"),)),
              AddressSet("client", Family.V6, (ipaddress.ip_network(f"{CLIENT[1]}/128"),))),
        failsafe=Failsafe(management=()),
    )


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_switch_keeps_connections_and_blocks(old: str, new: str, record_property: pytest.RecordProperty) -> None:
    if "ebpf" in (old, new) and (reason := ebpf_skip_reason()):
        pytest.skip(reason)
    hosts = [HostSpec("server", SERVER, (ALLOWED, BLOCKED)), HostSpec("client", CLIENT)]
    with Lab(hosts) as lab:
        ns = lab.netns("server")
        echo = subprocess.Popen(labnetns.ns_exec_argv(ns, [sys.executable, "-I", "-c", ECHO_SERVER]),
                                stdout=subprocess.PIPE, text=True)
        stream = None
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
            first = get_backend(old, netns=ns)
            enforcer = Enforcer(first)
            enforcer.enforce(server_policy())
            argv = [sys.executable, "-I", str(STREAM), str(SERVER[0]), str(SERVER[1]), str(ECHO), str(ALLOWED),
                    str(BLOCKED)]
            stream = subprocess.Popen(labnetns.ns_exec_argv(lab.netns("client"), argv), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert stream.stdout is not None and stream.stdin is not None
            assert stream.stdout.readline().strip() == "ready", stream.stderr.read() if stream.stderr else ""
            assert stream.stdout.readline().startswith("tick")  # one full round before the switch
            second = get_backend(new, netns=ns)
            enforcer.switch_backend(second)
            for _ in range(2):  # two full rounds after it
                assert stream.stdout.readline().startswith("tick")
            stream.stdin.close()
            lines = stream.stdout.read().strip().splitlines()
            stats = json.loads(lines[-1])
            assert first.read_back() == "", f"{old}'s rules are still there after the switch"
            assert second.read_back().strip(), f"{new}'s rules are not in force"
        finally:
            for proc in (stream, echo):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            with_suppressed_remove(ns)
    assert stats["persistent_fail"] == [], stats
    assert stats["allowed_fail"] == [], stats
    assert stats["blocked_got_through"] == [], stats
    assert stats["rounds"] >= 3 and stats["blocked_refused"] >= 6
    record_property("lab_summary", f"switch {old} -> {new}: {stats['rounds']} rounds, "
                                   f"{stats['persistent_ok']} persistent echoes, {stats['allowed_ok']} new allowed, "
                                   f"{stats['blocked_refused']} blocked")


def with_suppressed_remove(ns: str) -> None:
    """Remove whatever any backend left (the namespace goes away with the lab anyway)."""
    for name in LINUX:
        with contextlib.suppress(Exception):  # cleanup: the namespace is deleted next
            get_backend(name, netns=ns).remove()
