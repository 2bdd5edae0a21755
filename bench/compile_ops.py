"""Compile benchmark, part two (issue 19): one-workload operations, a pod-churn batch, old vs new.

Used by ``bench/compile.py`` (run that). Three things live here so ``compile.py`` stays readable:

* ``measure_ops``: re-address, create and delete of one workload on a warm ``Compiler``
  (median and max CPU/wall over N workloads, hosts in each delta, full GCs inside), and a
  check that the incrementally maintained policies equal a full recompile's afterwards;
* ``k8s_estate`` / ``measure_churn``: a Kubernetes-shaped estate (10,000 namespaces of
  pods, three deployments each, so many pods share few label sets; pod addresses come from
  a pool and are recycled) and a churn of 1,000 pod deletions + 1,000 creations applied as
  ONE ``Compiler.apply_set_changes`` batch (then fanned out per host), against the same churn
  applied one change at a time;
* ``side_by_side``: the old (main's) and new results of the same sizes in one table.
"""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stockade.compiler import Compiler, HostDelta
from stockade.compiler.changes import SetChanges
from stockade.model import (
    ALL_WORKLOADS,
    AllowRule,
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

T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # seconds of process CPU time


def timed(fn: Callable[[], T], meter: GcMeter | None = None) -> tuple[T, Timing]:
    """``fn()`` and its wall and CPU time; with ``meter``, full GCs inside the call are counted
    as ``meter.inside`` (the benchmark's own allocations around the call are not)."""
    if meter is not None:
        meter.measuring = True
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if meter is not None:
        meter.measuring = False
    return out, Timing(wall, cpu)


class GcMeter:
    """Counts full (generation 2) garbage collections while ``active``, and their wall time."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.inside = 0  # of ``count``: those inside a ``timed(fn, meter)`` call
        self.measuring = False
        self._start = 0.0
        self.active = False

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.active or info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.inside += self.measuring
            self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.count, self.seconds, self.inside = 0, 0.0, 0


@dataclass(frozen=True)
class OpResult:
    """One kind of one-workload change. ``median``/``max``: the compiler's set-keyed change
    (``apply_set_changes``); ``fanout_*``: expanding it to per-host ``HostDelta``s afterwards
    (``host_deltas``; ``apply_changes`` is the two together)."""

    kind: str  # readdress / create / delete
    n: int
    median: Timing
    max: Timing
    hosts_median: float  # hosts in the per-host fan-out
    hosts_max: int
    full_gcs: int
    fanout_median: Timing | None = None
    fanout_max: Timing | None = None
    sets_median: float = 0.0  # set deltas (set x family) in the set-keyed change
    full_gcs_in_calls: int = 0  # of ``full_gcs``: inside the timed compiler calls themselves


def _med(times: list[Timing]) -> Timing:
    return Timing(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))


def _max(times: list[Timing]) -> Timing:
    return Timing(max(t.wall for t in times), max(t.cpu for t in times))


def _fresh_addresses(i: int) -> tuple[Interface, ...]:
    """Addresses no generated workload has (the estates use 10.0-10.127 and fd00:1-4::)."""
    v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.200.0.0")) + i)
    v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd00:ff::")) + i)
    return (Interface("eth0", (v4, v6)),)


def measure_ops(
    compiler: Compiler, workloads: Sequence[Workload], n: int, n_slow: int, meter: GcMeter, seed: int = 3
) -> list[OpResult]:
    """Re-address ``n``, create and delete ``n_slow`` workloads, one call each."""
    rng = random.Random(seed)
    out: list[OpResult] = []

    def run(kind: str, calls: list[Callable[[], SetChanges]]) -> None:
        times: list[Timing] = []
        fanouts: list[Timing] = []
        hosts: list[int] = []
        sets: list[int] = []
        meter.reset()
        meter.active = True
        for call in calls:
            changes, t = timed(call, meter)
            deltas, f = timed(lambda changes=changes: compiler.host_deltas(changes), meter)
            times.append(t)
            fanouts.append(f)
            hosts.append(len(deltas))
            sets.append(len(changes.set_deltas))
            del deltas, changes
        meter.active = False
        out.append(OpResult(kind, len(times), _med(times), _max(times), statistics.median(hosts), max(hosts),
                            meter.count, _med(fanouts), _max(fanouts), statistics.median(sets), meter.inside))

    picks = rng.sample(list(workloads), n + 2 * n_slow)
    readdress, to_delete, templates = picks[:n], picks[n : n + n_slow], picks[n + n_slow :]
    run(
        "readdress",
        [
            (lambda w=w, i=i: compiler.apply_set_changes([dataclasses.replace(w, interfaces=_fresh_addresses(i))]))
            for i, w in enumerate(readdress)
        ],
    )
    created = [
        dataclasses.replace(w, name=f"new-{i}", interfaces=_fresh_addresses(100_000 + i))
        for i, w in enumerate(templates)
    ]
    run("create", [(lambda w=w: compiler.apply_set_changes([w])) for w in created])
    run("delete", [(lambda name=w.name: compiler.apply_set_changes([name])) for w in to_delete])
    return out


def verify_against_full(compiler: Compiler) -> bool:
    """The incrementally maintained policies equal a full recompile of the current policy.

    Host by host, each distinct pair of address-set objects compared once (a plain ``==`` of
    the two dicts compares the all-workloads set once per host: quadratic in the estate).
    """
    ours, full = compiler.all_host_policies(), Compiler(compiler.policy).all_host_policies()
    if ours.keys() != full.keys():
        return False
    same: dict[tuple[int, int], bool] = {}
    for name, hp in ours.items():
        other = full[name]
        if hp.rules_key() != other.rules_key() or len(hp.sets) != len(other.sets):
            return False
        for a, b in zip(hp.sets, other.sets, strict=True):
            key = (id(a), id(b))
            if key not in same:
                same[key] = a == b
            if not same[key]:
                return False
    return True


# ---- Kubernetes-shaped estate ------------------------------------------------------

_DEPLOYMENTS = (("frontend", 4), ("backend", 4), ("db", 2))  # pods per namespace: 10
_K8S_SERVICES = (
    Service("http", (ServiceEntry(Proto.TCP, 8080, 8080),)),
    Service("postgres", (ServiceEntry(Proto.TCP, 5432, 5432),)),
    Service("metrics", (ServiceEntry(Proto.TCP, 9100, 9100),)),
    Service("dns", (ServiceEntry(Proto.UDP, 53, 53), ServiceEntry(Proto.TCP, 53, 53))),
)
_POD_BASE = int(ipaddress.IPv4Address("10.128.0.0"))


def _sel(**labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(Label(k, v) for k, v in labels.items())))


def _pod(name: str, ns: str, app: str, address: int) -> Workload:
    labels = frozenset({Label("ns", ns), Label("app", app)})
    iface = Interface("eth0", (ipaddress.IPv4Address(address),))
    return Workload(name, labels, (iface,), EnforcementMode.FULL)


@dataclass
class K8sEstate:
    policy: Policy
    free: list[int]  # addresses of the pool not in use (deleted pods' addresses go back here)
    next_pod: int


def k8s_estate(namespaces: int = 10_000, seed: int = 11) -> K8sEstate:
    """Pods of ``namespaces`` namespaces, a ruleset scoped to each, cluster-wide DNS and metrics."""
    rng = random.Random(seed)
    pods: list[Workload] = []
    addresses = list(range(_POD_BASE, _POD_BASE + namespaces * 12))
    rng.shuffle(addresses)
    rulesets: list[Ruleset] = []
    for i in range(namespaces):
        ns = f"ns{i:05d}"
        for app, replicas in _DEPLOYMENTS:
            for r in range(replicas):
                pods.append(_pod(f"{ns}-{app}-{r}", ns, app, addresses.pop()))
        rulesets.append(
            Ruleset(
                ns,
                (_sel(ns=ns),),
                (
                    AllowRule((_sel(app="frontend"),), (_sel(app="backend"),), ("http",)),
                    AllowRule((_sel(app="backend"),), (_sel(app="db"),), ("postgres",)),
                ),
            )
        )
    for k in range(3):
        pods.append(_pod(f"coredns-{k}", "kube-system", "coredns", addresses.pop()))
        pods.append(_pod(f"prometheus-{k}", "monitoring", "prometheus", addresses.pop()))
    rulesets.append(
        Ruleset(
            "cluster",
            (),
            (
                AllowRule((ALL_WORKLOADS,), (_sel(ns="kube-system", app="coredns"),), ("dns",)),
                AllowRule((_sel(ns="monitoring", app="prometheus"),), (ALL_WORKLOADS,), ("metrics",)),
            ),
        )
    )
    policy = Policy(workloads=tuple(sorted(pods)), services=_K8S_SERVICES, rulesets=tuple(rulesets))
    return K8sEstate(policy, addresses, 0)


def churn(estate: K8sEstate, live: dict[str, Workload], n: int, rng: random.Random) -> list[Workload | str]:
    """``n`` pod deletions, then ``n`` creations re-using freed addresses (as a CNI's IPAM does)."""
    victims = rng.sample(sorted(n for n in live if n[:2] == "ns"), n)
    changes: list[Workload | str] = []
    for name in victims:
        w = live.pop(name)
        estate.free.append(int(w.addresses[0]))
        changes.append(name)
    rng.shuffle(estate.free)
    namespaces = sorted({w.label("ns") or "" for w in live.values() if w.name[:2] == "ns"})
    for _ in range(n):
        ns = rng.choice(namespaces)
        app = rng.choice([a for a, _ in _DEPLOYMENTS])
        pod = _pod(f"{ns}-{app}-x{estate.next_pod}", ns, app, estate.free.pop())
        estate.next_pod += 1
        live[pod.name] = pod
        changes.append(pod)
    return changes


@dataclass(frozen=True)
class ChurnResult:
    pods: int
    namespaces: int
    label_sets: int
    build: Timing  # Compiler() + all_host_policies()
    full_gcs_build: int
    batch_changes: int
    batch: Timing
    batch_deltas: int
    batch_hosts: int  # distinct hosts in the batch's deltas
    batch_full_gcs: int
    batch_sets: int  # set deltas (set x family) in the batch's SetChanges
    batch_reloads: int  # hosts reloaded (the created and deleted pods themselves)
    batch_fanout: Timing  # host_deltas(): the per-host fan-out after the set-keyed batch
    singles_changes: int
    singles: Timing
    singles_deltas: int
    singles_hosts: int
    singles_full_gcs: int
    verified: bool


def measure_churn(meter: GcMeter, namespaces: int, per_batch: int) -> ChurnResult:
    estate = k8s_estate(namespaces)
    rng = random.Random(5)
    live = {w.name: w for w in estate.policy.workloads}
    meter.reset()
    meter.active = True
    compiler, build_t = timed(lambda: Compiler(estate.policy))
    policies, all_t = timed(compiler.all_host_policies)
    meter.active = False
    build_gcs = meter.count
    del policies
    gc.collect()  # the generated estate's garbage, outside the measured sections

    changes = churn(estate, live, per_batch, rng)
    meter.reset()
    meter.active = True
    set_changes, batch_t = timed(lambda: compiler.apply_set_changes(changes))
    deltas, fanout_t = timed(lambda: compiler.host_deltas(set_changes))
    meter.active = False
    batch_gcs = meter.count
    batch_hosts = len({d.workload for d in deltas})

    singles = churn(estate, live, per_batch, rng)
    meter.reset()
    meter.active = True
    w0, c0 = time.perf_counter(), time.process_time()
    single_deltas: list[HostDelta] = []
    for c in singles:
        single_deltas += compiler.remove_workload(c) if isinstance(c, str) else compiler.upsert_workload(c)
    singles_t = Timing(time.perf_counter() - w0, time.process_time() - c0)
    meter.active = False
    return ChurnResult(
        pods=len(estate.policy.workloads),
        namespaces=namespaces,
        label_sets=len({w.labels for w in estate.policy.workloads}),
        build=Timing(build_t.wall + all_t.wall, build_t.cpu + all_t.cpu),
        full_gcs_build=build_gcs,
        batch_changes=len(changes),
        batch=batch_t,
        batch_deltas=len(deltas),
        batch_hosts=batch_hosts,
        batch_full_gcs=batch_gcs,
        batch_sets=len(set_changes.set_deltas),
        batch_reloads=len(set_changes.reloads),
        batch_fanout=fanout_t,
        singles_changes=len(singles),
        singles=singles_t,
        singles_deltas=len(single_deltas),
        singles_hosts=len({d.workload for d in single_deltas}),
        singles_full_gcs=meter.count,
        verified=verify_against_full(compiler),
    )


def churn_report(r: ChurnResult) -> str:
    def ms(t: Timing) -> str:
        return f"{t.cpu * 1000:.0f} ms CPU ({t.wall * 1000:.0f} ms wall)"

    return "\n".join(
        [
            f"Kubernetes-shaped estate: {r.pods:,} pods in {r.namespaces:,} namespaces, "
            f"{r.label_sets:,} distinct label sets; full compile {r.build.cpu:.2f} s CPU "
            f"({r.build.wall:.1f} s wall), full GCs in it: {r.full_gcs_build}",
            f"  one batch of {r.batch_changes:,} changes (deletes + creates, addresses recycled), set-keyed: "
            f"{ms(r.batch)}, {r.batch_sets:,} set deltas + {r.batch_reloads:,} reloads; fanned out per host: "
            f"{ms(r.batch_fanout)} more, {r.batch_deltas:,} HostDeltas for {r.batch_hosts:,} hosts (max 1 per host: "
            f"{'yes' if r.batch_deltas == r.batch_hosts else 'NO'}), full GCs: {r.batch_full_gcs}",
            f"  the same kind of churn one change at a time ({r.singles_changes:,} calls): {ms(r.singles)}, "
            f"{r.singles_deltas:,} HostDeltas for {r.singles_hosts:,} hosts, full GCs: {r.singles_full_gcs}",
            f"  incremental == full recompile afterwards: {'yes' if r.verified else 'NO'}",
        ]
    )


def side_by_side(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """Key rows of main's results (``old``) and this tree's, size by size, in one table, with the goal."""
    rows: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
        ("full compile, CPU s", lambda r: f"{r['full']['cpu']:.2f}", "xlarge <= 10, xxlarge <= 25"),
        ("full compile, wall s", lambda r: f"{r['full']['wall']:.1f}", ""),
        ("  of which Compiler(), CPU s", lambda r: f"{r['build']['cpu']:.2f}", ""),
        ("  full GCs in it", lambda r: f"{r['full_gc'][0]}", "0"),
        ("peak RSS MB", lambda r: f"{r['rss_peak_mb']:.0f}", "xlarge <= 2048"),
        ("relabel median, CPU ms", lambda r: f"{r['relabel_median']['cpu'] * 1000:.2f}", "<= 2"),
        ("relabel max, CPU ms", lambda r: f"{r['relabel_max']['cpu'] * 1000:.2f}", "<= 10"),
    ]
    for kind in ("readdress", "create", "delete"):
        rows.append((f"{kind} median, CPU ms", _op(kind, lambda o: f"{o['median']['cpu'] * 1000:.2f}"), "<= 2"))
        rows.append((f"{kind} max, CPU ms", _op(kind, lambda o: f"{o['max']['cpu'] * 1000:.2f}"), "<= 10"))
        rows.append((f"{kind} hosts in delta (med)", _op(kind, lambda o: f"{o['hosts_median']:g}"), ""))
        rows.append(("  + fan-out to hosts, median CPU ms",
                     _op(kind, lambda o: f"{o['fanout_median']['cpu'] * 1000:.2f}" if o.get("fanout_median") else "-"),
                     ""))
    rows.append(("full GCs in all one-workload ops", _gcs, "0"))
    rows.append(("incremental == full recompile",
                 lambda r: {None: "-", True: "yes", False: "NO"}[r.get("verified")], "yes"))
    old_by = {r["size"]: r for r in old}
    header = ["size"]
    columns: list[dict[str, Any] | None] = []
    for r in new:
        if r["size"] in old_by:
            header.append(f"{r['size']} old")
            columns.append(old_by[r["size"]])
        header.append(f"{r['size']} new" if r["size"] in old_by else r["size"])
        columns.append(r)
    header.append("goal (issue 19)")
    table = [header]
    for label, fmt, goal in rows:
        table.append([label] + ["-" if c is None else _safe(fmt, c) for c in columns] + [goal or "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for k, row in enumerate(table):
        cells = (c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
        lines.append("| " + " | ".join(cells) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _gcs(r: dict[str, Any]) -> str:
    return str(r["relabel_gc"][0] + sum(o["full_gcs"] for o in r.get("ops", ())))


def _op(kind: str, fmt: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
    def cell(r: dict[str, Any]) -> str:
        for o in r.get("ops", ()):
            if o["kind"] == kind:
                return fmt(o)
        return "-"

    return cell


def _safe(fmt: Callable[[dict[str, Any]], str], r: dict[str, Any]) -> str:
    try:
        return fmt(r)
    except (KeyError, TypeError):
        return "-"
