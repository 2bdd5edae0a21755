"""NetworkPolicy benchmark (issue 16): 1,000 NetworkPolicies over 10,000 pods.

Usage::

    python bench/k8s_netpol.py [--namespaces 100] [--pods-per-namespace 100] [--policies-per-namespace 10]
                               [--repeat 20] [--json FILE]

The estate: namespaces ``ns-<i>`` labelled ``team`` (10 values) and ``env`` (prod/dev), pods with
``app`` (20 values) and ``tier`` (5 values), a named container port ``http`` (8080 or 8081 by
pod). Per namespace a mix of policies as clusters write them: default deny ingress, app-to-app
ingress, ingress from a team's namespaces (namespace + pod selector), an ipBlock with an except,
egress to prod namespaces on a port range, ingress on the named port, ``matchExpressions``.

Rows (wall and CPU time):

* translation: every policy resolved against every pod (``NetpolResolver.resolved``);
* full compile: ``Compiler(policy)`` + ``all_host_policies()`` with the NetworkPolicy layer;
* one-pod label delta: relabel one pod's ``app``; incremental re-resolution (only the policies
  its old or new labels concern) + ``Compiler.replace_network_policies``; median and max over
  ``--repeat`` pods, with the dirty policies, hosts changed, and how (set deltas / reloads);
* one-namespace label delta: change one namespace's ``team``; the same measurements;
* a check that the incremental state equals a full recompile at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stockade.compiler import Compiler, HostDelta
from stockade.k8s.netpol import NetpolResolver, PodInfo
from stockade.model import EnforcementMode, Interface, Label, Policy, Proto, Workload

T = TypeVar("T")
APPS = [f"app{i}" for i in range(20)]
TEAMS = [f"team{i}" for i in range(10)]


@dataclass
class Timed:
    wall: float
    cpu: float


def timed(fn: Callable[[], T]) -> tuple[T, Timed]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, Timed(time.perf_counter() - w, time.process_time() - c)


def policies_for(ns: str, rnd: random.Random) -> list[dict[str, Any]]:
    def pol(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"namespace": ns, "name": name}, "spec": spec}

    a, b = rnd.sample(APPS, 2)
    team = rnd.choice(TEAMS)
    out = [
        pol("default-deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        pol("app-to-app", {"podSelector": {"matchLabels": {"app": a}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": b}}}],
                                        "ports": [{"port": 8080}]}]}),
        pol("from-team", {"podSelector": {"matchLabels": {"app": b}}, "ingress": [{"from": [{
            "namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"tier": "t1"}}}]}]}),
        pol("ip-block", {"podSelector": {"matchLabels": {"tier": "t0"}}, "ingress": [{"from": [{"ipBlock": {
            "cidr": "192.168.0.0/16", "except": ["192.168.3.0/24"]}}]}]}),
        pol("egress-prod", {"podSelector": {"matchLabels": {"tier": "t2"}}, "policyTypes": ["Egress"],
                            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                                        "ports": [{"port": 5000, "endPort": 5100}]}]}),
        pol("named-port", {"podSelector": {"matchLabels": {"app": a}},
                           "ingress": [{"ports": [{"port": "http"}]}]}),
        pol("expressions", {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                  "values": ["t3", "t4"]}]},
                            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                                {"key": "env", "operator": "NotIn", "values": ["dev"]}]}}]}]}),
    ]
    while len(out) < 10:
        c = rnd.choice(APPS)
        out.append(pol(f"extra-{len(out)}", {"podSelector": {"matchLabels": {"app": c}}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"app": rnd.choice(APPS)}}}], "ports": [{"port": 9000 + len(out)}]}]}))
    return out


def build(args: argparse.Namespace) -> tuple[NetpolResolver, dict[str, Workload], list[str]]:
    rnd = random.Random(16)
    resolver = NetpolResolver()
    workloads: dict[str, Workload] = {}
    names: list[str] = []
    pending: list[dict[str, Any]] = []
    for i in range(args.namespaces):
        ns = f"ns-{i}"
        resolver.set_namespace(ns, {"team": TEAMS[i % len(TEAMS)], "env": "prod" if i % 2 else "dev",
                                    "kubernetes.io/metadata.name": ns})
        for j in range(args.pods_per_namespace):
            labels = {"app": rnd.choice(APPS), "tier": f"t{j % 5}"}
            info = PodInfo(ns, f"pod-{j}", labels, (("http", Proto.TCP, 8080 + (j % 2)),))
            resolver.set_pod(info)
            n = i * args.pods_per_namespace + j
            addr = ipaddress.ip_address(f"10.{64 + n // 65536}.{(n // 256) % 256}.{n % 256}")
            workloads[info.workload] = Workload(info.workload, frozenset({Label("app", labels["app"])}),
                                                (Interface("eth0", (addr,)),), EnforcementMode.SELECTIVE)
            names.append(ns)
        pending += policies_for(ns, rnd)[: args.policies_per_namespace]
    for obj in pending:  # as after the sync's first list: every policy dirty once
        resolver.set_policy(obj)
    return resolver, workloads, names


def summarize(deltas: list[HostDelta]) -> dict[str, int]:
    return {"hosts": len(deltas), "reloads": sum(1 for d in deltas if d.rules_changed),
            "set_deltas": sum(1 for d in deltas if not d.rules_changed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--pods-per-namespace", type=int, default=100)
    ap.add_argument("--policies-per-namespace", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    resolver, workloads, _ = build(args)
    n_pols = len(resolver.policies)
    resolved, t_resolve = timed(resolver.resolved)
    policy = Policy(workloads=tuple(workloads[n] for n in sorted(workloads)), network_policies=resolved)
    compiler, t_build = timed(lambda: Compiler(policy))
    _, t_hosts = timed(compiler.all_host_policies)
    rows: list[tuple[str, str]] = [
        ("estate", f"{len(workloads):,} pods, {args.namespaces} namespaces, {n_pols:,} NetworkPolicies"),
        ("translation (all policies)", f"{t_resolve.wall * 1000:.0f} ms wall, {t_resolve.cpu * 1000:.0f} ms CPU"),
        ("full compile (Compiler + all host policies)",
         f"{(t_build.wall + t_hosts.wall):.2f} s wall, {(t_build.cpu + t_hosts.cpu):.2f} s CPU"),
    ]
    result: dict[str, Any] = {"pods": len(workloads), "policies": n_pols, "translate_s": t_resolve.cpu,
                              "full_compile_s": t_build.cpu + t_hosts.cpu}

    rnd = random.Random(7)
    pods = sorted(resolver.pods)
    for label, change in (("one-pod label delta", "pod"), ("one-namespace label delta", "namespace")):
        times: list[float] = []
        cpus: list[float] = []
        dirty_counts: list[int] = []
        shapes: list[dict[str, int]] = []
        for _ in range(args.repeat):
            if change == "pod":
                key = rnd.choice(pods)
                old = resolver.pods[key]
                new = PodInfo(old.namespace, old.name, {**old.labels, "app": rnd.choice(APPS)}, old.ports)

                def step(new: PodInfo = new, counts: list[int] = dirty_counts) -> list[HostDelta]:
                    resolver.set_pod(new)
                    counts.append(resolver.dirty_count)
                    return compiler.replace_network_policies(resolver.resolved())
            else:
                ns = f"ns-{rnd.randrange(args.namespaces)}"
                labels = {**resolver.namespaces[ns], "team": rnd.choice(TEAMS)}

                def step(ns: str = ns, labels: dict[str, str] = labels, counts: list[int] = dirty_counts,
                         ) -> list[HostDelta]:
                    resolver.set_namespace(ns, labels)
                    counts.append(resolver.dirty_count)
                    return compiler.replace_network_policies(resolver.resolved())
            deltas, t = timed(step)
            times.append(t.wall)
            cpus.append(t.cpu)
            shapes.append(summarize(deltas))
        med = statistics.median(times) * 1000
        rows.append((label, f"median {med:.1f} ms wall ({statistics.median(cpus) * 1000:.1f} ms CPU), max "
                            f"{max(times) * 1000:.1f} ms; dirty policies median "
                            f"{statistics.median(dirty_counts):.0f}; hosts changed median "
                            f"{statistics.median(s['hosts'] for s in shapes):.0f} (set-delta only: "
                            f"{sum(s['set_deltas'] for s in shapes)}, reloads: {sum(s['reloads'] for s in shapes)} "
                            f"over {args.repeat} changes)"))
        result[change + "_delta_ms_median"] = med
        result[change + "_delta_ms_max"] = max(times) * 1000
        result[change + "_delta_cpu_ms_median"] = statistics.median(cpus) * 1000

    final = Policy(workloads=policy.workloads, network_policies=resolver.resolved())
    same = compiler.all_host_policies() == Compiler(final).all_host_policies()
    rows.append(("incremental == full recompile", "yes" if same else "NO"))
    result["incremental_equals_full"] = same

    width = max(len(r[0]) for r in rows)
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
