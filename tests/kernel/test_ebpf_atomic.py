"""Atomic policy switches in the eBPF backend, under a stream of real connections.

Two policies for server ``b`` are built so that any *mix* of them (peer trie of one
generation with the policy trie of the other, as an in-place update would expose) lets
through connections that neither policy allows:

* P1: set ``pa1`` = {a} -> identity 1, ``pb1`` = {c} -> identity 2;
  identity 1 may use tcp/443, identity 2 tcp/80.
* P2: set ``pa2`` = {c} -> identity 1, ``pb2`` = {a} -> identity 2;
  identity 1 may use udp/53, identity 2 tcp/8080.

From ``a``: tcp/443 only under P1, tcp/8080 only under P2, and tcp/80 or udp/53 only in a
mixed state (P2's peers with P1's rules, or the reverse). While one thread probes
continuously (v4 and v6), the test swaps P1 and P2 as fast as it can; a connection on
80 or 53 that gets through is a mismatch and must never happen. The probes must also see
both policies in force (443 and 8080 each get through at some point).

A second test follows one long-lived TCP connection across applies: re-applying a policy
that still allows it keeps it working (its flow is re-checked, not dropped); a policy
that no longer allows it cuts it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.compiler.ir import Direction, HostPolicy
from stockade.lab import Lab, Probe, ProbeKind
from stockade.model.rules import Action
from stockade.model.workloads import EnforcementMode
from tests.kernel.test_ebpf_backend import ADDR, HOSTS, SKIP, host_policy, rule, tcp, udp

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

SWAPS = 60  # at least this many swaps ...
MIN_SECONDS = 5.0  # ... and for at least this long, so the stream sees many connections


def policy_one() -> HostPolicy:
    return host_policy(
        "b",
        [
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/one/0", "pa1", tcp(443)),
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/one/1", "pb1", tcp(80)),
        ],
        {"pa1": [*ADDR["a"]], "pb1": [*ADDR["c"]]},
    )


def policy_two() -> HostPolicy:
    return host_policy(
        "b",
        [
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/two/0", "pa2", udp(53)),
            rule(Action.ALLOW, Direction.INBOUND, "ruleset/two/1", "pb2", tcp(8080)),
        ],
        {"pa2": [*ADDR["c"]], "pb2": [*ADDR["a"]]},
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(HOSTS) as the_lab:
        yield the_lab


@pytest.fixture
def server(lab: Lab) -> Iterator[EbpfBackend]:
    backend = EbpfBackend(netns=lab.netns("b"))
    try:
        yield backend
    finally:
        backend.remove()
        backend.close()


def test_identities_cross_between_the_two_policies(server: EbpfBackend) -> None:
    """The premise of the switch test: a's identity number differs between P1 and P2."""
    one, two = server.render(policy_one()), server.render(policy_two())
    a4 = int(ADDR["a"][0])
    ident = {art.workload + str(i): p.identity for i, art in enumerate((one, two)) for p in art.peers if p.start == a4}
    assert ident == {"b0": 1, "b1": 2}


def test_no_connection_sees_a_mix_of_two_policies(lab: Lab, server: EbpfBackend) -> None:
    one, two = server.render(policy_one()), server.render(policy_two())
    server.apply(one)
    batch = [
        Probe("a", "b", kind, ADDR["a"][i], ADDR["b"][i], port)
        for i in (0, 1)
        for kind, port in ((ProbeKind.TCP, 80), (ProbeKind.TCP, 443), (ProbeKind.TCP, 8080), (ProbeKind.UDP, 53))
    ]
    counts = {"connections": 0, "mismatches": 0, "p1_only": 0, "p2_only": 0}
    mismatches: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            while not stop.is_set():
                for r in lab.probe(batch, timeout=0.25):
                    counts["connections"] += 1
                    port = r.probe.port
                    if r.succeeded and port in (80, 53):
                        counts["mismatches"] += 1
                        mismatches.append(f"{r.probe} got through: allowed by neither policy")
                    elif r.succeeded and port == 443:
                        counts["p1_only"] += 1
                    elif r.succeeded and port == 8080:
                        counts["p2_only"] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    prober = threading.Thread(target=stream, daemon=True)
    prober.start()
    started = time.monotonic()
    swaps = 0
    try:
        while swaps < SWAPS or time.monotonic() - started < MIN_SECONDS:
            server.apply(two if swaps % 2 == 0 else one)
            swaps += 1
            time.sleep(0.01)
    finally:
        stop.set()
        prober.join(timeout=30)
    elapsed = time.monotonic() - started
    assert not errors, errors
    print(f"atomic switch: {swaps} swaps in {elapsed:.1f} s, {counts}")
    assert counts["mismatches"] == 0, mismatches[:10]
    assert counts["connections"] >= 10 * len(batch)
    assert counts["p1_only"] > 0 and counts["p2_only"] > 0, counts


CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.settimeout(0.5)
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            s.sendall(b"x")
            print("ok" if s.recv(1) == b"x" else "closed", flush=True)
        except OSError as exc:
            print(type(exc).__name__, flush=True)
    """
)
SERVER = textwrap.dedent(
    """
    import socket, sys
    l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen(1)
    print("ready", flush=True)
    c, _ = l.accept()
    while True:
        data = c.recv(1)
        if not data:
            break
        c.sendall(data)
    """
)


def test_established_connection_is_rechecked_on_apply(lab: Lab, server: EbpfBackend) -> None:
    port = 9443
    allow = host_policy("b", [rule(Action.ALLOW, Direction.INBOUND, "ruleset/keep/0", "pa", tcp(port))],
                        {"pa": [*ADDR["a"]]})
    other = host_policy("b", [rule(Action.ALLOW, Direction.INBOUND, "ruleset/keep/0", "pa", tcp(port), tcp(80))],
                        {"pa": [*ADDR["a"]]})
    revoked = host_policy("b", [rule(Action.ALLOW, Direction.INBOUND, "ruleset/keep/0", "pa", tcp(80))],
                          {"pa": [*ADDR["a"]]}, mode=EnforcementMode.FULL)
    server.apply(server.render(allow))
    srv = subprocess.Popen(["ip", "netns", "exec", lab.netns("b"), sys.executable, "-c", SERVER, str(port)],
                           stdout=subprocess.PIPE, text=True)
    cli: subprocess.Popen[str] | None = None
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        cli = subprocess.Popen(
            ["ip", "netns", "exec", lab.netns("a"), sys.executable, "-c", CLIENT, str(ADDR["b"][0]), str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert cli.stdin is not None and cli.stdout is not None
        assert cli.stdout.readline().strip() == "connected"

        def ping() -> str:
            assert cli is not None and cli.stdin is not None and cli.stdout is not None
            cli.stdin.write("ping\n")
            cli.stdin.flush()
            return cli.stdout.readline().strip()

        assert ping() == "ok"
        before = server.stats()["revalidated"]
        server.apply(server.render(allow))  # same policy, new epoch: the flow is re-checked and kept
        assert ping() == "ok"
        server.apply(server.render(other))
        assert ping() == "ok"
        assert server.stats()["revalidated"] > before
        server.apply(server.render(revoked))  # no longer allowed: cut at its next packet
        assert ping() != "ok"
        assert server.stats()["revoked"] >= 1
    finally:
        for proc in (cli, srv):
            if proc is not None:
                proc.kill()
                proc.wait()
