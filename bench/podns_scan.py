"""The node agent's procfs scan for new pods' namespaces (issue 15): this tree's NamespaceIndex against
another tree's, interleaved in one process on the same /proc.

The node agent looks for an awaiting pod's namespace every 10 ms (stockade.k8s.podns.NamespaceIndex);
a scan that is slow is a new pod's sandbox noticed late. Each round runs one ``find`` of each index
(order alternating), ``--gap`` apart; ``--burst N`` starts N short-lived processes every second
(what a busy node, or other tests on this machine, do), so new and young processes are read.

    python bench/podns_scan.py --baseline-src /tmp/base/src --rounds 1000 --burst 100
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from stockade.k8s import podns  # noqa: E402


def _load(src: Path) -> Any:
    spec = importlib.util.spec_from_file_location("podns_baseline", src / "stockade" / "k8s" / "podns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _p(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} / {statistics.quantiles(ms, n=100)[98]:.2f} / {max(ms):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-src", type=Path, required=True, help="the other tree's src/ (e.g. main's)")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--gap", type=float, default=0.01, help="seconds between rounds (the node agent's NS_POLL)")
    ap.add_argument("--burst", type=int, default=0, help="short-lived processes started every second")
    args = ap.parse_args()
    indexes = {"baseline": _load(args.baseline_src).NamespaceIndex(min_gap=0.0), "this tree":
               podns.NamespaceIndex(min_gap=0.0)}
    uid = str(uuid.uuid4())
    took: dict[str, list[float]] = {k: [] for k in indexes}
    procs: list[subprocess.Popen[bytes]] = []
    last_burst = 0.0
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {len(os.listdir('/proc'))} /proc entries")
    try:
        for i in range(args.rounds):
            if args.burst and time.monotonic() - last_burst >= 1.0:
                last_burst = time.monotonic()
                for p in procs:
                    p.wait()
                procs = [subprocess.Popen(["sleep", "0.5"]) for _ in range(args.burst)]
            names = list(indexes) if i % 2 else list(reversed(indexes))
            for name in names:
                t = time.perf_counter()
                indexes[name].find(uid)
                took[name].append((time.perf_counter() - t) * 1000)
            time.sleep(args.gap)
    finally:
        for p in procs:
            p.wait()
    print(f"\n{args.rounds} rounds, {args.gap * 1000:.0f} ms apart, burst {args.burst}/s "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print("| NamespaceIndex.find | baseline | this tree |")
    print("|---|---|---|")
    print(f"| one scan, p50 / p99 / max ms | {_p(took['baseline'])} | {_p(took['this tree'])} |")
    reads = [getattr(indexes[k], "reads", None) for k in indexes]
    print(f"| cgroup files read | {reads[0] if reads[0] is not None else '(not counted)'} | {reads[1]} |")


if __name__ == "__main__":
    main()
