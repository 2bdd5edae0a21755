"""Benchmark of the iptables+ipset backend (legacy and nft variants) next to the nftables backend.

Run as root: ``python bench/iptables_apply.py`` (``--quick`` for smaller sizes). Uses the
same host policies, namespaces (a server and a client on a veth pair) and client as
``bench/nft_apply.py``, whose nftables measurements it calls, and prints one table:

1. per backend (iptables in both layouts: ``lookup``, the default port index of chains, and
   the historic ``list``) and host policy (a rules axis 10/100/1,000/5,000 at 1,000 peers,
   then 100,000 peers at 10 and 1,000 rules): rule lines installed vs a naive
   per-IP ruleset, render time, our ``apply`` vs the raw binaries loading the same files
   (ratio, target <= 1.2; best of N interleaved runs), and a one-peer delta (target <= 10 ms).
   For iptables "raw" is, run one after the other, exactly what an apply loads: ``ipset
   -exist restore`` of the set file (new members under temporary names, then swapped in),
   ``iptables-restore --noflush`` and ``ip6tables-restore --noflush`` of the rule files, and
   ``ipset restore`` of the destroy file. Our apply reads the current rules (``iptables-save``,
   the rollback point) only when the tables' token says they changed since it last wrote or
   read them (``src/stockade/backends/iptables/generation.py``): "apply" is an apply after our
   own apply, "re-read" one right after the raw load changed the tables (for iptables-nft the
   raw load bumps the nf_tables generation, so that apply reads both tables first; legacy's
   token only sees a change of shape, and the raw load writes the same rules). Independent
   steps run concurrently. For nftables "raw" is ``nft -f`` of the same file. The one-peer
   delta goes the way the backend declares (``delta path``: ipset netlink messages, or the
   ``ipset`` command on code without them);
2. TCP connection setup rate from the client through a full-mode ruleset whose allowing
   sets hold 10 vs 100,000 peers (target >= 90 %), per backend, plus no ruleset at all.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import Layout
from stockade.backends.iptables.render import IptablesVariant
from stockade.backends.iptables.scripts import ipset_destroy_script, ipset_load_script, rules_script
from stockade.backends.nftables.backend import NftablesBackend
from stockade.compiler.ir import SetDelta
from stockade.model.addresses import Family

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: reuse the nftables bench
import nft_apply
from nft_apply import Namespaces, connection_rate, host_policy, naive_rule_count, timed


@dataclass(frozen=True)
class Row:
    backend: str
    peers: int
    rules: int
    rule_lines: int
    naive_lines: int
    render_ms: float
    apply_ms: float
    raw_ms: float
    delta_ms: float
    delta_max_ms: float
    reread_ms: float = float("nan")
    delta_path: str = "-"


def measure_iptables(
    ns: Namespaces, variant: IptablesVariant, peers: int, rules: int, repeats: int, layout: Layout = Layout.LOOKUP
) -> Row:
    hp = host_policy(peers, rules)
    backend = IptablesBackend(variant, netns=ns.srv, layout=layout)
    render_s = timed(lambda: backend.render(hp).to_text())
    artifact = backend.render(hp)
    backend.apply(artifact)  # warm up: the first load creates the chains and sets
    state = backend.snapshot().states
    r = backend.runner
    raw_cmds = [
        r.ipset_cmd(ipset_load_script(artifact.sets).text),
        *(r.restore_cmd(f, rules_script(artifact.ruleset(f), state[f], backend.prefix)) for f in Family),
        r.ipset_cmd(ipset_destroy_script(s.temp_name for s in artifact.sets)),
    ]

    def raw() -> None:
        for cmd in raw_cmds:
            res = r.run(cmd)
            assert res.ok, res.message()

    ours: list[float] = []
    rereads: list[float] = []
    raws: list[float] = []
    for _ in range(repeats):  # interleaved: raw, then an apply right after it, then one after our own
        raws.append(timed(raw))
        rereads.append(timed(lambda: backend.apply(artifact)))
        ours.append(timed(lambda: backend.apply(artifact)))
    backend.apply(artifact)
    deltas: list[float] = []
    target = hp.sets[0].name
    for i in range(20):
        one = (ipaddress.IPv4Network((int(ipaddress.IPv4Address("203.0.113.0")) + i, 32)),)
        deltas.append(timed(lambda one=one: backend.apply_delta((SetDelta(target, Family.V4, one, ()),))))
        deltas.append(timed(lambda one=one: backend.apply_delta((SetDelta(target, Family.V4, (), one),))))
    report = backend.verify(artifact)
    assert report.ok, report.problems
    used = getattr(backend, "delta_path_used", None)  # None: code before the netlink path
    backend.remove()
    if hasattr(backend, "close"):
        backend.close()
    lines = sum(len(c.rules) for rs in artifact.rulesets for c in rs.chains)
    return Row(
        f"ipt-{variant.value}-{layout.value}",
        peers,
        rules,
        lines,
        naive_rule_count(hp),
        render_s * 1e3,
        min(ours) * 1e3,  # best of N: the machine is shared, noise only ever adds time
        min(raws) * 1e3,
        statistics.median(deltas) * 1e3,
        max(deltas) * 1e3,
        min(rereads) * 1e3,
        used.value if used is not None else "ipset-cli",
    )


def measure_nftables(ns: Namespaces, peers: int, rules: int, repeats: int) -> Row:
    a = nft_apply.measure_apply(ns, peers, rules, repeats)
    NftablesBackend(netns=ns.srv).remove()
    return Row(
        "nftables", a.peers, a.rules, a.rule_lines, a.naive_lines, a.render_ms, a.apply_ms, a.raw_ms,
        a.delta_ms, a.delta_max_ms, a.apply_ms, "netlink",
    )  # fmt: skip


Setup = Callable[[], None]


def measure_rates(
    ns: Namespaces, variants: tuple[IptablesVariant, ...], big: int, seconds: float, rounds: int
) -> list[tuple[str, str, float]]:
    """(backend, configuration, median conn/s): no ruleset, then 10 and ``big`` peers per backend.

    Configurations alternate within each round, so background load hits all of them alike;
    every setup removes whatever the previous one installed.
    """
    nft = NftablesBackend(netns=ns.srv)
    ipts = [IptablesBackend(v, netns=ns.srv) for v in variants]
    everyone: list[NftablesBackend | IptablesBackend] = [nft, *ipts]
    small_hp, large_hp = host_policy(10, 10), host_policy(big, 10)

    def only(backend: NftablesBackend | IptablesBackend | None, hp_size: str) -> Setup:
        def setup() -> None:
            for b in everyone:
                if b is not backend:
                    b.remove()
            if backend is not None:
                backend.apply(backend.render(small_hp if hp_size == "small" else large_hp))  # type: ignore[arg-type]

        return setup

    configs: list[tuple[str, str, Setup]] = [("-", "no ruleset", only(None, ""))]
    for label, b in [("nftables", nft), *((f"iptables-{v.value}", i) for v, i in zip(variants, ipts, strict=True))]:
        configs.append((label, "10 peers, 10 rules", only(b, "small")))
        configs.append((label, f"{big:,} peers, 10 rules", only(b, "large")))
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns.srv, sys.executable, "-c", nft_apply.SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        samples: dict[tuple[str, str], list[float]] = {(b, c): [] for b, c, _ in configs}
        connection_rate(ns, 0.5)  # warm up
        for _ in range(rounds):
            for b, c, setup in configs:
                setup()
                samples[(b, c)].append(connection_rate(ns, seconds))
        only(None, "")()
        return [(b, c, statistics.median(samples[(b, c)])) for b, c, _ in configs]
    finally:
        server.kill()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    parser.add_argument("--rules", help="comma-separated rule counts (with --peers; default: the built-in axis)")
    parser.add_argument("--peers", type=int, default=1_000, help="peer addresses with --rules (default 1000)")
    parser.add_argument("--no-rates", action="store_true", help="skip the connection-rate table")
    parser.add_argument("--layouts", default="lookup,list", help="iptables layouts to measure (default: both)")
    parser.add_argument("--variants", default="legacy,nft", help="iptables variants to measure (default: both)")
    parser.add_argument("--repeats", type=int, help="interleaved runs per row (default: 5, or 15 for small rows)")
    parser.add_argument("--tag", default="", help="a label printed in front of every row (e.g. which code ran)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, iptables, ipset)", file=sys.stderr)
        return 1
    # the rules axis at 1,000 peers, then large peer sets at 10 and 1,000 rules
    sizes = [(1_000, r) for r in ((10, 1_000) if args.quick else (10, 100, 1_000, 5_000))]
    sizes += [(10_000, 10)] if args.quick else [(100_000, 10), (100_000, 1_000)]
    if args.rules:
        sizes = [(args.peers, int(r)) for r in args.rules.split(",")]
    peer_sizes = (10_000,) if args.quick else (100_000,)
    repeats = 3 if args.quick else 5
    seconds, rounds = (0.5, 3) if args.quick else (1.5, 5)
    variants = tuple(IptablesVariant(v) for v in args.variants.split(","))
    layouts = tuple(Layout(v) for v in args.layouts.split(","))
    versions = [
        subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        for argv in (["nft", "--version"], ["iptables-legacy", "--version"], ["iptables-nft", "--version"],
                     ["ipset", "--version"])
    ]  # fmt: skip
    print(f"# iptables+ipset vs nftables backend benchmark ({'; '.join(versions)}; kernel {os.uname().release}, "
          f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")  # fmt: skip
    ns = Namespaces.create()
    started = time.perf_counter()
    try:
        header = (
            f"{'tag':<6} {'backend':<18} {'peers':>8} {'rules':>6} {'rule lines':>10} {'naive per-IP':>12} "
            f"{'render ms':>9} {'apply ms':>9} {'re-read':>9} {'raw ms':>9} {'ratio':>6} {'ratio rr':>8} "
            f"{'delta ms':>9} {'delta max':>9} {'delta path':>10}"
        )
        print(header)
        print("-" * len(header))
        for peers, rules in sizes:
            n = repeats if peers * rules >= 1_000_000 or rules >= 1_000 else 3 * repeats
            n = args.repeats or n
            rows = [measure_nftables(ns, peers, rules, n)]
            rows += [measure_iptables(ns, v, peers, rules, n, layout) for v in variants for layout in layouts]
            for r in rows:
                print(
                    f"{args.tag:<6} {r.backend:<18} {r.peers:>8,} {r.rules:>6,} {r.rule_lines:>10,} "
                    f"{r.naive_lines:>12,} {r.render_ms:>9.1f} {r.apply_ms:>9.1f} {r.reread_ms:>9.1f} "
                    f"{r.raw_ms:>9.1f} {r.apply_ms / r.raw_ms:>6.2f} {r.reread_ms / r.raw_ms:>8.2f} "
                    f"{r.delta_ms:>9.2f} {r.delta_max_ms:>9.2f} {r.delta_path:>10}",
                    flush=True,
                )
            print(f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        if args.no_rates:
            return 0
        print()
        rates = measure_rates(ns, variants, peer_sizes[-1], seconds, rounds)
        print(f"{'backend':<16} {'TCP connects/s (median of ' + str(rounds) + ' runs)':<34} {'conn/s':>9} "
              f"{'vs 10 peers':>12}")  # fmt: skip
        ref: dict[str, float] = {}
        for backend, config, rate in rates:
            if config.startswith("10 peers"):
                ref[backend] = rate
            share = f"{100 * rate / ref[backend]:>11.1f}%" if backend in ref and not config.startswith("10 ") else ""
            print(f"{backend:<16} {config:<34} {rate:>9,.0f} {share:>12}")
    finally:
        ns.delete()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
