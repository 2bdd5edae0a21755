"""Nodes' convergence after a NetworkPolicy change (issue 16), beside a Stockade-rule change of the same reach.

A real controller process (``bench/controller.py --serve``: uvicorn, SQLite) and ``--nodes`` simulated
Kubernetes nodes, each holding ``--pods`` pods. As the node agent does (``stockade.k8s.node_agent``),
every pod is its own agent identity: it enrols, long-polls ``/policy/wait?include_policy=true`` and
acknowledges the revision it applied with its next wait (``bench/controller.py``'s simulated agent,
no kernel). A node has converged when every pod on it that the change concerns has acknowledged.

Estate: pods ``k8s.bench.n<node>p<i>``; even ``i`` are ``role=web`` (half of every node's pods),
odd ``i`` ``role=db``. Two policies of the same reach (every web pod, on every node):

* the ruleset ``web-in``: scope ``role=web``, db (extra-scope) -> web (measured first, then deleted);
* the NetworkPolicy ``k8s.bench.web-in`` (the controller's ``network-policies`` kind, written as
  the cluster sync writes it): it selects every web pod and allows ingress from the db pods. (Not
  both at once: a pod isolated by a NetworkPolicy ignores Stockade allows, docs/kubernetes.md, so
  a ruleset change would reach no pod.)

One trial changes the allowed port (80/tcp <-> 81/tcp) of one of them, so every web pod's rules
change: for the NetworkPolicy a ``PUT /network-policies/k8s.bench.web-in`` (live at once, as from
the sync); for the ruleset a ``PUT /rulesets/web-in`` then ``POST /policy/provision`` (a Stockade
rule change takes effect when provisioned; both calls are inside the timing). Timed from just
before the first API call until each node's last affected pod acknowledged; p50/p99 over nodes x
trials.

    python bench/k8s_netpol_convergence.py --nodes 20 --pods 10 --trials 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import controller as cb  # noqa: E402  (bench/controller.py: the server, the tiny client, simulated agents)

NETPOL = "k8s.bench.web-in"


def pod_name(node: int, i: int) -> str:
    return f"k8s.bench.n{node:03d}p{i:02d}"


async def _ok(c: cb.Conn, key: str, method: str, path: str, body: Any, expect: int) -> Any:
    status, got = await c.request(method, "/api/v1" + path, key, body)
    assert status == expect, (method, path, status, got)
    return got


def _netpol_body(web: list[str], db: list[str], port: int) -> dict[str, Any]:
    return {"name": NETPOL, "namespace": "bench", "policy": "web-in", "selected": web, "isolates": ["ingress"],
            "problems": [], "rules": [{"direction": "ingress", "index": 0, "targets": web, "any_peer": False,
                                       "peer_workloads": db, "peer_cidrs": [], "ports": [f"{port}/tcp"]}]}


def _ruleset_body(port: int) -> dict[str, Any]:
    return {"name": "web-in", "scope": [{"labels": {"role": "web"}}], "rules": [
        {"consumers": [{"labels": {"role": "db"}}], "providers": [{"labels": {"role": "web"}}],
         "services": [f"web-{port}"], "consumers_scope": "global"}]}


async def _enrol(port: int, key: str, nodes: int, pods: int) -> list[cb.Agent]:
    admin = cb.Conn(port)
    codes = {}
    for role in ("web", "db"):
        await _ok(admin, key, "POST", "/pairing-profiles", {"name": f"pod-{role}", "mode": "full",
                                                           "labels": {"role": role}, "code_max_uses": 1_000_000}, 201)
        codes[role] = (await _ok(admin, key, "POST", f"/pairing-profiles/pod-{role}/codes", {}, 201))["code"]
    admin.close()
    order = [(n, i) for n in range(nodes) for i in range(pods)]
    agents: list[cb.Agent | None] = [None] * len(order)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(len(order)):
        queue.put_nowait(k)

    async def worker() -> None:
        c = cb.Conn(port)
        while not queue.empty():
            k = queue.get_nowait()
            n, i = order[k]
            addr = f"10.{100 + (n >> 8)}.{n & 255}.{10 + i}"
            status, got = await c.request("POST", "/api/v1/agents/enroll", body={
                "activation_code": codes["web" if i % 2 == 0 else "db"], "hostname": pod_name(n, i),
                "interfaces": [{"name": "eth0", "addresses": [addr]}]})
            assert status == 201, got
            agents[k] = cb.Agent(k, got["agent_id"], got["token"], got["workload"])
        c.close()

    await asyncio.gather(*(worker() for _ in range(8)))
    return [a for a in agents if a is not None]


async def run(port: int, password: str, nodes: int, pods: int, trials: int) -> dict[str, Any]:
    key = await cb._owner_key(port, password)
    admin = cb.Conn(port)
    for p in (80, 81):
        await _ok(admin, key, "POST", "/services", {"name": f"web-{p}", "ports": [f"{p}/tcp"]}, 201)
    await _ok(admin, key, "POST", "/rulesets", _ruleset_body(80), 201)
    await _ok(admin, key, "POST", "/policy/provision", {"message": "bench"}, 201)
    t = time.perf_counter()
    agents = await _enrol(port, key, nodes, pods)
    enrol_s = time.perf_counter() - t
    print(f"enrolled {len(agents)} pod agents in {enrol_s:.1f} s", file=sys.stderr, flush=True)
    node_of = {a.workload: int(a.workload.split(".")[2][1:4]) for a in agents}
    web = sorted(a.workload for a in agents if int(a.workload[-2:]) % 2 == 0)
    db = sorted(a.workload for a in agents if int(a.workload[-2:]) % 2 == 1)

    stop = asyncio.Event()
    tasks = [asyncio.create_task(cb.agent_loop(a, port, 10.0, stop)) for a in agents]
    await cb._converged(admin, key, len(agents), 300)

    out: dict[str, Any] = {"nodes": nodes, "pods_per_node": pods, "pods": len(agents), "enrol_s": enrol_s}
    current = {"netpol": 80, "ruleset": 80}
    for kind in ("ruleset", "netpol"):
        if kind == "netpol":  # a pod isolated by a NetworkPolicy needs a NetworkPolicy allow: the ruleset goes
            await _ok(admin, key, "DELETE", "/rulesets/web-in", None, 204)
            await _ok(admin, key, "POST", "/policy/provision", {"message": "ruleset off"}, 201)
            await _ok(admin, key, "POST", "/network-policies", _netpol_body(web, db, 80), 201)
            await cb._converged(admin, key, len(agents), 120)
        per_node: list[float] = []
        fan: list[int] = []
        for _ in range(trials):
            new = 81 if current[kind] == 80 else 80
            before = {a.workload: a.applied for a in agents}
            t0 = time.perf_counter()
            if kind == "netpol":
                await _ok(admin, key, "PUT", f"/network-policies/{NETPOL}", _netpol_body(web, db, new), 200)
            else:
                await _ok(admin, key, "PUT", "/rulesets/web-in", _ruleset_body(new), 200)
                await _ok(admin, key, "POST", "/policy/provision", {"message": f"port {new}"}, 201)
            current[kind] = new
            await cb._converged(admin, key, len(agents), 120)
            moved = [a for a in agents if a.applied != before[a.workload]]
            fan.append(len(moved))
            done: dict[int, float] = {}
            for a in moved:
                acked = next(tt for tt, _rev in a.acks if tt >= t0) - t0
                n = node_of[a.workload]
                done[n] = max(done.get(n, 0.0), acked)
            per_node += list(done.values())
            print(f"{kind}: trial done, slowest node {1000 * max(done.values(), default=0):.0f} ms",
                  file=sys.stderr, flush=True)
        out[kind] = {"p50_ms": 1000 * cb.pct(per_node, 50), "p99_ms": 1000 * cb.pct(per_node, 99),
                     "max_ms": 1000 * max(per_node, default=float("nan")),
                     "pods_changed": sum(fan) / max(1, len(fan)), "node_samples": len(per_node)}
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out["agent_errors"] = sum(a.errors for a in agents)
    admin.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--pods", type=int, default=10, help="pods per node (half of them selected)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-npconv-"))
    port = cb._free_port()
    server = subprocess.Popen([sys.executable, str(BENCH / "controller.py"), "--serve",
                               f"sqlite:///{tmp / 'stockade.db'}", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        cred = json.loads(server.stdout.readline())
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        import uvloop

        r = uvloop.run(run(port, cred["password"], args.nodes, args.pods, args.trials))
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"nodes {r['nodes']} x {r['pods_per_node']} pods ({r['pods']} agents, enrolled in {r['enrol_s']:.1f} s), "
          f"{args.trials} trials, load {load}")
    print(f"{'change':<34}{'pods changed':>13}{'node p50 ms':>13}{'node p99 ms':>13}{'max ms':>9}")
    for kind, label in (("netpol", "NetworkPolicy port (PUT)"), ("ruleset", "Stockade ruleset port (PUT+provision)")):
        row = r[kind]
        print(f"{label:<34}{row['pods_changed']:>13.0f}{row['p50_ms']:>13.0f}{row['p99_ms']:>13.0f}{row['max_ms']:>9.0f}")
    print(f"agent errors: {r['agent_errors']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
