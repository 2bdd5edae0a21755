"""Convergence benchmark (issue 5): a controller and N real agents in lab namespaces.

Each agent is ``python -m stockade.agent --netns ...`` (``stockade agent``) enforcing with
nftables inside its own namespace host, enrolled with an activation code, talking HTTPS to
the controller (its own CA pinned) through the failsafe. The policy is the example estate's
(``examples/estate``: rulesets, deny rules, services, failsafe) over N generated workloads
``h00..`` of the prod shop, roles cycling web / app / db.

One trial = one relabel through the API: a web host becomes ``role=app`` (the next trial puts
it back), which changes the policy of every host that has it as a peer. Timed from just before
the ``PUT /workloads/NAME``:

* **last ack**: until ``GET /convergence`` shows every agent's acknowledged revision equal to
  its desired one (polled every 5 ms);
* **first flip**: until a real connection from that host to an app host on 8080/tcp changes
  (allowed -> blocked, then blocked -> allowed), probed back to back from a second thread; the
  time is the start of the first probe that shows the new outcome.

    python bench/convergence.py                  # 20 agents, 20 trials (~1-2 min)
    python bench/convergence.py --agents 10 --trials 10 --json /tmp/conv.json

Needs root, ``ip`` and ``nft``. Prints the load average first: on a shared 2-core machine wall
times include waiting for a core.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the end-to-end harness lives with the tests

from tests.e2e.harness import ESTATE, AgentProcess, Api, ControllerLink, ControllerProcess, wait_for  # noqa: E402

from stockade.lab import HostSpec, Lab, Probe, ProbeKind  # noqa: E402

ROLES = ("web", "app", "db")


def workload_yaml(n: int) -> str:
    docs = []
    for i in range(n):
        docs.append(
            "apiVersion: stockade.io/v1\nkind: Workload\n"
            f"name: h{i:02d}\nlabels: {{role: {ROLES[i % 3]}, app: shop, env: prod, loc: lab}}\n"
            f"interfaces: [{{name: eth0, addresses: [10.70.0.{10 + i}, 'fd70::{10 + i:x}']}}]\nmode: full\n"
        )
    return "\n---\n".join(docs)


def estate_yaml(n: int) -> str:
    parts = [p.read_text() for p in sorted(ESTATE.glob("*.yaml")) if p.name != "workloads.yaml"]
    return "\n---\n".join([*parts, workload_yaml(n)])


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class FlipWatcher(threading.Thread):
    """Probes one connection back to back; records when its outcome first equals ``want``."""

    def __init__(self, lab: Lab, probe: Probe, want: bool, start: float) -> None:
        super().__init__(daemon=True)
        self.lab, self.probe, self.want, self.start_time = lab, probe, want, start
        self.flipped_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() - self.start_time < 10.0:
            began = time.monotonic()
            result = self.lab.probe([self.probe], timeout=0.15)[0]
            if result.succeeded == self.want:
                self.flipped_at = began - self.start_time
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    n = args.agents
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {n} agents, {args.trials} trials")
    tmp = Path(tempfile.mkdtemp(prefix="stockade-conv-"))
    hosts = [
        HostSpec(f"h{i:02d}", (ipaddress.ip_address(f"10.70.0.{10 + i}"), ipaddress.ip_address(f"fd70::{10 + i:x}")),
                 (8080,))
        for i in range(n)
    ]
    agents: list[AgentProcess] = []
    with Lab(hosts) as lab:
        link = ControllerLink(lab)
        controller = ControllerProcess(tmp / "controller", "10.70.0.1", 8443, tmp / "controller.log")
        try:
            controller.start()
            api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                      controller.ca_cert)
            api.ok("PUT", "/policy/draft", content=estate_yaml(n), headers={"Content-Type": "application/yaml"})
            api.ok("POST", "/policy/provision", 201, json={"message": "convergence bench"})
            t0 = time.monotonic()
            for h in hosts:  # declared by the estate: each agent adopts its workload with its own code
                code = api.adoption_code("bench", h.name)
                a = AgentProcess(h.name, lab.netns(h.name), tmp / "state" / h.name, controller.url, code,
                                 tmp / f"agent-{h.name}.log", ca_cert=controller.ca_cert)
                a.start()
                agents.append(a)
            names = [h.name for h in hosts]
            if wait_for(lambda: api.converged(names), 120.0, 0.2) is None:
                sys.exit(f"agents did not converge; logs in {tmp}")
            print(f"{n} agents enrolled and converged in {time.monotonic() - t0:.1f}s")
            rows = run_trials(lab, api, hosts, args.trials)
            rss = [a.rss_kib() / 1024 for a in agents]
        finally:
            for a in agents:
                a.stop()
            controller.kill()
            link.remove()
    report(rows, rss, args.json)


def run_trials(lab: Lab, api: Api, hosts: list[HostSpec], trials: int) -> list[dict[str, Any]]:
    webs = [h for i, h in enumerate(hosts) if ROLES[i % 3] == "web"]
    target = next(h for i, h in enumerate(hosts) if ROLES[i % 3] == "app")
    rows = []
    for t in range(trials):
        host = webs[(t // 2) % len(webs)]
        to_role, want_ok = ("app", False) if t % 2 == 0 else ("web", True)  # web -> app: 8080 closes
        probe = Probe(host.name, target.name, ProbeKind.TCP, host.addresses[0], target.addresses[0], 8080)
        body = api.workload(host.name)
        before = {w: a["desired_revision"] for w, a in api.agents().items()}
        start = time.monotonic()
        watcher = FlipWatcher(lab, probe, want_ok, start)
        watcher.start()
        api.put_workload(host.name, {**body, "labels": {**body["labels"], "role": to_role}})
        while True:
            conv = api.ok("GET", "/convergence")
            if not conv["lagging"] and conv["converged"] == conv["agents"]:
                acked = time.monotonic() - start
                break
            if time.monotonic() - start > 10:
                acked = float("nan")
                break
            time.sleep(0.005)
        watcher.join(10.0)
        watcher.stop.set()
        affected = sum(1 for w, a in api.agents().items() if a["desired_revision"] != before.get(w))
        rows.append({"trial": t, "host": host.name, "to": to_role, "affected": affected,
                     "last_ack_s": acked, "first_flip_s": watcher.flipped_at})
        print(f"  trial {t:2d}: {host.name} -> {to_role:3s}  {affected:2d} hosts changed  "
              f"last ack {acked * 1000:6.1f} ms  first flip "
              f"{'-' if watcher.flipped_at is None else f'{watcher.flipped_at * 1000:6.1f} ms'}")
        time.sleep(0.2)
    return rows


def report(rows: list[dict[str, Any]], rss: list[float], json_path: Path | None) -> None:
    acks = [r["last_ack_s"] for r in rows if r["last_ack_s"] == r["last_ack_s"]]
    flips = [r["first_flip_s"] for r in rows if r["first_flip_s"] is not None]
    print()
    print("| measure (s)              | p50   | p99   | max   | trials |")
    print("|--------------------------|-------|-------|-------|--------|")
    for name, vals in (("relabel -> last agent ack", acks), ("relabel -> first real flip", flips)):
        if vals:
            print(f"| {name:<24} | {quantile(vals, 0.5):.3f} | {quantile(vals, 0.99):.3f} | {max(vals):.3f} |"
                  f" {len(vals):3d}/{len(rows)} |")
    print(f"\nhosts changed per relabel: mean {statistics.mean(r['affected'] for r in rows):.1f}; "
          f"agent RSS mean {statistics.mean(rss):.1f} MiB, max {max(rss):.1f} MiB")
    target = 1.0
    verdict = "PASS" if acks and quantile(acks, 0.99) <= target and len(acks) == len(rows) else "FAIL"
    print(f"target p99 last ack <= {target:.1f} s: {verdict}")
    if json_path is not None:
        json_path.write_text(json.dumps({"rows": rows, "rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
