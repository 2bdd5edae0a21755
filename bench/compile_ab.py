"""Interleaved in-process A/B of the full compile (issue 19): several source trees' compilers, one estate.

Usage::

    python bench/compile_ab.py --size xlarge --rounds 2 OLD_SRC NEW_SRC [...]
    # e.g. OLD_SRC from: git archive deae6a0 src | tar -x -C /tmp/old   ->  /tmp/old/src

Each tree's ``stockade/compiler`` package is copied under its own name (``stockade.compiler_<n>``,
its absolute imports rewritten) so every compiler runs in this one process on the same estate
objects, the same heap and the same hash seed, against the model of the ``stockade`` on
``PYTHONPATH`` (the trees must share the model). Runs alternate, the order reversed every round,
so the machine's load and speed hit every tree alike. Before each run the model's memos the
compiler fills (``Workload.addresses``, ``LabelSelector`` canonical text) are cleared, so each
starts cold as in a fresh process. ``calib`` is a fixed pure-Python loop timed just before each
run: when it moves, the machine's speed moved. CPU is ``process_time`` (user + system).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estate_gen import SIZES, generate

import stockade


def calib() -> float:
    """CPU seconds of a fixed dict + sort loop (the machine's speed at this moment)."""
    t = time.process_time()
    d: dict[int, tuple[int, str]] = {}
    for i in range(400_000):
        d[(i * 7919) % 1_000_003] = (i, str(i))
    sorted(d.items())
    return time.process_time() - t


def load_compiler(tree: Path, n: int, into: Path) -> Any:
    """The ``Compiler`` class of ``tree``/stockade/compiler, imported as ``stockade.compiler_<n>``."""
    mod = f"compiler_{n}"
    dst = into / mod
    shutil.copytree(tree / "stockade" / "compiler", dst)
    for f in dst.glob("*.py"):
        f.write_text(f.read_text().replace("stockade.compiler", f"stockade.{mod}"))
    return importlib.import_module(f"stockade.{mod}").Compiler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+", type=Path, help="src directories (holding stockade/compiler)")
    ap.add_argument("--size", default="xlarge", choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="compile_ab_"))
    stockade.__path__.append(str(tmp))
    try:
        comps = [(str(t), load_compiler(t.resolve(), n, tmp)) for n, t in enumerate(args.trees)]
        estate = generate(SIZES[args.size])
        policy = estate.policy
        sels: list[object] = [s for rs in policy.rulesets for s in rs.scopes]
        sels += [s for rs in policy.rulesets for r in rs.rules for s in (*r.providers, *r.consumers)]
        print(f"{args.size}: python {sys.version.split()[0]}, PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED')}, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results: dict[str, list[float]] = {label: [] for label, _ in comps}
        for r in range(args.rounds):
            for label, compiler_cls in comps if r % 2 == 0 else comps[::-1]:
                for w in policy.workloads:
                    w.__dict__.pop("addresses", None)
                for s in sels:
                    vars(s).pop("_canonical", None)
                gc.collect()
                speed = calib()
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                t = time.process_time()
                compiler = compiler_cls(policy)
                build = time.process_time() - t
                policies = compiler.all_host_policies()
                full = time.process_time() - t
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                del policies, compiler
                gc.unfreeze()  # the compiler froze its state: let the next run's collections see the heap again
                gc.collect()
                results[label].append(full)
                print(f"  round {r} {label:28s} full {full:6.2f} s CPU (Compiler() {build:5.2f}), "
                      f"system {ru1.ru_stime - ru0.ru_stime:4.2f} s, calib {speed:.3f} s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        for label, fulls in results.items():
            print(f"{label:28s} median {statistics.median(fulls):6.2f}  min {min(fulls):6.2f}  max {max(fulls):6.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
