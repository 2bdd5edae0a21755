"""Kubernetes pod churn with real node agents beside simulated ones (issue 15's mixed run).

bench/k8s_fanout.py's estate and churn (namespaces "apps" of 10 pods, 5 ``role=web`` and 5 ``role=db``,
web -> db 5432/tcp per app, one cluster-wide monitor ruleset; pod ``i`` on node ``i mod --nodes``;
churn pods created and deleted through ``POST /workload-batches`` as the cluster sync writes them),
against ONE controller (bench/controller.py's, SQLite), where the first ``--real-nodes`` of the
``--nodes`` nodes are real ``stockade k8s node-agent`` processes (bench/k8s.py's way: a real
kube-apiserver + etcd from the tests/k8s harness, each real pod a network namespace with a process in
a ``pod<uid>`` cgroup, its IP patched into the API), the others simulated (k8s_fanout's node pollers).

Counting: ``--pods`` pods on ``--nodes`` nodes, real nodes included. A real node enforces its first
``--real-pods`` pods (``i mod nodes == r``, ``i // nodes < real-pods``); its other pods go to the
simulated nodes (so the estate stays ``--pods`` pods; at 10,000 / 100 with 3 x 30 real pods, the real
pods sit in 30 apps, 3 real pods of each, on 3 nodes, the app's other 7 pods simulated). The real pods'
workloads are written by the bench in the sync's shape (``k8s.<ns>.<pod>``, labels app / role /
k8s-node, the pod's IP), not by the cluster sync: the sync would delete the simulated pods (it owns
every ``k8s.*`` workload no pod of its cluster wants).

Churn: ``--rate`` events/s for ``--seconds``, creates and deletes alternating; a share
``--real-share`` of the creates go to an app holding a real pod (else any app), role at random (a
delete takes the oldest churn pod: the same share); such an event fans out to a real node when the
app has a real pod of the other role (at the default sizes every such app has both). Per event, timed
from just before its API write:

* every affected simulated node acknowledged (k8s_fanout's measure: the pods' long-polls brought the
  address added / gone, the acks ride on the node's next long-poll);
* every affected real node acknowledged: the controller's own view of the real pods' agents. A real
  node agent acks a pod's revision (on its node long-poll) after applying it in the pod's namespace
  and reading it back; the bench polls ``GET /convergence`` every ``--ack-poll-ms`` and counts an
  affected real pod acknowledged at the first answer, asked after the event's write returned, that
  does not list it as lagging (applied revision == desired). Resolution: one poll interval (the
  time is the answer's arrival, an upper bound); a later event of the same app before that answer
  makes it the later one's ack (upper bound again).

    python bench/k8s_fanout_real.py                                    # 10,000 pods, 100 nodes (3 real x 30 pods)
    python bench/k8s_fanout_real.py --pods 200 --nodes 4 --real-nodes 1 --real-pods 10 --seconds 5   # smoke

Needs root, the harness' cached binaries (tests/k8s/k8s.sh build), ``ip`` and ``nft``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.k8s: the harness
sys.path.insert(0, str(Path(__file__).resolve().parent))

from controller import APP_SIZE, _free_port, _owner_key, _setup_policy, pct
from controller_agents import Agent, Conn, _raise_nofile
from k8s_fanout import CONTROLLER, Event, Pending, churn_pod, controller_ready, enrol_simulated_nodes, node_poller
from tests.k8s.conftest import SCRIPT, Cluster, _ports_env
from tests.k8s.kube import Kube

from k8s import CGROUP_ROOT, SimPod
from stockade.k8s.podns import pin_prefix

NODE = "h15o-node-{}"  # the real nodes' names (their namespace pins: pin_prefix(name))


class Layout:
    """Which node each pod is on, which pods are real."""

    def __init__(self, pods: int, nodes: int, real_nodes: int, real_pods: int) -> None:
        self.pods, self.nodes, self.real_nodes = pods, nodes, real_nodes
        self.node: list[int] = []
        for i in range(pods):
            n = i % nodes
            if n < real_nodes and i // nodes >= real_pods:
                n = real_nodes + (i // nodes) % (nodes - real_nodes)
            self.node.append(n)
        self.real = {i for i in range(pods) if self.node[i] < real_nodes}

    def node_name(self, n: int) -> str:
        return NODE.format(n) if n < self.real_nodes else f"node-{n:03d}"


def app_of(i: int, pods: int) -> int:
    return (i // APP_SIZE) % max(1, pods // APP_SIZE)


def role_of(i: int) -> str:
    return "web" if i % 2 else "db"


def addr_of(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


async def setup_estate(port: int, key: str, lay: Layout) -> tuple[list[Agent], dict[int, Agent], str]:
    """Every pod's workload (as the sync writes it), the simulated nodes enrolled with their pods
    (k8s_fanout's way); returns the simulated node agents, the simulated pod agents by index and the
    node activation code (for the real node agents)."""

    admin = Conn(port)

    async def ok(method: str, path: str, body: Any) -> Any:
        status, got = await admin.request(method, "/api/v1" + path, key, body)
        assert status in (200, 201), (path, status, got)
        return got

    await ok("POST", "/label-keys", {"name": "k8s-node", "values": []})
    names = [f"k8s.app-{app_of(i, lay.pods)}.pod-{i:05d}" for i in range(lay.pods)]
    for chunk in range(0, lay.pods, 500):
        await ok("POST", "/workload-batches", {"delete": [], "upsert": [
            {"name": names[i], "labels": {"app": f"app-{app_of(i, lay.pods)}", "role": role_of(i),
                                          "k8s-node": lay.node_name(lay.node[i])},
             "interfaces": [{"name": "eth0", "addresses": [addr_of(i)]}], "mode": "full"}
            for i in range(chunk, min(lay.pods, chunk + 500))]})
    await ok("POST", "/pairing-profiles", {"name": "k8s-nodes", "mode": "idle", "code_max_uses": 1_000_000})
    code = str((await ok("POST", "/pairing-profiles/k8s-nodes/codes", {}))["code"])
    sim = range(lay.real_nodes, lay.nodes)
    by_node: dict[int, list[int]] = {n: [] for n in sim}
    for i in range(lay.pods):
        if lay.node[i] in by_node:  # (a real node's pods are the real ones)
            by_node[lay.node[i]].append(i)
    node_agents, pods = await enrol_simulated_nodes(port, code, names, sim, lay.node_name, by_node.__getitem__)
    admin.close()
    return list(node_agents.values()), pods, code


def start_real(kube: Kube, lay: Layout, cgroup: Path) -> list[SimPod]:
    """The real pods in the API, each with its sandbox and its IP (bench/k8s.py's SimPod)."""
    out: list[SimPod] = []
    made: set[str] = set()
    for i in sorted(lay.real):
        ns = f"app-{app_of(i, lay.pods)}"
        if ns not in made:
            kube.ok("POST", "/api/v1/namespaces", json={"metadata": {"name": ns}})
            made.add(ns)
        p = SimPod(kube, ns, f"pod-{i:05d}", lay.node_name(lay.node[i]), addr_of(i), ns, cgroup,
                   labels={"role": role_of(i)}, netns_prefix="h15o")
        out.append(p)
        p.sandbox()
        p.start()
    return out


async def real_acks(port: int, key: str, events: list[Event], real_of: Callable[[Event], list[int]],
                    names: dict[int, str], acked: dict[tuple[int, int], float], stop: asyncio.Event,
                    interval: float) -> tuple[int, float]:
    """Poll ``GET /convergence``: an affected real pod has acknowledged an event at the first answer
    (asked after the event's write returned) that does not list it as lagging."""
    c = Conn(port)
    waiting: list[tuple[int, int]] = []
    seen_events = 0
    polls = 0
    took = 0.0
    while not stop.is_set():
        asked = time.perf_counter()
        status, got = await c.request("GET", "/api/v1/convergence?limit=100000", key)
        now = time.perf_counter()
        polls += 1
        took += now - asked
        if status == 200:
            lagging = set(got["lagging"])
            while seen_events < len(events):
                e = events[seen_events]
                waiting += [(seen_events, p) for p in real_of(e)]
                seen_events += 1
            still = []
            for ei, p in waiting:
                if events[ei].end <= asked and names[p] not in lagging:
                    acked[(ei, p)] = now
                else:
                    still.append((ei, p))
            waiting = still
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - asked)))
    c.close()
    return polls, 1000 * took / max(1, polls)


async def converged(c: Conn, key: str, n: int, exempt: set[str], limit: float) -> None:
    """bench/controller.py's but the real nodes' own workloads may lag."""
    deadline = time.monotonic() + limit
    got: Any = None
    while time.monotonic() < deadline:
        status, got = await c.request("GET", "/api/v1/convergence?limit=100000", key)
        if status == 200 and got["agents"] == n and not set(got["lagging"]) - exempt:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"agents did not converge in {limit} s: {str(got)[:1000]}")


async def run(args: argparse.Namespace, port: int, password: str, kube: Kube, cgroup: Path, tmp: Path,
              agent_procs: list[subprocess.Popen[bytes]], real_pods: list[SimPod]) -> dict[str, Any]:
    lay = Layout(args.pods, args.nodes, args.real_nodes, args.real_pods)
    admin = Conn(port)
    key = await _owner_key(port, password)
    t = time.perf_counter()
    await _setup_policy(admin, key, args.pods)
    pending, stop = Pending(), asyncio.Event()
    sim_nodes, sim_pods, code = await setup_estate(port, key, lay)
    tasks = [asyncio.create_task(node_poller(n, [sim_pods[i] for i in range(args.pods) if lay.node[i] == n.index],
                                             port, pending, stop)) for n in sim_nodes]
    real_pods += await asyncio.to_thread(start_real, kube, lay, cgroup)
    (tmp / "code").write_text(code)
    for r in range(args.real_nodes):
        with (tmp / f"node-agent-{r}.log").open("wb") as out:
            agent_procs.append(subprocess.Popen(
                [sys.executable, "-m", "stockade.cli", "k8s", "node-agent", "--node", lay.node_name(r),
                 "--controller", f"http://127.0.0.1:{port}", "--activation-code-file", str(tmp / "code"),
                 "--kubeconfig", str(tmp / "k8s" / "kubeconfig"), "--state-dir", str(tmp / f"state-{r}"),
                 "--no-host-policy", "--log-level", "info"], stdout=out, stderr=subprocess.STDOUT))
    setup_s = time.perf_counter() - t
    # a real node agent without host policy (--no-host-policy) never acks its node's own revision
    await converged(admin, key, args.pods + args.nodes, {lay.node_name(r) for r in range(args.real_nodes)},
                    args.converge_timeout)
    converged_s = time.perf_counter() - t
    print(f"churn starts (setup {setup_s:.0f} s, converged {converged_s:.0f} s)", file=sys.stderr, flush=True)
    apps = max(1, args.pods // APP_SIZE)
    by_app_role: dict[tuple[int, str], list[int]] = {}
    for i in range(args.pods):
        by_app_role.setdefault((app_of(i, args.pods), role_of(i)), []).append(i)
    real_apps = sorted({app_of(i, args.pods) for i in lay.real})
    names = {i: f"k8s.app-{app_of(i, args.pods)}.pod-{i:05d}" for i in lay.real}
    rng = random.Random(15)
    events: list[Event] = []
    live: list[tuple[str, str, int, str]] = []
    queued: list[tuple[str, dict[str, Any] | None, str, int, str, float]] = []
    api_ms: list[float] = []
    acked: dict[tuple[int, int], float] = {}
    ack_stop = asyncio.Event()
    ack_task = asyncio.create_task(real_acks(port, key, events, lambda e: [p for p in e.affected if p in lay.real],
                                             names, acked, ack_stop, args.ack_poll_ms / 1000))
    load0 = os.getloadavg()
    counter = 0

    def make_event(i: int) -> None:
        nonlocal counter
        if i % 2 == 0 or not live:
            counter += 1
            app = rng.choice(real_apps) if real_apps and rng.random() < args.real_share else rng.randrange(apps)
            role = rng.choice(("web", "db"))
            name, addr, body = churn_pod(counter, app, role)
            pending.adds.add(addr)
        else:
            name, addr, app, role = live.pop(0)
            body = None
            pending.dels.add(addr)
        queued.append((name, body, addr, app, role, time.perf_counter()))

    async def sync_worker(conn: Conn, produced: asyncio.Event) -> None:
        """As the cluster sync does: take every change gathered so far, write it as one batch, repeat."""
        while not (produced.is_set() and not queued):
            if not queued:
                await asyncio.sleep(0.002)
                continue
            batch = queued[:1000]
            del queued[:1000]
            t = time.perf_counter()
            status, got = await conn.request("POST", "/api/v1/workload-batches", key, {
                "upsert": [b for _n, b, *_ in batch if b], "delete": [n for n, b, *_ in batch if not b]})
            assert status == 200, (status, got)
            end = time.perf_counter()
            api_ms.append((end - t) * 1000)
            for name, body, addr, app, role, t0 in batch:
                other = "db" if role == "web" else "web"
                events.append(Event(addr, "add" if body else "del", t0, tuple(by_app_role.get((app, other), ())),
                                    t, end))
                if body is not None:
                    live.append((name, addr, app, role))

    produced = asyncio.Event()
    worker = asyncio.create_task(sync_worker(Conn(port), produced))
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < args.seconds:
        await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
        make_event(i)
        i += 1
    produced.set()
    await worker
    churn_s = time.perf_counter() - started

    def real_want(ei: int, e: Event) -> list[tuple[int, int]]:
        return [(ei, p) for p in e.affected if p in lay.real]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (all((e.addr, e.kind, p) in pending.seen for e in events for p in e.affected if p not in lay.real)
                and all(k in acked for ei, e in enumerate(events) for k in real_want(ei, e))):
            break
        await asyncio.sleep(0.2)
    ack_stop.set()
    polls, poll_ms = await ack_task
    sim_lat: list[float] = []
    real_lat: list[float] = []
    missing_sim = missing_real = 0
    for ei, e in enumerate(events):
        sim: dict[int, float] = {}
        real: dict[int, float] = {}
        ok_sim = ok_real = True
        for p in e.affected:
            if p in lay.real:
                got = acked.get((ei, p))
                if got is None:
                    ok_real = False
                else:
                    real[lay.node[p]] = max(real.get(lay.node[p], 0.0), got - e.t0)
            else:
                seen = pending.seen.get((e.addr, e.kind, p))
                if seen is None:
                    ok_sim = False
                else:
                    sim[lay.node[p]] = max(sim.get(lay.node[p], 0.0), seen - e.t0)
        missing_sim += not ok_sim
        if not ok_sim:  # never seen by some affected simulated pod: say which
            lost = [p for p in e.affected if p not in lay.real and (e.addr, e.kind, p) not in pending.seen]
            print(f"missing: event {ei} {e.kind} {e.addr}, pods {lost} on nodes {[lay.node[p] for p in lost]}",
                  file=sys.stderr, flush=True)
        missing_real += not ok_real
        if ok_sim and sim:
            sim_lat.append(max(sim.values()))
        if ok_real and real:
            real_lat.append(max(real.values()))
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    admin.close()
    ms: Callable[[list[float]], str] = lambda v: (  # noqa: E731
        f"{1000 * pct(v, 50):,.0f} / {1000 * pct(v, 99):,.0f} / {1000 * max(v, default=float('nan')):,.0f}")
    return {
        "pods": args.pods, "nodes": args.nodes, "real_nodes": args.real_nodes, "real_pods": len(lay.real),
        "events": len(events), "rate": len(events) / churn_s, "setup_s": setup_s, "converged_s": converged_s,
        "sim": ms(sim_lat), "sim_n": len(sim_lat), "real": ms(real_lat), "real_n": len(real_lat),
        "missing_sim": missing_sim, "missing_real": missing_real, "api_p50_ms": pct(api_ms, 50),
        "api_p99_ms": pct(api_ms, 99), "calls": len(api_ms), "ack_polls": polls, "ack_poll_ms": poll_ms,
        "agent_errors": sum(a.errors for a in [*sim_pods.values(), *sim_nodes]),
        "agents_alive": sum(p.poll() is None for p in agent_procs), "load0": load0, "load1": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100, help="nodes, the real ones included")
    ap.add_argument("--real-nodes", type=int, default=3)
    ap.add_argument("--real-pods", type=int, default=30, help="real pods per real node")
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--real-share", type=float, default=0.5, help="share of creates in an app holding a real pod")
    ap.add_argument("--ack-poll-ms", type=float, default=50.0, help="GET /convergence interval (real nodes' acks)")
    ap.add_argument("--converge-timeout", type=float, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not 0 < args.real_nodes < args.nodes or args.real_pods * args.nodes > args.pods:
        raise SystemExit("need 0 < --real-nodes < --nodes and --real-pods <= pods per node")
    _raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cleanup below runs on a plain kill too
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="h15o-fanout-real-"))
    env = _ports_env()
    subprocess.run([str(SCRIPT), "start", str(tmp / "k8s")], env=env, check=True)
    values = dict(line.split("=", 1) for line in (tmp / "k8s" / "env").read_text().split())
    import ipaddress

    cluster = Cluster(values["K8S_API"], Path(values["K8S_TOKEN_FILE"]).read_text().strip(), Path(values["K8S_CA"]),
                      tmp / "k8s" / "kubeconfig", tmp / "k8s", ipaddress.IPv4Network("10.0.0.0/16"),
                      ipaddress.IPv6Network("fd46::/64"))
    cgroup = CGROUP_ROOT / f"h15o-bench-{secrets.token_hex(3)}"
    cgroup.mkdir()
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(CONTROLLER), "--serve", f"sqlite:///{tmp / 'stockade.db'}",
                               str(port)], stdout=subprocess.PIPE, text=True)
    agents: list[subprocess.Popen[bytes]] = []
    real_pods: list[SimPod] = []
    try:
        cred = controller_ready(server, port)
        import uvloop

        r = uvloop.run(run(args, port, cred["password"], Kube(cluster), cgroup, tmp, agents, real_pods))
        print(json.dumps(r), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(r, indent=1))
        print()
        print(f"| pod churn, {r['pods']:,} pods on {r['nodes']} nodes ({r['real_nodes']} real: {r['real_pods']} "
              f"real pods), {r['events']} events at {r['rate']:.0f}/s | p50 / p99 / max ms | events |")
        print("|---|---|---|")
        print(f"| event -> every affected **simulated** node acked | {r['sim']} | {r['sim_n']} |")
        print(f"| event -> every affected **real** node acked (controller's acked revision, "
              f"GET /convergence every {args.ack_poll_ms:.0f} ms) | {r['real']} | {r['real_n']} |")
        print(f"| batch write (POST /workload-batches), {r['calls']} calls | {r['api_p50_ms']:.0f} / "
              f"{r['api_p99_ms']:.0f} / - | |")
        print(f"| events not acked within 60 s: simulated / real; agent errors; real node agents alive | "
              f"{r['missing_sim']} / {r['missing_real']}; {r['agent_errors']}; {r['agents_alive']} | |")
        print(f"| GET /convergence polls (real acks) / mean answer time | {r['ack_polls']} / "
              f"{r['ack_poll_ms']:.1f} ms | |")
        print(f"| setup / every agent converged, s | {r['setup_s']:.0f} / {r['converged_s']:.0f} | |")
        print(f"| load average (1/5/15 min) at churn start / end | "
              f"{'/'.join(f'{x:.1f}' for x in r['load0'])} ; {'/'.join(f'{x:.1f}' for x in r['load1'])} | |")
    finally:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(SimPod.delete, real_pods))
        prefixes = [pin_prefix(NODE.format(n)) for n in range(args.real_nodes)]
        deadline = time.monotonic() + 30  # the node agents unpin deleted pods' namespaces themselves
        while time.monotonic() < deadline and any(n.startswith(tuple(prefixes)) for n in os.listdir("/run/netns")):
            time.sleep(0.1)
        for a in agents:
            a.terminate()
            try:
                a.wait(20)
            except subprocess.TimeoutExpired:
                a.kill()
        for n in os.listdir("/run/netns"):  # pins a node agent left behind
            if n.startswith(tuple(prefixes)):
                subprocess.run(["ip", "netns", "del", n], check=False)
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run([str(SCRIPT), "stop", str(tmp / "k8s")], env=env, check=False)
        for d in cgroup.glob("pod*"):
            d.rmdir()
        cgroup.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
