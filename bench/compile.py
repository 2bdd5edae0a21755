"""Compile benchmark (issues 2, 19): full compile, memory, rule counts, incremental changes, vs Aerleon.

Usage::

    python bench/compile.py [--sizes small,medium,large,xlarge,xxlarge] [--quick] [--no-aerleon] [--json FILE]
    python bench/compile.py --sizes small,large,xlarge --baseline old.json   # old vs new, side by side
    python bench/compile.py --k8s 10000                                       # pod-churn batch

Each size runs in its own subprocess (so ``ru_maxrss`` is that size's peak RSS), on an estate
from ``bench/estate_gen.py``. Measured per size:

* full compile: ``Compiler(policy)`` + ``all_host_policies()``, wall and CPU (process) time;
* peak memory: ``ru_maxrss`` of the child (estate generation included; the RSS right after
  generating the estate is shown beside it);
* rules per host (mean, max) from ``Compiler.rule_count``; distinct address sets (names
  across every host policy) and distinct label sets;
* one incremental relabel: ``upsert_workload`` of a workload whose role changed (to another
  role of its app), median over N relabels of different workloads, and the number of
  ``HostDelta``s it returns (hosts affected);
* Aerleon: the same host's effective policy (its ``HostPolicy``: ordered rules, peer sets
  resolved to addresses, services resolved to ports) written as an Aerleon policy with an
  ``nftables`` ``mixed input`` / ``mixed output`` filter, generated through ``aerleon.api``;
  compared with our per-host share of the full compile and with ``compile_host`` from scratch
  (plus our nftables render of that host, when the renderer is importable);
* re-address, create and delete of one workload, and a check that the policies kept up to
  date incrementally equal a full recompile afterwards (``compile_ops.py``);
* full (generation 2) garbage collections inside every measured section, counted with
  ``gc.callbacks``: the compiler freezes its long-lived state (``gc.freeze``) after a build.
  For the one-workload ops two counts: over the whole loop (the benchmark's own allocations
  between the calls included) and inside the timed compiler calls alone.

PASS/FAIL uses CPU time (wall time is printed too: on a shared machine it includes waiting
for a core). Targets (issue 19): full compile <= 10 s and peak RSS <= 2 GB at xlarge (125,000
workloads), <= 25 s at xxlarge (250,000); one relabel <= 2 ms median, <= 10 ms max.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_aerleon import AerleonResult, run_aerleon
from compile_ops import (
    ChurnResult,
    GcMeter,
    OpResult,
    Timing,
    churn_report,
    measure_churn,
    measure_ops,
    side_by_side,
    timed,
    verify_against_full,
)
from estate_gen import _ROLE_ORDER, SIZES, Estate, generate

from stockade.compiler import Compiler, HostPolicy, compile_host
from stockade.model import Label, Workload

FULL_COMPILE_TARGET_S = {"xlarge": 10.0, "xxlarge": 25.0}
RSS_TARGET_MB = {"xlarge": 2048.0}
RELABEL_TARGET_MS = 2.0
RELABEL_MAX_TARGET_MS = 10.0


@dataclass(frozen=True)
class SizeResult:
    size: str
    workloads: int
    rulesets: int
    rules: int
    label_sets: int
    generate_s: float
    build: Timing  # Compiler(policy)
    full: Timing  # Compiler(policy) + all_host_policies()
    rss_estate_mb: float
    rss_peak_mb: float
    rules_mean: float
    rules_max: int
    address_sets: int
    relabels: int
    relabel_median: Timing
    relabel_max: Timing
    relabel_hosts_median: float
    relabel_hosts_max: int
    full_gc: tuple[int, float]  # full GCs during the full compile: count, wall seconds
    relabel_gc: tuple[int, float]  # full GCs during all relabels together: count, wall seconds
    compile_host: Timing  # compile_host(policy, typical) from scratch
    render: Timing | None  # our nftables render of the typical host (None: renderer missing)
    render_bytes: int
    aerleon: AerleonResult | None
    ops: tuple[OpResult, ...] = ()
    verified: bool | None = None


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---- relabel -----------------------------------------------------------------


def _relabelled(w: Workload, rng: random.Random, roles: tuple[str, ...]) -> Workload:
    current = w.label("role")
    choices = sorted({r for r in roles if r != current})
    new_role = rng.choice(choices)
    labels = frozenset({lab for lab in w.labels if lab.key != "role"} | {Label("role", new_role)})
    return dataclasses.replace(w, labels=labels)


def _relabel_candidates(estate: Estate) -> list[tuple[Workload, tuple[str, ...]]]:
    archetype = {a.name: a.archetype for a in estate.apps}
    out: list[tuple[Workload, tuple[str, ...]]] = []
    for w in estate.policy.workloads:
        app = w.label("app")
        if app in archetype:
            out.append((w, _ROLE_ORDER[archetype[app]]))
    return out


def _render(hp: HostPolicy) -> tuple[Timing | None, int]:
    """Our own nftables text for the host, if the renderer is there (another helper owns it)."""
    try:
        from stockade.backends.nftables.render import render_nftables
    except ImportError:
        return None, 0
    try:
        text, t = timed(lambda: render_nftables(hp).to_text())
    except Exception:
        return None, 0
    return t, len(text.encode())


# ---- one size (child process) ---------------------------------------------------


def measure(size: str, relabels: int, aerleon_reps: int, verify: bool) -> SizeResult:
    (estate, gen_t) = timed(lambda: generate(SIZES[size]))
    policy = estate.policy
    rss_estate = _rss_mb()

    meter = GcMeter()
    gc.callbacks.append(meter)
    meter.active = True
    compiler, build_t = timed(lambda: Compiler(policy))
    policies, all_t = timed(compiler.all_host_policies)
    full = Timing(build_t.wall + all_t.wall, build_t.cpu + all_t.cpu)
    full_gc = (meter.count, meter.seconds)
    meter.active = False
    counts = [compiler.rule_count(n) for n in policies]
    set_names = {s.name for hp in policies.values() for s in hp.sets}
    typical = policies[estate.typical_host]
    del policies

    rng = random.Random(2)
    picks = rng.sample(_relabel_candidates(estate), relabels)
    times: list[Timing] = []
    affected: list[int] = []
    meter.reset()
    meter.active = True
    for w, roles in picks:
        new = _relabelled(w, rng, roles)
        deltas, t = timed(functools.partial(compiler.upsert_workload, new))
        times.append(t)
        affected.append(len(deltas))
    meter.active = False
    relabel_gc = (meter.count, meter.seconds)
    ops = measure_ops(compiler, compiler.policy.workloads, relabels, max(3, relabels // 4), meter)
    gc.callbacks.remove(meter)
    rss_peak = _rss_mb()
    verified = verify_against_full(compiler) if verify else None
    del compiler

    _, host_t = timed(lambda: compile_host(policy, estate.typical_host))
    render_t, render_bytes = _render(typical)
    aerleon = run_aerleon(typical, aerleon_reps) if aerleon_reps > 0 else None

    def median(ts: list[Timing]) -> Timing:
        return Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))

    return SizeResult(
        size=size,
        workloads=len(policy.workloads),
        rulesets=len(policy.rulesets),
        rules=estate.rule_total,
        label_sets=len({w.labels for w in policy.workloads}),
        generate_s=gen_t.wall,
        build=build_t,
        full=full,
        rss_estate_mb=rss_estate,
        rss_peak_mb=rss_peak,
        rules_mean=statistics.mean(counts),
        rules_max=max(counts),
        address_sets=len(set_names),
        relabels=relabels,
        relabel_median=median(times),
        relabel_max=Timing(max(t.wall for t in times), max(t.cpu for t in times)),
        relabel_hosts_median=statistics.median(affected),
        relabel_hosts_max=max(affected),
        full_gc=full_gc,
        relabel_gc=relabel_gc,
        compile_host=host_t,
        render=render_t,
        render_bytes=render_bytes,
        aerleon=aerleon,
        ops=tuple(ops),
        verified=verified,
    )


def _from_json(d: dict[str, Any]) -> SizeResult:
    def timing(x: Any) -> Timing | None:
        return None if x is None else Timing(**x)

    fields = dict(d)
    for key in ("full_gc", "relabel_gc"):
        fields[key] = tuple(fields[key])
    for key in ("build", "full", "relabel_median", "relabel_max", "compile_host", "render"):
        fields[key] = timing(fields[key])
    if fields["aerleon"] is not None:
        a = dict(fields["aerleon"])
        a["time"] = Timing(**a["time"])
        fields["aerleon"] = AerleonResult(**a)
    fields["ops"] = tuple(
        OpResult(**{**o, **{k: timing(o.get(k)) for k in ("median", "max", "fanout_median", "fanout_max")}})
        for o in fields.get("ops", ())
    )
    return SizeResult(**fields)


def _child(args: list[str]) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark {args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(size: str, relabels: int, aerleon_reps: int, verify: bool) -> SizeResult:
    args = [size, "--relabels", str(relabels), "--aerleon-reps", str(aerleon_reps)]
    return _from_json(_child(args if verify else [*args, "--no-verify"]))


def run_k8s_child(namespaces: int, per_batch: int) -> ChurnResult:
    d = _child([f"k8s:{namespaces}:{per_batch}"])
    timings = ("build", "batch", "singles", "batch_fanout")
    return ChurnResult(**{k: Timing(**v) if k in timings else v for k, v in d.items()})


# ---- report ----------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def _op_cell(kind: str, fmt: Callable[[OpResult], str]) -> Callable[[SizeResult], str]:
    def cell(r: SizeResult) -> str:
        found = [o for o in r.ops if o.kind == kind]
        return fmt(found[0]) if found else "-"

    return cell


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _ratio(r: SizeResult, ours: float, digits: int) -> str:
    """Our CPU time divided by Aerleon's for the same host (below 1: we are faster)."""
    if r.aerleon is None or r.aerleon.error or r.aerleon.time.cpu <= 0:
        return "-"
    ratio = ours / r.aerleon.time.cpu
    if ratio <= 0:
        return f"{ratio:.{digits}f}"
    return f"{ratio:.{digits}f} ({1 / ratio:.0f}x faster)" if ratio < 1 else f"{ratio:.{digits}f} ({ratio:.1f}x slower)"


def report(results: list[SizeResult]) -> str:
    rows: list[tuple[str, ...]] = []

    def row(label: str, fmt: Callable[[SizeResult], str]) -> None:
        rows.append((label, *(fmt(r) for r in results)))

    row("workloads", lambda r: f"{r.workloads:,}")
    row("rulesets", lambda r: f"{r.rulesets:,}")
    row("rules (allow + deny)", lambda r: f"{r.rules:,}")
    row("distinct label sets", lambda r: f"{r.label_sets:,}")
    row("full compile, CPU s", lambda r: f"{r.full.cpu:.2f}")
    row("full compile, wall s", lambda r: f"{r.full.wall:.2f}")
    row("  of which Compiler() CPU s", lambda r: f"{r.build.cpu:.2f}")
    row("  full GCs in it: n / ms", lambda r: f"{r.full_gc[0]} / {r.full_gc[1] * 1000:.0f}")
    row("per host (full / hosts), ms", lambda r: f"{r.full.cpu / r.workloads * 1000:.3f}")
    row(
        "target full (xlarge <= 10 s, xxlarge <= 25 s)",
        lambda r: _verdict(r.full.cpu <= FULL_COMPILE_TARGET_S[r.size]) if r.size in FULL_COMPILE_TARGET_S else "-",
    )
    row("peak RSS MB (ru_maxrss)", lambda r: f"{r.rss_peak_mb:.0f}")
    row(
        "target peak RSS <= 2 GB (xlarge)",
        lambda r: _verdict(r.rss_peak_mb <= RSS_TARGET_MB[r.size]) if r.size in RSS_TARGET_MB else "-",
    )
    row("  RSS MB after estate gen", lambda r: f"{r.rss_estate_mb:.0f}")
    row("rules per host, mean", lambda r: f"{r.rules_mean:.1f}")
    row("rules per host, max", lambda r: f"{r.rules_max}")
    row("distinct address sets", lambda r: f"{r.address_sets:,}")
    row("relabel median, CPU ms", lambda r: _ms(r.relabel_median.cpu))
    row("relabel median, wall ms", lambda r: _ms(r.relabel_median.wall))
    row("relabel max, CPU ms", lambda r: _ms(r.relabel_max.cpu))
    row("  full GCs in all relabels: n / ms", lambda r: f"{r.relabel_gc[0]} / {r.relabel_gc[1] * 1000:.0f}")
    row("relabel hosts in delta (med/max)", lambda r: f"{r.relabel_hosts_median:g} / {r.relabel_hosts_max}")
    row(
        f"target relabel <= {RELABEL_TARGET_MS:g} ms median, <= {RELABEL_MAX_TARGET_MS:g} ms max",
        lambda r: _verdict(
            r.relabel_median.cpu * 1000 <= RELABEL_TARGET_MS and r.relabel_max.cpu * 1000 <= RELABEL_MAX_TARGET_MS
        ),
    )
    for kind in ("readdress", "create", "delete"):
        row(f"{kind} set-keyed med / max, CPU ms", _op_cell(kind, lambda o: f"{_ms(o.median.cpu)} / {_ms(o.max.cpu)}"))
        row(
            f"{kind} set-keyed med / max, wall ms",
            _op_cell(kind, lambda o: f"{_ms(o.median.wall)} / {_ms(o.max.wall)}"),
        )
        row(f"  {kind} set deltas (median)", _op_cell(kind, lambda o: f"{o.sets_median:g}"))
        row(
            f"  target {kind} <= {RELABEL_TARGET_MS:g} ms median, <= {RELABEL_MAX_TARGET_MS:g} ms max",
            _op_cell(
                kind,
                lambda o: _verdict(
                    o.median.cpu * 1000 <= RELABEL_TARGET_MS and o.max.cpu * 1000 <= RELABEL_MAX_TARGET_MS
                ),
            ),
        )
        row(
            "  + per-host fan-out med / max, CPU ms",
            _op_cell(
                kind,
                lambda o: (
                    f"{_ms(o.fanout_median.cpu)} / {_ms(o.fanout_max.cpu)}" if o.fanout_median and o.fanout_max else "-"
                ),
            ),
        )
        row(f"  {kind} hosts in fan-out (med/max)", _op_cell(kind, lambda o: f"{o.hosts_median:g} / {o.hosts_max}"))
        row(
            f"  full GCs in all {kind}s (loop / in calls)",
            _op_cell(kind, lambda o: f"{o.full_gcs} / {o.full_gcs_in_calls}"),
        )
    row(
        "relabel vs full recompile, CPU",
        lambda r: f"{r.full.cpu / max(r.relabel_median.cpu, 1e-6):,.0f}x less",
    )
    row("incremental == full recompile", lambda r: {None: "not checked", True: "yes", False: "NO"}[r.verified])
    row("compile_host from scratch, CPU ms", lambda r: _ms(r.compile_host.cpu))
    row("our nft render of host, CPU ms", lambda r: _ms(r.render.cpu) if r.render else "n/a")

    def aer(fmt: Callable[[AerleonResult], str]) -> Callable[[SizeResult], str]:
        def cell(r: SizeResult) -> str:
            if r.aerleon is None:
                return "skipped"
            if r.aerleon.error:
                return "error"
            return fmt(r.aerleon)

        return cell

    row("Aerleon host: rules / terms / addrs", aer(lambda a: f"{a.host_rules} / {a.terms} / {a.addresses:,}"))
    row("Aerleon one host, CPU ms", aer(lambda a: _ms(a.time.cpu)))
    row("Aerleon one host, wall ms", aer(lambda a: _ms(a.time.wall)))
    row("Aerleon output KiB", aer(lambda a: f"{a.output_bytes / 1024:.0f}"))
    row("ours/Aerleon: per-host share of full", lambda r: _ratio(r, r.full.cpu / r.workloads, 5))
    row("ours/Aerleon: compile_host", lambda r: _ratio(r, r.compile_host.cpu, 2))
    row(
        "ours/Aerleon: compile_host + render",
        lambda r: _ratio(r, r.compile_host.cpu + r.render.cpu, 2) if r.render else "n/a",
    )

    header = ("size", *(r.size for r in results))
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for x in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(x)))
    notes = [r.aerleon for r in results if r.aerleon is not None and r.aerleon.error]
    for a in notes:
        lines.append(f"Aerleon error: {a.error}")
    return "\n".join(lines)


def profile(size: str, relabels: int, top: int = 25) -> None:
    """cProfile the full compile and the relabels of one size; print the top functions."""
    import cProfile
    import pstats

    estate = generate(SIZES[size])
    prof = cProfile.Profile()
    prof.enable()
    compiler = Compiler(estate.policy)
    compiler.all_host_policies()
    prof.disable()
    print(f"== full compile of {size} (cumulative) ==")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    rng = random.Random(2)
    prof = cProfile.Profile()
    for w, roles in rng.sample(_relabel_candidates(estate), relabels):
        new = _relabelled(w, rng, roles)
        prof.enable()
        compiler.upsert_workload(new)
        prof.disable()
    print(f"== {relabels} relabels of {size} (cumulative) ==")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="small,medium,large", help="comma-separated: " + ",".join(SIZES))
    ap.add_argument("--quick", action="store_true", help="5 relabels and one Aerleon run per size")
    ap.add_argument("--no-aerleon", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--profile", action="store_true", help="cProfile the first size in-process instead")
    ap.add_argument("--baseline", type=Path, help="a --json file of main's run: print old vs new side by side")
    ap.add_argument("--k8s", type=int, default=0, metavar="NAMESPACES", help="also run the pod-churn batch")
    ap.add_argument("--k8s-batch", type=int, default=1000, help="pods deleted and created per batch")
    ap.add_argument("--no-verify", action="store_true", help="skip the incremental == full recompile check")
    ap.add_argument("--relabels", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--aerleon-reps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    relabels = args.relabels if args.relabels is not None else (5 if args.quick else 20)
    reps = args.aerleon_reps if args.aerleon_reps is not None else (1 if args.quick else 2)
    if args.no_aerleon:
        reps = 0
    if args.child and args.child.startswith("k8s:"):
        _, namespaces, per_batch = args.child.split(":")
        meter = GcMeter()
        gc.callbacks.append(meter)
        print(json.dumps(dataclasses.asdict(measure_churn(meter, int(namespaces), int(per_batch)))))
        return 0
    if args.child:
        result = measure(args.child, relabels, reps, not args.no_verify)
        print(json.dumps(dataclasses.asdict(result)))
        return 0

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        ap.error(f"unknown size(s) {unknown}; known: {', '.join(SIZES)}")
    if args.profile:
        profile(sizes[0], relabels)
        return 0
    load = os.getloadavg()[0]
    print(
        f"stockade compile benchmark: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f}; one subprocess per size",
        flush=True,
    )
    results: list[SizeResult] = []
    for s in sizes:
        print(f"  running {s} ...", flush=True)
        results.append(run_child(s, relabels, reps, not args.no_verify))
    print()
    print(report(results))
    raw = [dataclasses.asdict(r) for r in results]
    if args.baseline:
        print()
        print(f"old ({args.baseline}) vs new, CPU time:")
        print(side_by_side(json.loads(args.baseline.read_text()), raw))
    if args.k8s:
        print(f"  running k8s ({args.k8s} namespaces) ...", flush=True)
        churn = run_k8s_child(args.k8s, args.k8s_batch)
        print()
        print(churn_report(churn))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
