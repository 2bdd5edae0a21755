"""Proof time and memory per host: 10 / 100 / 1,000 rules x 100 / 10,000 / 100,000 peer addresses.

For each size a seeded random HostPolicy (:mod:`stockade.verify.samples`) is loaded into a
fresh network namespace by the backend, read back and proven (:func:`prove`); the table shows
the read-back time, the proof time (without tracemalloc), the peak Python memory of the proof
(a second run under tracemalloc) and, side by side, an ESTIMATE of a sampled probe run of
``--probes`` packets in the lab (1 ms per accepted TCP connect, the 0.4 s timeout of the lab's
probes per dropped one, with the policy's own accept share of the sampled packets unknown: the
column shows the lower bound, every probe accepted, and the full-mode typical case, 90 %
dropped), which says nothing about the packets not sent.

Two shapes of peer sets: ``identities`` (peers grouped as workloads with the same labels, sets
are unions of groups: the address classes are bounded by the groups) and ``random`` (every set
draws from all peers: nearly every address in its own combination, the prover's worst case).

Run as root:  python bench/verify.py [--backends nftables,iptables-legacy,iptables-nft,ebpf] [--quick]

The "read s" and "prove s" columns are wall time; "read cpu" and "prove cpu" are CPU time (this
process and its children: nft, iptables-save; the kernel's time answering dumps included), which a
loaded shared machine does not inflate; "cpu s" is their sum. The load average is printed before
every row. For nftables, "json cpu" is the CPU time of the old read-back (``nft -j list table`` and
its parser) on the same loaded table, side by side with the netlink read-back the proof now uses
(both are parsed into the same model: tests/kernel/test_verify_nft_netlink.py).

``--before REF`` (e.g. ``main``): side by side, the prover of git revision REF (its prove,
interpret, rulematch, space and spec modules, loaded from ``git show`` under another package name; the
read-back and its IR are shared) proves the same read-back right after: column ``before cpu``.

``--save DIR`` pickles each size's (HostPolicy, read-back) into DIR; ``--saved DIR`` proves those
pickles again without a kernel (no root), ``--rounds`` times, this tree's prover (``first``: the
HostPolicy freshly unpickled, nothing cached; ``repeat``: the same objects proven again, what the
agent does periodically) interleaved with ``--before``'s, so both see the same load.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import IptablesVariant
from stockade.backends.nftables.backend import NftablesBackend
from stockade.verify.prove import prove
from stockade.verify.readback import read_loaded, read_nftables_json
from stockade.verify.samples import random_host_policy

ACCEPTED_S, DROPPED_S = 0.001, 0.4


def _backend(name: str, ns: str) -> NftablesBackend | IptablesBackend | EbpfBackend:
    if name == "nftables":
        return NftablesBackend("stkbench", netns=ns)
    if name == "ebpf":  # tc programs need an interface to attach to
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        return EbpfBackend(netns=ns, table="stkbench")
    variant = IptablesVariant.LEGACY if name == "iptables-legacy" else IptablesVariant.NFT
    return IptablesBackend(netns=ns, variant=variant)


_PROVER_MODULES = ("prove", "interpret", "rulematch", "space", "spec", "members", "rulescan")


def _prover_at(ref: str) -> Callable[..., object]:
    """``prove`` as it was at git revision ``ref`` (modules it lacks are skipped)."""
    root = Path(tempfile.mkdtemp(prefix="stk-bench-before-"))
    pkg = root / "stockade_verify_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    repo = Path(__file__).resolve().parent.parent
    for name in _PROVER_MODULES:
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{ref}:src/stockade/verify/{name}.py"], capture_output=True, text=True
        )
        if shown.returncode != 0:
            continue
        text = shown.stdout
        for other in _PROVER_MODULES:
            text = text.replace(f"stockade.verify.{other} ", f"stockade_verify_before.{other} ")
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root))
    module = importlib.import_module("stockade_verify_before.prove")
    return module.prove  # type: ignore[no-any-return]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="nftables,iptables-legacy,iptables-nft,ebpf")
    ap.add_argument("--no-json", action="store_true", help="skip the nft -j side-by-side read-back")
    ap.add_argument("--quick", action="store_true", help="only 10/100 rules and 100/10,000 peers")
    ap.add_argument("--probes", type=int, default=1000, help="size of the sampled probe run compared")
    ap.add_argument("--shapes", default="identities")
    ap.add_argument("--rules", default="", help="comma-separated rule counts (overrides the grid)")
    ap.add_argument("--peers", default="", help="comma-separated peer counts (overrides the grid)")
    ap.add_argument("--before", default="", help="git revision whose prover runs side by side (e.g. main)")
    ap.add_argument("--save", default="", help="directory to pickle (HostPolicy, read-back) per size into")
    ap.add_argument("--saved", default="", help="prove the pickles of this directory (no kernel), see the doc")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --saved")
    args = ap.parse_args()
    if args.saved:
        _prove_saved(Path(args.saved), args.rounds, _prover_at(args.before) if args.before else None)
        return
    prove_before = _prover_at(args.before) if args.before else None
    rules_sizes: tuple[int, ...] = (10, 100) if args.quick else (10, 100, 1000)
    peer_sizes: tuple[int, ...] = (100, 10_000) if args.quick else (100, 10_000, 100_000)
    if args.rules:
        rules_sizes = tuple(int(n) for n in args.rules.split(","))
    if args.peers:
        peer_sizes = tuple(int(n) for n in args.peers.split(","))
    low = args.probes * ACCEPTED_S
    typical = args.probes * (0.1 * ACCEPTED_S + 0.9 * DROPPED_S)
    print(f"{'backend':16} {'shape':10} {'rules':>5} {'peers':>7} {'classes':>7} {'read s':>7} {'prove s':>8} "
          f"{'read cpu':>8} {'prove cpu':>9} {'cpu s':>7} {'json cpu':>8} {'peak MiB':>8} {'probes s (est.)':>16} "
          f"{'proven':>6} {'before cpu':>10} {'classes':>7} {'load':>5}")
    for backend_name in args.backends.split(","):
        ns = f"stk-bv-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        backend = None
        try:
            backend = _backend(backend_name, ns)
            for shape in args.shapes.split(","):
                for n_rules in rules_sizes:
                    for n_peers in peer_sizes:
                        hp = random_host_policy(
                            random.Random(n_rules * 7 + n_peers), rules=n_rules, peers=n_peers,
                            sets=max(4, n_rules // 4), identities=200 if shape == "identities" else None,
                        )
                        backend.apply(backend.render(hp))  # type: ignore[arg-type]
                        load = os.getloadavg()[0]
                        c0 = _cpu()
                        t0 = time.perf_counter()
                        loaded = read_loaded(backend_name, netns=ns, table="stkbench")
                        t1 = time.perf_counter()
                        c1 = _cpu()
                        if args.save:
                            Path(args.save).mkdir(parents=True, exist_ok=True)
                            out = Path(args.save) / f"{backend_name}-{shape}-{n_rules}-{n_peers}.pickle"
                            out.write_bytes(pickle.dumps((hp, loaded)))
                        proof = prove(hp, loaded)
                        t2 = time.perf_counter()
                        c2 = _cpu()
                        json_cpu = "-"
                        if backend_name == "nftables" and not args.no_json:
                            read_nftables_json("stkbench", ns)
                            json_cpu = f"{_cpu() - c2:.2f}"
                        before_cpu, before_classes = "-", "-"
                        if prove_before is not None:
                            c3 = _cpu()
                            old = prove_before(hp, loaded)
                            before_cpu = f"{_cpu() - c3:.2f}"
                            before_classes = f"{old.classes}"  # type: ignore[attr-defined]
                            assert old.proven == proof.proven  # type: ignore[attr-defined]
                        tracemalloc.start()
                        prove(hp, loaded)
                        peak = tracemalloc.get_traced_memory()[1] / 2**20
                        tracemalloc.stop()
                        probes = f"{low:.0f}..{typical:.0f}"
                        print(f"{backend_name:16} {shape:10} {n_rules:5} {n_peers:7} {proof.classes:7} "
                              f"{t1 - t0:7.3f} {t2 - t1:8.3f} {c1 - c0:8.2f} {c2 - c1:9.2f} {c2 - c0:7.2f} "
                              f"{json_cpu:>8} {peak:8.1f} {probes:>16} {proof.proven!s:>6} {before_cpu:>10} "
                              f"{before_classes:>7} {load:5.1f}",
                              flush=True)
        finally:
            if backend is not None:
                backend.remove()  # eBPF pins live in bpffs, not in the namespace
            subprocess.run(["ip", "netns", "delete", ns], check=False)


def _prove_saved(where: Path, rounds: int, prove_before: Callable[..., object] | None) -> None:
    """Prove each pickled (HostPolicy, read-back) of ``where``: ``rounds`` rounds of (before,
    first, repeat), interleaved; CPU seconds of this process, medians printed last."""
    print(f"{'read-back':44} {'round':>5} {'before':>7} {'first':>7} {'repeat':>7} {'proven':>6} {'load':>5}")
    for path in sorted(where.glob("*.pickle")):
        blob = path.read_bytes()
        cols: dict[str, list[float]] = {"before": [], "first": [], "repeat": []}
        for i in range(rounds):
            load = os.getloadavg()[0]
            before = "-"
            if prove_before is not None:
                hp, loaded = pickle.loads(blob)
                c0 = _cpu()
                prove_before(hp, loaded)
                cols["before"].append(_cpu() - c0)
                before = f"{cols['before'][-1]:.2f}"
            hp, loaded = pickle.loads(blob)  # fresh objects: no cache keyed by identity hits
            c0 = _cpu()
            proof = prove(hp, loaded)
            c1 = _cpu()
            again = prove(hp, loaded)
            c2 = _cpu()
            assert proof.proven == again.proven
            cols["first"].append(c1 - c0)
            cols["repeat"].append(c2 - c1)
            print(f"{path.stem:44} {i:5} {before:>7} {c1 - c0:7.2f} {c2 - c1:7.2f} {proof.proven!s:>6} {load:5.1f}",
                  flush=True)
        med = {k: (f"{sorted(v)[len(v) // 2]:.2f}" if v else "-") for k, v in cols.items()}
        print(f"{path.stem:44} {'med':>5} {med['before']:>7} {med['first']:>7} {med['repeat']:>7}", flush=True)


if __name__ == "__main__":
    main()
