"""Benchmark of the nftables backend: apply cost, delta cost, connection rate, rule savings.

Run as root: ``python bench/nft_apply.py`` (``--quick`` for smaller sizes; ``--rules`` and
``--peers`` choose the axes). Everything runs in throwaway network namespaces (a server and
a client joined by a veth pair), removed at the end. Both nftables layouts are measured side
by side (``list``: the historic rule list; ``lookup``: port dispatch maps, the default).
Prints two tables:

1. per host policy (peer addresses x rules x layout): rule lines we install vs the lines a naive
   per-IP ruleset needs; render time (HostPolicy to nft text); our ``apply`` vs raw
   ``nft -f`` of the same file (ratio, target <= 1.2; medians of N interleaved pairs);
   one-peer delta through the netlink path (median and max of 40; target <= 10 ms at any
   size) and through ``nft -f`` for comparison;
2. TCP connection setup rate from the client to the server through a full-mode ruleset whose
   allowing set has 10 vs 100,000 peers (target: >= 90 %), plus no ruleset as a reference.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from stockade.backends.nftables.backend import DeltaPath, NftablesBackend
from stockade.backends.nftables.render import Layout
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.model.addresses import Family, IPNetwork
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

SRV4, CLI4 = "10.99.0.1", "10.99.0.2"

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.listen(1024)
    print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.close()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    host, seconds = sys.argv[1], float(sys.argv[2])
    n = failed = 0; end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\0\\0\\0\\0\\0\\0\\0")
        s.settimeout(2.0)
        try:
            s.connect((host, 80)); n += 1
        except OSError as exc:
            failed += 1; print(exc, file=sys.stderr)
        s.close()
    print(n / seconds, failed)
    """
)


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


@dataclass(frozen=True)
class Namespaces:
    srv: str
    cli: str

    @staticmethod
    def create() -> Namespaces:
        tag = uuid.uuid4().hex[:6]
        ns = Namespaces(f"stk-bench-srv-{tag}", f"stk-bench-cli-{tag}")
        for name in (ns.srv, ns.cli):
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "-n", ns.srv, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ns.cli)
        for name, addr in ((ns.srv, SRV4), (ns.cli, CLI4)):
            run("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", name, "link", "set", "eth0", "up")
        return ns

    def delete(self) -> None:
        for name in (self.srv, self.cli):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def peer_members(count: int, seed: int) -> list[IPNetwork]:
    """``count`` peers: single addresses that never merge (every other address), 1 % as /24s."""
    nets = count // 100
    hosts = count - nets
    base = int(ipaddress.IPv4Address("11.0.0.0")) + seed * (1 << 22)
    out: list[IPNetwork] = [ipaddress.IPv4Network((base + 2 * i, 32)) for i in range(hosts)]
    net_base = int(ipaddress.IPv4Address("100.64.0.0")) + seed * (1 << 20)
    out += [ipaddress.IPv4Network((net_base + (i << 8), 24)) for i in range(nets)]
    return sorted(out)


def host_policy(peers: int, rules: int, client_in_last: bool = True) -> HostPolicy:
    """``rules`` inbound allows over up to 50 peer sets holding ``peers`` addresses in total.

    The client's address is in the last set, referenced by the last rule (port 80), so a
    probe walks every rule before it is accepted.
    """
    n_sets = max(1, min(rules, 50))
    per_set = max(1, peers // n_sets)
    sets: list[AddressSet] = []
    for i in range(n_sets):
        members = peer_members(per_set - (1 if i == n_sets - 1 else 0), i)
        if i == n_sets - 1 and client_in_last:
            members = sorted([*members, ipaddress.IPv4Network(CLI4)])
        name = f"pbench{i:04d}"
        sets += [AddressSet(name, Family.V4, tuple(members)), AddressSet(name, Family.V6, ())]
    host_rules = [
        HostRule(
            Action.ALLOW,
            Direction.INBOUND,
            f"ruleset/bench/{i}",
            f"pbench{i % n_sets:04d}" if i < rules - 1 else f"pbench{n_sets - 1:04d}",
            (ServiceEntry(Proto.TCP, 80, 80) if i == rules - 1 else ServiceEntry(Proto.TCP, 1000 + i, 1000 + i),),
        )
        for i in range(rules)
    ]
    return HostPolicy(
        workload="bench",
        mode=EnforcementMode.FULL,
        local_addresses=(ipaddress.ip_address(SRV4),),
        rules=tuple(host_rules),
        sets=tuple(sorted(sets)),
        failsafe=Failsafe(),
    )


def naive_rule_count(hp: HostPolicy) -> int:
    """Rules a per-IP ruleset needs: one per (rule, peer address or CIDR)."""
    sizes = {(s.name, s.family): len(s.members) for s in hp.sets}
    return sum(sizes[(r.peer, Family.V4)] + sizes[(r.peer, Family.V6)] for r in hp.rules)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


@dataclass(frozen=True)
class ApplyRow:
    layout: str
    peers: int
    rules: int
    rule_lines: int
    naive_lines: int
    render_ms: float
    apply_ms: float
    raw_ms: float
    ratio: float  # median of the paired ratios: robust to load drifting on a shared machine
    delta_ms: float
    delta_max_ms: float
    cli_delta_ms: float


def measure_apply(
    ns: Namespaces, peers: int, rules: int, repeats: int, layout: Layout = Layout.LOOKUP
) -> ApplyRow:
    hp = host_policy(peers, rules)
    backend = NftablesBackend(netns=ns.srv, layout=layout)
    artifact = backend.render(hp)
    render_s = timed(lambda: backend.render(hp).to_text())  # the IR to the text nft reads
    text = artifact.to_text()
    fd, path = tempfile.mkstemp(suffix=".nft")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    ours: list[float] = []
    raw: list[float] = []
    backend.apply(artifact)  # warm up: the first load into an empty table is not what we compare
    try:
        for i in range(repeats):  # interleaved, alternating who goes first
            ours_first = i % 2 == 0
            if ours_first:
                ours.append(timed(lambda: backend.apply(artifact)))
            raw.append(timed(lambda: run("ip", "netns", "exec", ns.srv, "nft", "-f", path)))
            if not ours_first:
                ours.append(timed(lambda: backend.apply(artifact)))
    finally:
        os.unlink(path)
    backend.apply(artifact)
    deltas: list[float] = []
    target = hp.sets[0].name
    for i in range(21):
        one = (ipaddress.IPv4Network((int(ipaddress.IPv4Address("203.0.113.0")) + i, 32)),)
        deltas.append(timed(lambda one=one: backend.apply_delta((SetDelta(target, Family.V4, one, ()),))))
        deltas.append(timed(lambda one=one: backend.apply_delta((SetDelta(target, Family.V4, (), one),))))
    deltas = deltas[2:]  # the first pair opens the netlink socket
    cli = NftablesBackend(netns=ns.srv, delta_path=DeltaPath.NFT_CLI, layout=layout)
    one = (ipaddress.IPv4Network("198.51.100.7/32"),)
    cli_s = [
        timed(lambda: cli.apply_delta((SetDelta(target, Family.V4, one, ()),))),
        timed(lambda: cli.apply_delta((SetDelta(target, Family.V4, (), one),))),
    ]
    assert backend.verify(artifact).ok, "the kernel does not hold what was applied"
    backend.close()
    rule_lines = sum(len(c.rules) for c in artifact.chains)
    return ApplyRow(
        layout.value,
        peers,
        rules,
        rule_lines,
        naive_rule_count(hp),
        render_s * 1e3,
        statistics.median(ours) * 1e3,
        statistics.median(raw) * 1e3,
        statistics.median(o / r for o, r in zip(ours, raw, strict=True)),
        statistics.median(deltas) * 1e3,
        max(deltas) * 1e3,
        statistics.median(cli_s) * 1e3,
    )


def connection_rate(ns: Namespaces, seconds: float) -> float:
    """Connections per second of one client process; failures are reported, not counted."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns.cli, sys.executable, "-c", CLIENT, SRV4, str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    rate, failed = proc.stdout.split()
    if int(failed):
        print(f"  ({failed} connects failed: {proc.stderr.strip().splitlines()[-1]})", file=sys.stderr)
    return float(rate)


def measure_rates(ns: Namespaces, big: int, seconds: float, rounds: int) -> list[tuple[str, float]]:
    """Connection rate with no ruleset, 10 peers and ``big`` peers, interleaved over ``rounds``.

    Each configuration gets ``rounds`` runs of ``seconds``, alternating with the others, and
    reports its median, so background load on a shared machine hits all of them alike.
    """
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns.srv, sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        backend = NftablesBackend(netns=ns.srv)
        small = backend.render(host_policy(10, 10))
        large = backend.render(host_policy(big, 10))
        configs: list[tuple[str, Callable[[], None]]] = [
            ("no ruleset", backend.remove),
            ("10 peers, 10 rules", lambda: backend.apply(small)),
            (f"{big:,} peers, 10 rules", lambda: backend.apply(large)),
        ]
        samples: dict[str, list[float]] = {label: [] for label, _ in configs}
        connection_rate(ns, 0.5)  # warm up
        for _ in range(rounds):
            for label, setup in configs:
                setup()
                samples[label].append(connection_rate(ns, seconds))
        backend.remove()
        return [(label, statistics.median(samples[label])) for label, _ in configs]
    finally:
        server.kill()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    parser.add_argument("--rules", help="comma-separated rule counts (default 10,100,1000,5000)")
    parser.add_argument("--peers", help="comma-separated peer counts (default 100,10000,100000)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 1
    peer_sizes: tuple[int, ...] = (100, 1_000, 10_000) if args.quick else (100, 10_000, 100_000)
    rule_sizes: tuple[int, ...] = (10, 1_000) if args.quick else (10, 100, 1_000, 5_000)
    if args.rules:
        rule_sizes = tuple(int(x) for x in args.rules.split(","))
    if args.peers:
        peer_sizes = tuple(int(x) for x in args.peers.split(","))
    repeats = 3 if args.quick else 5
    seconds, rounds = (0.5, 3) if args.quick else (1.5, 5)
    nft_version = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"# nftables backend benchmark ({nft_version}, kernel {os.uname().release}, {os.cpu_count()} CPUs)")
    ns = Namespaces.create()
    started = time.perf_counter()
    try:
        header = (
            f"{'layout':<7} {'peers':>8} {'rules':>6} {'rule lines':>10} {'naive per-IP':>12} {'render ms':>9} "
            f"{'apply ms':>9} {'nft -f ms':>9} {'ratio':>6} {'delta ms':>9} {'delta max':>9} {'nft-cli delta':>13}"
        )
        print(header)
        print("-" * len(header))
        for peers in peer_sizes:
            for rules in rule_sizes:
                for layout in Layout:
                    reps = repeats if peers * rules >= 1_000_000 else 3 * repeats
                    r = measure_apply(ns, peers, rules, reps, layout)
                    print(
                        f"{r.layout:<7} {r.peers:>8,} {r.rules:>6,} {r.rule_lines:>10,} {r.naive_lines:>12,} "
                        f"{r.render_ms:>9.1f} {r.apply_ms:>9.1f} {r.raw_ms:>9.1f} {r.ratio:>6.2f} {r.delta_ms:>9.2f} "
                        f"{r.delta_max_ms:>9.2f} {r.cli_delta_ms:>10.1f} ms",
                        flush=True,
                )
        print()
        rates = measure_rates(ns, peer_sizes[-1], seconds, rounds)
        print(f"{'TCP connects/s (median of ' + str(rounds) + ' runs)':<34} {'conn/s':>9} {'vs 10 peers':>12}")
        ref = rates[1][1]
        for label, rate in rates:
            print(f"{label:<34} {rate:>9,.0f} {100 * rate / ref:>11.1f}%")
    finally:
        ns.delete()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
