"""Kubernetes pod-churn fan-out (issue 15): pods on simulated nodes, creates/deletes -> every affected node acked.

The real controller (one uvicorn process, SQLite, as in bench/controller.py) and one client
process simulating the node agents: every pod has its own agent identity and long-poll, exactly as
a real node agent runs one agent runtime per pod (``stockade k8s node-agent``); pod ``i`` lives on
node ``i mod --nodes``. Each simulated pod agent long-polls ``/policy/wait?include_policy=true``
and acknowledges every revision on its next long-poll, as the real agent does (no kernel: the
per-namespace cost is bench/k8s.py's).

Estate (Kubernetes-shaped): namespaces ("apps") of 10 pods, 5 ``role=web`` and 5 ``role=db``, a
ruleset per namespace (web -> db 5432/tcp, intra-namespace), plus one cluster-wide ruleset
(``role=monitor`` -> every pod, 22/tcp; no monitor pod, so it adds rules but no fan-out).

Churn: ``--rate`` pod events per second (creates and deletes alternate, each in a random namespace)
written through the controller API the way the cluster sync writes them: every event gathered while
the previous write was under way as one ``POST /workload-batches`` (``--writes single``: one ``POST
/workloads`` / ``DELETE /workloads/NAME`` per pod, 8 in flight). One event's fan-out is the pods of
the other role in its namespace; an affected pod has acknowledged the event when its long-poll
brings a policy with the address added (create) or gone (delete). A node has acknowledged when all
its affected pods have; timed from just before the API call:

* per event: until every affected node acknowledged (p50 / p99; goal p99 <= 1 s);
* per (event, node): until that node acknowledged.

    python bench/k8s_fanout.py --pods 1000 --nodes 10 --seconds 20     # quick (~1-2 min)
    python bench/k8s_fanout.py                                          # 10,000 pods, 100 nodes, 100 events/s

``--before-src ../main/src --protocol node`` (session 7): before/after side by side, each size run
with both controllers in turn (``--sizes 1000/10,3000/30,10000/100``), one table with the load.

``--protocol node`` (session 6): the node protocol instead (src/stockade/k8s/node_poll.py): pods are
``k8s.*`` workloads bound to their node by the ``k8s-node`` label (as the cluster sync writes them),
each node enrols as an agent and enrols its pods with ``POST /agents/{node}/pods/enroll-batch``, then
ONE long-poll per node (``POST /agents/{node}/pods/updates``) brings every moved pod's update, the
pods' acks ride on the node's next long-poll (one request per round), and the node heartbeats once
per 15 s (its poll is its pods' heartbeat). ``--protocol pod`` is the per-pod protocol (main's bench).
The simulated node mirrors src/stockade/k8s/node_poll.py's NodePoller (session 10: the next
long-poll waits for the answer's applies and carries their acks; here applies are instant, so it
goes at once with them); ``--node-acks separate`` is the poller before that (the next long-poll at
once, the answer's acks as one ``POST .../pods/acks`` beside it); ``--before-node-acks`` sets the
"before" side's nodes in a comparison (default: the same as ``--node-acks``).

Prints the load average: on a shared 2-core machine both processes wait for a core.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controller import APP_SIZE, ENROL_CONCURRENCY, Agent, Conn, _converged, _enrol, _enrol_work, _free_port  # isort: skip
from controller import _issue_codes, _owner_key, _raise_nofile, _setup_policy, cpu_seconds, pct, rss_mib  # isort: skip

CONTROLLER = Path(__file__).resolve().parent / "controller.py"


@dataclass
class Pending:
    """Churn addresses whose arrival (create) or removal (delete) the pod agents are watching for."""

    adds: set[str] = field(default_factory=set)
    dels: set[str] = field(default_factory=set)
    seen: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (addr, kind, pod) -> first seen
    answers: int = 0  # long-polls answered with an update (node protocol: a node's; pod protocol: a pod's)
    polls: int = 0  # node protocol: pods/updates requests answered (with an update or not)
    ack_requests: int = 0  # node protocol: pods/acks requests


def _record(pending: Pending, pod: int, pol: dict[str, Any], now: float) -> None:
    if pol["full"] is not None:
        churn = pending.adds | pending.dels  # (a broad network in the policy is not a churn pod's set member)
        held = {a for net in _NET.findall(json.dumps(pol["full"])) if int(net.rsplit("/", 1)[1]) >= 24
                for a in _covered(net, churn)}
        for addr in pending.adds & held:
            pending.seen.setdefault((addr, "add", pod), now)
        for addr in pending.dels - held:
            pending.seen.setdefault((addr, "del", pod), now)
        return
    for d in pol["set_deltas"]:
        for net in d["added"]:
            for addr in _covered(net, pending.adds):
                pending.seen.setdefault((addr, "add", pod), now)
        for net in d["removed"]:
            for addr in _covered(net, pending.dels):
                pending.seen.setdefault((addr, "del", pod), now)


_NET = re.compile(r'"([0-9]{1,3}(?:\.[0-9]{1,3}){3}/[0-9]{1,2})"')


def _covered(net: str, addrs: set[str]) -> list[str]:
    """The churn addresses ``net`` holds: a set delta may carry two neighbours as one prefix
    (10.200.0.10/31 for .10 and .11), so the network address alone misses the upper one."""
    host, _, length = net.partition("/")
    if length in ("", "32", "128"):
        return [host] if host in addrs else []
    network = ipaddress.ip_network(net, strict=False)
    return [a for a in addrs if ipaddress.ip_address(a) in network]


async def pod_agent(a: Agent, port: int, pending: Pending, stop: asyncio.Event) -> None:
    """One simulated pod agent: long-poll with the policy, acknowledge on the next long-poll."""
    poll = Conn(port)
    base = f"/api/v1/agents/{a.agent_id}"
    next_beat = time.monotonic() + 15.0 * (a.index % 100) / 100
    while not stop.is_set():
        try:
            timeout = max(0.5, min(20.0, next_beat - time.monotonic()))
            query = f"after={a.applied}&applied={a.applied}&timeout={timeout:.1f}&include_policy=true"
            status, got = await poll.request("GET", f"{base}/policy/wait?{query}", a.token)
            if status != 200:
                a.errors += 1
                await asyncio.sleep(1)
                continue
            if got["changed"]:
                pending.answers += 1
                pol = got["policy"]
                if pol["full"] is None and pol["base"] != a.applied:
                    a.errors += 1
                a.applied = pol["revision"]
                _record(pending, a.index, pol, time.perf_counter())
            if time.monotonic() >= next_beat:
                await poll.request("POST", f"{base}/heartbeat", a.token, {})
                next_beat = time.monotonic() + 15.0
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            a.errors += 1
            await asyncio.sleep(0.5)
    poll.close()


async def _enrol_nodes(port: int, key: str, pods: int, nodes: int) -> tuple[list[Agent], list[Agent]]:
    """The node protocol's estate: pod workloads bound to nodes (written as the sync writes them),
    one agent per node, the pods enrolled by their node in batches (with their first policy)."""

    admin = Conn(port)
    apps = max(1, pods // APP_SIZE)

    async def ok(method: str, path: str, body: Any, expect: tuple[int, ...] = (200, 201)) -> Any:
        status, got = await admin.request(method, "/api/v1" + path, key, body)
        assert status in expect, (path, status, got)
        return got

    await ok("POST", "/label-keys", {"name": "k8s-node", "values": []})
    names: list[str] = []
    for chunk in range(0, pods, 500):
        upsert = []
        for i in range(chunk, min(pods, chunk + 500)):
            app, role = (i // APP_SIZE) % apps, "web" if i % 2 else "db"
            names.append(f"k8s.app-{app}.pod-{i:05d}")
            upsert.append({"name": names[-1], "labels": {"app": f"app-{app}", "role": role,
                                                          "k8s-node": f"node-{i % nodes:03d}"},
                           "interfaces": [{"name": "eth0", "addresses": [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}."
                                                                         f"{i & 255}"]}], "mode": "full"})
        await ok("POST", "/workload-batches", {"upsert": upsert, "delete": []})
    await ok("POST", "/pairing-profiles", {"name": "k8s-nodes", "mode": "idle", "code_max_uses": 1_000_000})
    code = (await ok("POST", "/pairing-profiles/k8s-nodes/codes", {}))["code"]
    node_agents, pod_agents = await enrol_simulated_nodes(
        port, code, names, range(nodes), lambda n: f"node-{n:03d}", lambda n: list(range(n, pods, nodes)))
    admin.close()
    return [node_agents[n] for n in range(nodes)], [pod_agents[i] for i in range(pods)]


def churn_pod(counter: int, app: int, role: str) -> tuple[str, str, dict[str, Any] | None]:
    """The churn's ``counter``-th new pod: its name, address (10.200.0.0 up) and workload body."""
    name, addr = f"churn-{counter}", f"10.{200 + (counter >> 16) % 50}.{(counter >> 8) & 255}.{counter & 255}"
    return name, addr, {"name": name, "labels": {"app": f"app-{app}", "role": role},
                        "interfaces": [{"name": "eth0", "addresses": [addr]}], "mode": "full",
                        "description": "bench pod"}


async def enrol_simulated_nodes(port: int, code: str, names: list[str], node_ids: Iterable[int],
                                hostname: Callable[[int], str], pods_of: Callable[[int], list[int]],
                                ) -> tuple[dict[int, Agent], dict[int, Agent]]:
    """Enrol each node (``hostname(n)``) with ``code``, then its pods ``pods_of(n)`` (by ``names``)
    through the node's ``pods/enroll-batch``, 16 at a time: node agents and pod agents by index."""
    from stockade.agent_signature import new_private_key, public_key_text

    node_agents: dict[int, Agent] = {}
    pod_agents: dict[int, Agent] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in node_ids:
        queue.put_nowait(n)

    async def worker() -> None:
        c = Conn(port)
        while not queue.empty():
            n = queue.get_nowait()
            status, got = await c.request("POST", "/api/v1/agents/enroll", body={
                "activation_code": code, "hostname": hostname(n), "interfaces": []})
            assert status == 201, got
            node = node_agents[n] = Agent(n, got["agent_id"], got["token"], got["workload"])
            base = f"/api/v1/agents/{node.agent_id}"
            status, got = await c.request("GET", f"{base}/policy/wait?after=0&timeout=0", node.token)
            node.applied = got["revision"]
            await c.request("POST", f"{base}/ack", node.token, {"revision": node.applied})
            mine = pods_of(n)
            for chunk in range(0, len(mine), 64):
                part = mine[chunk : chunk + 64]
                status, got = await c.request("POST", f"{base}/pods/enroll-batch", node.token, {
                    "pods": [{"workload": names[i], "public_key": public_key_text(new_private_key())} for i in part],
                    "include_policy": True})
                assert status == 200 and not got["refused"], got
                by_name = {e["workload"]: e for e in got["enrolled"]}
                for i in part:
                    e = by_name[names[i]]
                    pod_agents[i] = Agent(i, e["agent_id"], e["token"], e["workload"],
                                          applied=e["policy"]["revision"] if e["policy"] else 0)
        c.close()

    await asyncio.gather(*(worker() for _ in range(16)))
    return node_agents, pod_agents


async def node_poller(node: Agent, pods: list[Agent], port: int, pending: Pending, stop: asyncio.Event,
                      acks_on_poll: bool = True) -> None:
    """One simulated node agent (k8s/node_poll.py): one long-poll for all its pods, each answer's
    acks on the next long-poll (``acks_on_poll``; else as one batch sent while the next long-poll is
    out), a heartbeat every 15 s."""
    poll, side = Conn(port), Conn(port)
    base = f"/api/v1/agents/{node.agent_id}"
    by_id = {p.agent_id: p for p in pods}
    acked: dict[str, int] = {}
    next_beat = time.monotonic() + 15.0 * (node.index % 100) / 100
    side_task: asyncio.Task[Any] | None = None
    carry: list[dict[str, Any]] = []  # the last answer's acks, for the next long-poll

    async def ack(batch: list[dict[str, Any]], beat: bool) -> None:
        if batch:
            pending.ack_requests += 1
            status, _got = await side.request("POST", f"{base}/pods/acks", node.token, {"acks": batch})
            if status != 200:
                node.errors += 1
        if beat:
            await side.request("POST", f"{base}/heartbeat", node.token, {})

    while not stop.is_set():
        try:
            unacked: list[dict[str, Any]] = [{"agent_id": p.agent_id, "revision": p.applied} for p in pods
                       if p.applied and acked.get(p.agent_id) != p.applied]
            first = not acked
            timeout = max(0.5, min(20.0, next_beat - time.monotonic()))
            body = {"pods": [{"agent_id": p.agent_id, "revision": p.applied} for p in pods],
                    "acks": unacked if first else carry, "timeout": round(timeout, 1)}
            if first:
                acked.update({u["agent_id"]: u["revision"] for u in unacked})
            status, got = await poll.request("POST", f"{base}/pods/updates", node.token, body)
            pending.polls += 1
            if status != 200:
                node.errors += 1
                await asyncio.sleep(1)
                continue
            carry = []
            now = time.perf_counter()
            batch = []
            pending.answers += bool(got["pods"])
            for u in got["pods"]:
                p = by_id[u["agent_id"]]
                pol = u["policy"]
                if pol["full"] is None and pol["base"] != p.applied:
                    p.errors += 1
                p.applied = pol["revision"]
                _record(pending, p.index, pol, now)
                batch.append({"agent_id": p.agent_id, "revision": p.applied})
                acked[p.agent_id] = p.applied
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + 15.0
            if acks_on_poll:
                carry, batch = batch, []
            if batch or beat:
                if side_task is not None:
                    await side_task
                side_task = asyncio.create_task(ack(batch, beat))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            node.errors += 1
            await asyncio.sleep(0.5)
    if side_task is not None:
        side_task.cancel()
    poll.close()
    side.close()


@dataclass(frozen=True)
class Event:
    addr: str
    kind: str  # "add" | "del"
    t0: float
    affected: tuple[int, ...]  # pod indexes
    start: float = 0.0  # its batch's API call began
    end: float = 0.0  # ... and was answered


async def run(port: int, password: str, pods: int, nodes: int, rate: float, seconds: float,
              pid: int, batched: bool, protocol: str = "pod", acks_on_poll: bool = True) -> dict[str, Any]:
    admin = Conn(port)
    key = await _owner_key(port, password)
    t = time.perf_counter()
    await _setup_policy(admin, key, pods)
    pending, stop = Pending(), asyncio.Event()
    if protocol == "node":
        node_agents, agents = await _enrol_nodes(port, key, pods, nodes)
        tasks = [asyncio.create_task(node_poller(n, agents[n.index::nodes], port, pending, stop, acks_on_poll))
                 for n in node_agents]
        expected = pods + nodes
    else:
        agents = []
        await _enrol([port], _enrol_work(await _issue_codes(port, key, pods), pods), ENROL_CONCURRENCY, agents.append)
        agents.sort(key=lambda a: a.index)
        node_agents = []
        tasks = [asyncio.create_task(pod_agent(a, port, pending, stop)) for a in agents]
        expected = pods
    setup_s = time.perf_counter() - t
    await _converged(admin, key, expected, 900)
    converged_s = time.perf_counter() - t
    apps = max(1, pods // APP_SIZE)
    # pod i: app (i // APP_SIZE) % apps, role web when i is odd (bench/controller.py's _enrol)
    by_app_role: dict[tuple[int, str], list[int]] = {}
    for a in agents:
        by_app_role.setdefault(((a.index // APP_SIZE) % apps, "web" if a.index % 2 else "db"), []).append(a.index)
    rng = random.Random(15)
    events: list[Event] = []
    live: list[tuple[str, str, int, str]] = []  # (name, addr, app, role) of churn pods the controller has
    queued: list[tuple[str, dict[str, Any] | None, str, int, str, float]] = []  # name, body, addr, app, role, t0
    api_ms: list[float] = []
    calls = 0
    counter = 0
    cpu0 = cpu_seconds([pid])
    answers0, polls0, ack_requests0 = pending.answers, pending.polls, pending.ack_requests
    print(f"churn starts (setup {setup_s:.0f} s, converged {converged_s:.0f} s)", file=sys.stderr, flush=True)

    def make_event(i: int) -> None:
        """The pod event of step ``i`` (the API server's): a create, or a delete of a created pod."""
        nonlocal counter
        if i % 2 == 0 or not live:
            counter += 1
            app, role = rng.randrange(apps), rng.choice(("web", "db"))
            name, addr, body = churn_pod(counter, app, role)
            pending.adds.add(addr)
        else:
            name, addr, app, role = live.pop(0)
            body = None
            pending.dels.add(addr)
        queued.append((name, body, addr, app, role, time.perf_counter()))

    def done(batch: list[tuple[str, dict[str, Any] | None, str, int, str, float]], start: float, end: float) -> None:
        for name, body, addr, app, role, t0 in batch:
            other = "db" if role == "web" else "web"
            events.append(Event(addr, "add" if body else "del", t0, tuple(by_app_role.get((app, other), ())),
                                start, end))
            if body is not None:
                live.append((name, addr, app, role))  # deletable once the controller has it

    async def write(conn: Conn, batch: list[tuple[str, dict[str, Any] | None, str, int, str, float]]) -> None:
        nonlocal calls
        t = time.perf_counter()
        if len(batch) == 1 or not batched:
            name, body, *_ = batch[0]
            method, path = ("POST", "/api/v1/workloads") if body else ("DELETE", f"/api/v1/workloads/{name}")
            status, got = await conn.request(method, path, key, body)
        else:
            status, got = await conn.request("POST", "/api/v1/workload-batches", key, {
                "upsert": [b for _n, b, *_ in batch if b], "delete": [n for n, b, *_ in batch if not b]})
        assert status in (200, 201, 204), (status, got)
        calls += 1
        end = time.perf_counter()
        api_ms.append((end - t) * 1000)
        done(batch, t, end)

    async def sync_worker(conn: Conn, stop_when_empty: asyncio.Event) -> None:
        """As the cluster sync does: take every change gathered so far, write it, repeat."""
        while not (stop_when_empty.is_set() and not queued):
            if not queued:
                await asyncio.sleep(0.002)
                continue
            if batched:
                batch = queued[:1000]
                del queued[:1000]
            else:
                batch = [queued.pop(0)]
            await write(conn, batch)

    produced = asyncio.Event()
    workers = [asyncio.create_task(sync_worker(Conn(port), produced)) for _ in range(1 if batched else 8)]
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        due = started + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        make_event(i)
        i += 1
    produced.set()
    await asyncio.gather(*workers)
    churn_s = time.perf_counter() - started
    deadline = time.monotonic() + 60
    node_lat: list[float] = []
    event_lat: list[float] = []
    missing = 0
    while time.monotonic() < deadline:
        if all((e.addr, e.kind, p) in pending.seen for e in events for p in e.affected):
            break
        await asyncio.sleep(0.2)
    fan: list[int] = []
    queued_lat: list[float] = []  # event -> its batch's API call began
    call_lat: list[float] = []  # the API call
    deliver_lat: list[float] = []  # API call answered -> every affected node acked
    for e in events:
        per_node: dict[int, float] = {}
        ok = True
        for p in e.affected:
            seen = pending.seen.get((e.addr, e.kind, p))
            if seen is None:
                ok = False
                continue
            per_node[p % nodes] = max(per_node.get(p % nodes, 0.0), seen - e.t0)
        if not ok:
            missing += 1
            continue
        fan.append(len(per_node))
        node_lat += per_node.values()
        if per_node:
            event_lat.append(max(per_node.values()))
            queued_lat.append(e.start - e.t0)
            call_lat.append(e.end - e.start)
            deliver_lat.append(max(per_node.values()) - (e.end - e.t0))
    cpu = cpu_seconds([pid]) - cpu0
    answers = pending.answers - answers0
    polls, ack_requests = pending.polls - polls0, pending.ack_requests - ack_requests0
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    admin.close()
    return {
        "pods": pods, "nodes": nodes, "protocol": protocol, "setup_s": setup_s, "converged_s": converged_s,
        "events": len(events), "rate": len(events) / churn_s,
        "event_p50_ms": 1000 * pct(event_lat, 50), "event_p99_ms": 1000 * pct(event_lat, 99),
        "event_max_ms": 1000 * max(event_lat, default=float("nan")),
        "queued_p50_ms": 1000 * pct(queued_lat, 50), "queued_p99_ms": 1000 * pct(queued_lat, 99),
        "call_p50_ms": 1000 * pct(call_lat, 50), "call_p99_ms": 1000 * pct(call_lat, 99),
        "deliver_p50_ms": 1000 * pct(deliver_lat, 50), "deliver_p99_ms": 1000 * pct(deliver_lat, 99),
        "node_p50_ms": 1000 * pct(node_lat, 50), "node_p99_ms": 1000 * pct(node_lat, 99),
        "api_p50_ms": pct(api_ms, 50), "api_p99_ms": pct(api_ms, 99), "calls": calls,
        "writes": "batch" if batched else "single",
        "fanout_nodes": sum(fan) / max(1, len(fan)), "missing": missing,
        "controller_cpu_pct": 100 * cpu / churn_s, "controller_rss_mib": rss_mib(pid),
        "node_answers": answers, "cpu_ms_per_answer": 1000 * cpu / max(1, answers),
        "node_polls": polls, "node_ack_requests": ack_requests,
        "requests_per_answer": (polls + ack_requests) / max(1, answers),
        "agent_errors": sum(a.errors for a in agents + node_agents), "load": os.getloadavg()[0],
    }


def controller_ready(server: subprocess.Popen[str], port: int) -> dict[str, Any]:
    """The credential the bench controller prints first, once its port accepts connections."""
    assert server.stdout is not None
    cred: dict[str, Any] = json.loads(server.stdout.readline())
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return cred


def _serve_and_run(args: argparse.Namespace, pods: int, nodes: int, src: str | None,
                   node_acks: str | None = None) -> dict[str, Any]:
    """One controller (``src``: the ``src`` folder of another checkout to run it from, e.g. main's,
    for a before/after comparison; None: this one) and one churn run against it."""
    tmp = Path(tempfile.mkdtemp(prefix="stockade-fanout-"))
    port = _free_port()
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    server = subprocess.Popen([sys.executable, str(CONTROLLER), "--serve", f"sqlite:///{tmp / 'stockade.db'}",
                               str(port)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        cred = controller_ready(server, port)
        import uvloop

        return uvloop.run(run(port, cred["password"], pods, nodes, args.rate, args.seconds, server.pid,
                              args.writes == "batch", args.protocol, (node_acks or args.node_acks) == "poll"))
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _compare(args: argparse.Namespace) -> None:
    """Before (``--before-src``) and after (this checkout) at each size, interleaved, one table."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    sizes = [tuple(int(x) for x in s.split("/")) for s in args.sizes.split(",")]
    for pods, nodes in sizes:
        for label, src, acks in (("before", args.before_src, args.before_node_acks or args.node_acks),
                                 ("after", None, args.node_acks)):
            load0 = os.getloadavg()[0]
            r = _serve_and_run(args, pods, nodes, src, acks)
            r["node_acks"] = acks
            r["load0"] = load0
            print(json.dumps({"variant": label, **r}), flush=True)
            rows.append((f"{pods:,} pods / {nodes} nodes", label, r))
    print()
    print(f"| {args.protocol} protocol, {args.rate:.0f} events/s asked, {args.seconds:.0f} s | code | events/s | "
          "event -> every affected node acked, p50 / p99 / max ms | waiting for the write / the write call / "
          "call answered -> all acked, p50 ms | batch API call p50 / p99 ms | calls | node answers | node polls + "
          "ack requests, per answer | controller CPU, ms CPU per node answer | load at start / end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, label, r in rows:
        print(f"| {size} | {label} ({r['node_acks']} acks) | {r['rate']:.0f} | "
              f"{r['event_p50_ms']:,.0f} / {r['event_p99_ms']:,.0f} / "
              f"{r['event_max_ms']:,.0f} | {r['queued_p50_ms']:,.0f} / {r['call_p50_ms']:,.0f} / "
              f"{r['deliver_p50_ms']:,.0f} | {r['api_p50_ms']:,.0f} / {r['api_p99_ms']:,.0f} | {r['calls']} | "
              f"{r['node_answers']:,} | {r['node_polls']:,} + {r['node_ack_requests']:,}, "
              f"{r['requests_per_answer']:.2f} | {r['controller_cpu_pct']:.0f} %, {r['cpu_ms_per_answer']:.2f} | "
              f"{r['load0']:.1f} / {r['load']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--rate", type=float, default=100.0, help="pod events per second (creates and deletes alternate)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the churn runs")
    ap.add_argument("--writes", choices=("batch", "single"), default="batch",
                    help="batch: one POST /workload-batches of every event gathered meanwhile (the sync's way); "
                         "single: one call per event, 8 in flight")
    ap.add_argument("--protocol", choices=("pod", "node"), default="pod",
                    help="pod: one long-poll, ack and heartbeat per pod (main); node: one long-poll, ack batch and "
                         "heartbeat per node (session 6)")
    ap.add_argument("--node-acks", choices=("poll", "separate"), default="poll",
                    help="node protocol: a simulated node's acks ride on its next long-poll (node_poll.py since "
                         "session 10) or go as a pods/acks request beside it (before)")
    ap.add_argument("--before-node-acks", choices=("poll", "separate"),
                    help="compare: --node-acks of the 'before' side (default: the same as --node-acks)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--before-src", help="compare: the src folder of another checkout (e.g. main's) run as "
                    "'before', interleaved with this one at each of --sizes")
    ap.add_argument("--sizes", default="1000/10,3000/30,10000/100", help="with --before-src: PODS/NODES,...")
    args = ap.parse_args()
    _raise_nofile()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if args.before_src:
        _compare(args)
        return
    r = _serve_and_run(args, args.pods, args.nodes, None)
    print(json.dumps(r), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=1))
    print()
    print(f"| pod churn, {r['pods']:,} pods on {r['nodes']} simulated nodes, {r['protocol']} protocol | value |")
    print("|---|---|")
    print(f"| events (creates + deletes) / achieved rate | {r['events']} / {r['rate']:.0f} per s |")
    print(f"| API event -> every affected node acknowledged, p50 / p99 / max | "
          f"{r['event_p50_ms']:.0f} / {r['event_p99_ms']:.0f} / {r['event_max_ms']:.0f} ms |")
    print(f"| of which: waiting for the write / the write call / call answered -> all acked, p50 / p99 | "
          f"{r['queued_p50_ms']:.0f} / {r['queued_p99_ms']:.0f}, {r['call_p50_ms']:.0f} / {r['call_p99_ms']:.0f}, "
          f"{r['deliver_p50_ms']:.0f} / {r['deliver_p99_ms']:.0f} ms |")
    print(f"| API event -> one affected node acknowledged, p50 / p99 | "
          f"{r['node_p50_ms']:.0f} / {r['node_p99_ms']:.0f} ms |")
    print(f"| affected nodes per event (mean) | {r['fanout_nodes']:.1f} |")
    print(f"| controller writes ({r['writes']}): calls, API call p50 / p99 | {r['calls']}, "
          f"{r['api_p50_ms']:.0f} / {r['api_p99_ms']:.0f} ms |")
    print(f"| controller CPU during churn / RSS | {r['controller_cpu_pct']:.0f} % / "
          f"{r['controller_rss_mib']:.0f} MiB |")
    print(f"| node long-polls answered / controller CPU per answer (its batch writes included) | "
          f"{r['node_answers']:,} / {r['cpu_ms_per_answer']:.2f} ms |")
    print(f"| node requests ({args.node_acks} acks): polls + ack requests, per answer | {r['node_polls']:,} + "
          f"{r['node_ack_requests']:,}, {r['requests_per_answer']:.2f} |")
    print(f"| events not acknowledged by every affected pod within 60 s / agent errors | "
          f"{r['missing']} / {r['agent_errors']} |")
    print(f"| setup (policy + {r['pods']:,} pod agents enrolled) / every agent converged | {r['setup_s']:.0f} s / "
          f"{r['converged_s']:.0f} s |")
    print(f"| load average at the end | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
