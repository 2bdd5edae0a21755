"""Controller benchmark: simulated agents hold the policy long-poll; relabel -> time until all acked.

One controller process (uvicorn + uvloop, plain HTTP on 127.0.0.1) and one client process with
N simulated agents (asyncio, a minimal keep-alive HTTP/1.1 client per agent, no kernel). Each
agent enrols with an activation code (in its runner process, long-polling right after its own
enrolment, as a real agent does), then loops on one request per policy change: the long-poll
``/policy/wait?include_policy=true&applied=REV`` (20 s, the real agent's default) answers with the
delta since the agent's applied revision, and the next long-poll acknowledges it (``applied=``);
heartbeats every ``--heartbeat`` s, or every 300 s once the controller says a long-poll counts as
a heartbeat (as the real agent does). Convergence is read from the controller (``/convergence``),
so a scenario ends only when the controller has recorded every acknowledgement.

Estate: apps of 10 workloads (5 ``role=web``, 5 ``role=db``), one ruleset per app (web -> db on
5432/tcp, intra-scope), and one global ruleset (``role=monitor`` -> every workload on 22/tcp).
Scenarios, each repeated ``--repeats`` times, timed from just before the API call until every
affected agent has fetched and acknowledged the new revision:

* ``relabel-app``: one workload flips web <-> db inside its app (fan-out: its app, ~10 hosts);
* ``relabel-global``: one workload becomes / stops being ``role=monitor`` (fan-out: every host).

Also measured under the full long-poll + heartbeat load: API latency of ``GET /workloads`` and
``GET /convergence``. Runs on SQLite and on a throwaway PostgreSQL cluster (Debian binaries
under /usr/lib/postgresql/*/bin; skipped with a note if absent) and prints rows side by side.

The simulated agents (client, long-poll loop, enrolment, runner processes) are in
``bench/controller_agents.py``.

Replicas (``--replicas 1 3``, PostgreSQL only): that many controller processes on one database;
agent ``i`` enrols on and long-polls replica ``i mod N`` while every change is made through the
first, so a change reaches two thirds of the agents through the change log (LISTEN/NOTIFY). Also
reported: controller CPU-seconds (all replicas, user + system) per 1,000 agents per global
change, and each replica's RSS at the end.

``--sign``: the simulated agents enrol with an Ed25519 key each and prove every request as the real
agent does: once a signed request was accepted, a signed request opens a request session, later
ones carry its MAC (``stockade.agent_session``), a refused one is signed again (``--no-sessions``:
each request signed, ``stockade.agent_signature``, one Ed25519 verification per request); without
``--sign`` they authenticate with their token alone (the controller still accepts agents enrolled
without a key), as in every row before session 12.

    python bench/controller.py --agents 1000 5000 --backends sqlite postgresql
    python bench/controller.py --agents 5000 --backends postgresql --replicas 1 3

Measured on the 2-core machine (shared with other work; ms from the API call until each
affected agent acknowledged; app = relabel inside one app, glob = relabel of the global role)::

    backend     agents  enrol s  app p50  app p99   fan  glob p50  glob p99   fan  api p50  api p99  errs
    sqlite        1000      9.7        6       16    10       257       577  1000      2.3      8.4     0
    postgresql    1000     12.9       16       18    10       221       559  1000      3.4     11.1     0
    sqlite        5000     35.4        9       18    10       735      1571  5000      5.7     10.7     0
    postgresql    5000     49.5       11       19    10      1537      2022  5000      5.9     19.0     0
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the simulated agents; re-exported for the other benches that use them (k8s_fanout, k8s_netpol_convergence)
from controller_agents import (  # noqa: F401
    AGENTS_PER_RUNNER,
    ENROL_CONCURRENCY,
    LONG_POLL_S,
    STATE_REPORT_S,
    Agent,
    Conn,
    Runners,
    _enrol,
    _raise_nofile,
    _runner,
    agent_loop,
)
from controller_measure import (
    cpu_seconds,
    own_cpu,
    pct,
    profilers,
    read_collections,
    record_collections,
    rss_mib,
    stop_profilers,
)

# what the other benches use (k8s_fanout, k8s_fanout_real, k8s_netpol_convergence, flows, replica_work)
__all__ = ["APP_SIZE", "ENROL_CONCURRENCY", "Agent", "Conn", "PgCluster", "_converged", "_enrol", "_enrol_work",
           "_free_port", "_issue_codes",
           "_owner_key", "_raise_nofile", "_setup_policy", "agent_loop", "cpu_seconds", "pct", "policy_yaml",
           "rss_mib"]

APP_SIZE = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- server ------------------------------------------------------------------------------------


def serve(database_url: str, port: int, switch_interval: float | None = None) -> None:
    """Run the controller in this process (the ``--serve`` mode of this script)."""
    _raise_nofile()
    if os.environ.get("STOCKADE_BENCH_GC_GEN0"):  # --gc-gen0: an A/B of the young generation's threshold
        import gc

        from stockade.controller import app as app_module

        gen0 = int(os.environ["STOCKADE_BENCH_GC_GEN0"])
        gc.set_threshold(gen0, *gc.get_threshold()[1:])  # (a tree whose controller keeps the process's)
        app_module.YOUNG_COLLECTION_AFTER = gen0  # (a tree that sets its own)
    if os.environ.get("STOCKADE_BENCH_GC_FILE"):
        record_collections(Path(os.environ["STOCKADE_BENCH_GC_FILE"]))
    if switch_interval is not None:  # --switch-interval: for an A/B of the GIL hand-over interval
        sys.setswitchinterval(switch_interval)
    import uvicorn

    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.services.auth import Argon2Params

    settings = ControllerSettings(
        database_url=database_url,
        secure_cookies=False,
        login_limit=(10_000, 60.0),
        enroll_limit=(1_000_000, 60.0),
        long_poll_max=300.0,
        flush_interval=0.5,  # acks reach the database (and so every replica's /convergence) sooner
        argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1),
    )
    app = create_app(settings)
    cred = app.state.controller.first_run_credential  # None on a replica joining an existing database
    print(json.dumps({"user": cred[0], "password": cred[1]} if cred else {}), flush=True)
    # as `stockade controller serve` runs it (cli/controller_cmds.py): no uvicorn proxy-header layer
    # (the app's --trusted-proxy decides) and no uvicorn access line formatted per request
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=8192, timeout_keep_alive=600,
                loop="uvloop", http="httptools", proxy_headers=False, access_log=False)


class PgCluster:
    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        self.bindir = Path(found[-1]).parent
        user = pwd.getpwnam("postgres")
        self.root = Path(tempfile.mkdtemp(prefix="stockade-bench-pg-"))
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.run = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.port = _free_port()
        data = self.root / "data"
        subprocess.run([*self.run, str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True)
        # synchronous_commit=off matches SQLite's WAL + synchronous=NORMAL: crash-safe, no fsync per commit
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200 " \
               "-c shared_buffers=256MB -c synchronous_commit=off"
        subprocess.run([*self.run, str(self.bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                        "-l", str(self.root / "log"), "-w", "start"], check=True, capture_output=True)
        self.data = data

    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pids(self) -> list[int]:
        """The postmaster and its children now (the connection pools keep their backends)."""
        main = int((self.data / "postmaster.pid").read_text().split()[0])
        kids = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
        return [main, *map(int, kids)]

    def stop(self) -> None:
        subprocess.run([*self.run, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def policy_yaml(apps: int) -> bytes:
    """The bench's estate as one policy document: web -> db on 5432/tcp inside each of ``apps``
    apps, and the global ``role=monitor`` -> every workload on 22/tcp (shared by bench/replica_work.py)."""
    docs = ["apiVersion: stockade.io/v1\nkind: Service\nname: pg\nports: [5432/tcp]\n",
            "apiVersion: stockade.io/v1\nkind: Service\nname: ssh\nports: [22/tcp]\n"]
    docs += [f"apiVersion: stockade.io/v1\nkind: Ruleset\nname: app-{k}\nscope:\n- labels: {{app: app-{k}}}\n"
             "rules:\n- consumers:\n  - labels: {role: web}\n  providers:\n  - labels: {role: db}\n"
             "  services: [pg]\n" for k in range(apps)]
    docs.append("apiVersion: stockade.io/v1\nkind: Ruleset\nname: monitoring\nscope: all\nrules:\n"
                "- consumers:\n  - labels: {role: monitor}\n  providers: all\n  services: [ssh]\n"
                "  consumers_scope: global\n")
    return "".join("---\n" + d for d in docs).encode()


async def run_bench(ports: list[int], password: str, n_agents: int, repeats: int, heartbeat: float,
                    pids: list[int], profile: str | None = None,
                    db_pids: Callable[[], list[int]] = list, sign: bool = False,
                    gc_files: list[Path] | None = None, sessions: bool = True) -> dict[str, Any]:
    port = ports[0]  # every change is made through the first replica
    admin = Conn(port)
    key = await _owner_key(port, password)
    t_setup = time.perf_counter()
    await _setup_policy(admin, key, n_agents)
    codes = await _issue_codes(port, key, n_agents)
    setup_s = time.perf_counter() - t_setup  # not in enrol_s (session 5's enrol_s included issuing the codes)
    print(f"set up in {setup_s:.0f} s", file=sys.stderr, flush=True)
    spies = profilers(pids, profile, "enrol")
    t_enrol, cpu_enrol, client_enrol = time.perf_counter(), cpu_seconds(pids), own_cpu()
    runners = Runners()  # each agent long-polls from its own enrolment on, as a real agent does
    agents = await runners.enrol(_enrol_work(codes, n_agents), ports, heartbeat, sign, sessions)
    enrol_s = time.perf_counter() - t_enrol
    stop_profilers(spies)
    enrol_cpu, enrol_client = cpu_seconds(pids) - cpu_enrol, own_cpu() - client_enrol
    enrol_client += cpu_seconds(runners.pids())
    t_conv = time.perf_counter()
    await _converged(admin, key, n_agents, max(600, n_agents / 20))
    first_convergence_s = time.perf_counter() - t_conv

    def client_cpu() -> float:  # this process and the agents' processes
        return own_cpu() + cpu_seconds(runners.pids())

    results: dict[str, Any] = {"agents": n_agents, "enrol_s": enrol_s, "replicas": len(ports), "setup_s": setup_s,
                               "enrol_cpu_s": enrol_cpu, "enrol_client_cpu_s": enrol_client,
                               "first_convergence_s": first_convergence_s}
    print(f"enrolled in {enrol_s:.0f} s and converged", file=sys.stderr, flush=True)
    for scenario in ("relabel-app", "relabel-global"):
        print(f"{scenario}, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)  # let the previous scenario's stragglers settle before the CPU clock starts
        spies = profilers(pids, profile, scenario)
        gc0 = [read_collections(f) for f in gc_files or ()]
        cpu0, changes, client0, wall0 = cpu_seconds(pids), 0, client_cpu(), time.perf_counter()
        latencies: list[float] = []
        fanouts: list[int] = []
        per_repeat_max: list[float] = []
        # where the time goes: the write call, and each replica's agents (agent i polls replica i mod N)
        put_ms: list[float] = []
        by_replica: list[list[float]] = [[] for _ in ports]
        firsts: list[list[float]] = [[] for _ in ports]
        db_cpu = 0.0
        for r in range(repeats):
            target = agents[(7 * r + 3) % n_agents]
            status, wl = await admin.request("GET", f"/api/v1/workloads/{target.workload}", key)
            labels = dict(wl["body"]["labels"])
            if scenario == "relabel-app":
                labels["role"] = "db" if labels["role"] == "web" else "web"
            else:
                labels["role"] = "monitor" if labels["role"] != "monitor" else "web"
            before, _errors = await runners.state(0.0)
            db0, dbp = cpu_seconds(db_pids()), db_pids()
            t0 = time.perf_counter()
            status, _ = await admin.request("PUT", f"/api/v1/workloads/{target.workload}", key,
                                            {**wl["body"], "labels": labels})
            assert status == 200, status
            put_ms.append(1000 * (time.perf_counter() - t0))
            changes += 1
            await _converged(admin, key, n_agents, max(120, n_agents / 50))
            after, _errors = await runners.state(t0)
            moved = [i for i, (applied, _t) in after.items() if applied != before[i][0]]
            fanouts.append(len(moved))
            this = [cast(float, after[i][1]) - t0 for i in moved]
            latencies += this
            per_repeat_max.append(round(1000 * max(this, default=0.0)))
            db_cpu += cpu_seconds(dbp) - db0
            for k in range(len(ports)):
                mine = [cast(float, after[i][1]) - t0 for i in moved if i % len(ports) == k]
                by_replica[k] += mine
                if mine:
                    firsts[k].append(min(mine))
            if scenario == "relabel-global":  # put it back so the next repeat flips again
                status, _ = await admin.request("PUT", f"/api/v1/workloads/{target.workload}", key,
                                                {**wl["body"]})
                changes += 1
                await _converged(admin, key, n_agents, max(120, n_agents / 50))
        cpu = cpu_seconds(pids) - cpu0  # includes the idle load (heartbeats, long-poll renewals)
        gc1 = [read_collections(f) for f in gc_files or ()]
        client, wall = client_cpu() - client0, time.perf_counter() - wall0
        stop_profilers(spies)
        results[scenario] = {
            "cpu_s_per_1k_agents_per_change": cpu / max(1, changes) / (n_agents / 1000),
            # the simulated agents' own process on the same cores: its CPU per 1k agents per change,
            # and its share of the CPU both used (controller replicas + this process) in the scenario
            "client_cpu_s_per_1k_agents_per_change": client / max(1, changes) / (n_agents / 1000),
            "client_share": client / max(1e-9, client + cpu),
            "wall_s": wall,
            "p50_ms": 1000 * pct(latencies, 50),
            "p90_ms": 1000 * pct(latencies, 90),
            "p99_ms": 1000 * pct(latencies, 99),
            "max_per_repeat_ms": per_repeat_max,
            "max_ms": 1000 * max(latencies) if latencies else float("nan"),
            "fanout": statistics.mean(fanouts) if fanouts else 0,
            "put_p50_ms": pct(put_ms, 50),
            # per replica (the first makes every change): its agents' first ack p50, and their p50 / p99
            "replica_ms": [[round(1000 * pct(f, 50)), round(1000 * pct(b, 50)), round(1000 * pct(b, 99))]
                           for f, b in zip(firsts, by_replica, strict=True)],
            # PostgreSQL's CPU from the write call until every agent acked (not in cpu/1k), per change
            "db_cpu_s_per_change": db_cpu / max(1, len(put_ms)),
            # each replica's full collections in the scenario: count, ms in all, longest (the end's
            # longest is the whole run's: a scenario's own shows when it is above the start's)
            # (and the CPU they took: the rest of "ms in all" is the process waiting for a core)
            "full_gc": [[b[2][0] - a[2][0], round(1000 * (b[2][1] - a[2][1])), round(1000 * b[2][2]),
                         round(1000 * (b[2][3] - a[2][3]))] for a, b in zip(gc0, gc1, strict=True)],
            "young_gc": [[sum(b[g][0] - a[g][0] for g in (0, 1)),
                          round(1000 * sum(b[g][1] - a[g][1] for g in (0, 1))),
                          round(1000 * max(b[g][2] for g in (0, 1))),
                          round(1000 * sum(b[g][3] - a[g][3] for g in (0, 1)))]
                         for a, b in zip(gc0, gc1, strict=True)],
        }
    # API latency under load (agents keep polling and heartbeating)
    api_lat: list[float] = []
    for i in range(60):
        t = time.perf_counter()
        path = "/api/v1/workloads?limit=50" if i % 2 else "/api/v1/convergence"
        status, _ = await admin.request("GET", path, key)
        assert status == 200
        api_lat.append(time.perf_counter() - t)
    results["api_p50_ms"] = 1000 * pct(api_lat, 50)
    results["api_p99_ms"] = 1000 * pct(api_lat, 99)
    results["rss_mib"] = [round(rss_mib(pid)) for pid in pids]
    _state, results["agent_errors"] = await runners.state(time.perf_counter())
    await runners.stop()
    admin.close()
    return results


async def _owner_key(port: int, password: str) -> str:
    # the tiny client keeps no cookies: log in and read Set-Cookie by hand
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"username": "admin", "password": password}).encode()
    writer.write(b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    cookie = ""
    await reader.readuntil(b"\r\n")
    length = 0
    while True:
        line = (await reader.readuntil(b"\r\n")).decode()
        if line == "\r\n":
            break
        name, _, value = line.partition(":")
        if name.lower() == "set-cookie":
            cookie = value.strip().split(";")[0]
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    body = json.dumps({"name": "bench", "role": "owner"}).encode()
    origin = f"http://127.0.0.1:{port}"  # a cookie-authenticated write names its origin (CSRF check)
    writer.write(f"POST /api/v1/api-keys HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}\r\n".encode()
                 + b"Content-Type: application/json\r\n"
                 + f"Cookie: {cookie}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await reader.readuntil(b"\r\n")
    while True:
        line = (await reader.readuntil(b"\r\n")).decode()
        if line == "\r\n":
            break
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    data = json.loads(await reader.readexactly(length))
    writer.close()
    assert "key" in data, data
    return str(data["key"])


async def _parallel(port: int, items: list[Any], fn: Any, workers: int = 16) -> None:
    """``await fn(conn, item)`` for every item, ``workers`` keep-alive connections at once (the
    setup of 25,000 agents is ~12,500 writes: one at a time they took longer than the run)."""
    queue = list(reversed(items))

    async def worker() -> None:
        c = Conn(port)
        while queue:
            await fn(c, queue.pop())
        c.close()

    await asyncio.gather(*(worker() for _ in range(workers)))


async def _setup_policy(c: Conn, key: str, n: int) -> None:
    async def ok(conn: Conn, method: str, path: str, body: Any, expect: int = 201) -> None:
        status, got = await conn.request(method, "/api/v1" + path, key, body)
        assert status == expect, (path, status, got)

    await ok(c, "POST", "/label-keys", {"name": "tier", "values": []})
    apps = max(1, n // APP_SIZE)
    # the policy in one draft import: rulesets created one by one each validate the whole draft
    # (2,500 of them took longer than the rest of a 25,000-agent run)
    status, got = await c.request("PUT", "/api/v1/policy/draft", key, raw=("application/yaml", policy_yaml(apps)))
    assert status == 200, (status, got)
    await ok(c, "POST", "/policy/provision", {"message": "bench"})

    async def profile(conn: Conn, name: tuple[int, str]) -> None:
        k, role = name
        await ok(conn, "POST", "/pairing-profiles", {"name": f"app-{k}-{role}", "mode": "full",
                                                     "labels": {"app": f"app-{k}", "role": role},
                                                     "code_max_uses": 1_000_000})  # one code per profile

    await _parallel(c.port, [(k, role) for k in range(apps) for role in ("web", "db")], profile)


async def _issue_codes(port: int, key: str, n: int) -> dict[str, str]:
    """One activation code per pairing profile (the operator's part, before the agents enrol)."""
    codes: dict[str, str] = {}

    async def code(conn: Conn, prof: str) -> None:
        status, got = await conn.request("POST", f"/api/v1/pairing-profiles/{prof}/codes", key, {})
        assert status == 201, got
        codes[prof] = got["code"]

    profiles = sorted({f"app-{(i // APP_SIZE) % max(1, n // APP_SIZE)}-{'web' if i % 2 else 'db'}" for i in range(n)})
    await _parallel(port, profiles, code)
    return codes


def _enrol_work(codes: dict[str, str], n: int) -> list[list[Any]]:
    """[index, activation code, hostname, address] of every simulated agent."""
    work: list[list[Any]] = []
    for i in range(n):
        prof = f"app-{(i // APP_SIZE) % max(1, n // APP_SIZE)}-{'web' if i % 2 else 'db'}"
        work.append([i, codes[prof], f"h-{i:05d}", f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"])
    return work


async def _converged(c: Conn, key: str, n: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    got: Any = None
    while time.monotonic() < deadline:
        status, got = await c.request("GET", "/api/v1/convergence?limit=5", key)
        if status == 200 and got["agents"] == n and got["lagging_count"] == 0:
            return
        # /convergence walks every agent: polled every 20 ms at 25,000 agents it would be a load of
        # its own on the first replica (latencies are the agents' own ack times, not this poll's)
        await asyncio.sleep(max(0.02, n / 50_000))
    raise TimeoutError(f"agents did not converge in {limit} s: {got}")


def run_one(backend: str, n_agents: int, repeats: int, heartbeat: float, replicas: int = 1,
            profile: str | None = None, switch_interval: float | None = None, sign: bool = False,
            src: str | None = None, gen0: int | None = None, sessions: bool = True) -> dict[str, Any]:
    """One configuration; ``src``: the controllers run this tree's ``src`` (a before-tree), else ours."""
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    pg: PgCluster | None = None
    if backend == "sqlite":
        if replicas != 1:
            raise RuntimeError("SQLite runs one controller process")
        url = f"sqlite:///{tmp / 'stockade.db'}"
    else:
        pg = PgCluster()
        url = pg.url()
    ports = [_free_port() for _ in range(replicas)]
    servers: list[subprocess.Popen[str]] = []
    try:
        cred: dict[str, str] = {}
        for port in ports:  # the first migrates and makes the owner, the others join
            extra = [] if switch_interval is None else [str(switch_interval)]
            env = {**os.environ, "STOCKADE_BENCH_GC_FILE": str(tmp / f"gc-{port}.json"),
                   **({"PYTHONPATH": src} if src else {}), **({"STOCKADE_BENCH_GC_GEN0": str(gen0)} if gen0 else {})}
            server = subprocess.Popen([sys.executable, __file__, "--serve", url, str(port), *extra],
                                      stdout=subprocess.PIPE, text=True, env=env)
            servers.append(server)
            assert server.stdout is not None
            cred = cred or json.loads(server.stdout.readline())
            if server is not servers[0]:
                server.stdout.readline()
            up = time.monotonic() + 300  # a replica starts in seconds, or in a minute on a loaded machine
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > up:
                        raise
                    time.sleep(0.05)
        import uvloop

        result = uvloop.run(run_bench(ports, cred["password"], n_agents, repeats, heartbeat,
                                      [s.pid for s in servers], profile, pg.pids if pg else list, sign,
                                      [tmp / f"gc-{port}.json" for port in ports], sessions))
        result["backend"] = backend
        return result
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) == 5 else None)
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--agents-runner":
        import uvloop

        uvloop.run(_runner(float(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--heartbeat", type=float, default=15.0)
    p.add_argument("--replicas", type=int, nargs="+", default=[1],
                   help="controller processes on one PostgreSQL database (SQLite: 1 only)")
    p.add_argument("--gc-gen0", type=int, nargs="+", default=[None], metavar="N",
                   help="the replicas' young-generation collection threshold (default: the controller's); "
                        "several: A/B rows")
    p.add_argument("--switch-interval", type=float, nargs="+", default=[None], metavar="S",
                   help="the replicas' sys.setswitchinterval (default: Python's 5 ms); several: A/B rows")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy every replica during each scenario; collapsed stacks written under DIR")
    p.add_argument("--before-src", metavar="DIR",
                   help="also run every configuration with the controllers on this tree's src (e.g. a "
                        "worktree of main), first, for a side-by-side table (the agents are this bench's)")
    p.add_argument("--sign", action="store_true",
                   help="agents enrol with an Ed25519 key and sign every request, as the real agent does "
                        "(the controller verifies each signature; without it they use the token alone)")
    p.add_argument("--this-first", action="store_true",
                   help="with --before-src: run this tree first (the second side of a pair tends to run on a warmer, "
                        "busier machine: run a pair both ways)")
    p.add_argument("--no-sessions", action="store_true",
                   help="with --sign: sign every request (no request session and its MAC, which the real agent uses)")
    args = p.parse_args()
    _raise_nofile()
    # "this" is the tree this script is in (its own src first on the path: the venv may hold another
    # tree as an editable install, session 13's first swapped pair ran that one twice)
    own = str(Path(__file__).resolve().parent.parent / "src")
    trees = [("before", args.before_src), ("this", own)] if args.before_src else [("this", own)]
    if args.this_first:
        trees.reverse()
    rows = []
    configs = [(n, backend, replicas, switch, gen0) for n in args.agents for backend in args.backends
               for replicas in args.replicas for switch in args.switch_interval for gen0 in args.gc_gen0
               if backend != "sqlite" or replicas == 1]
    for n, backend, replicas, switch, gen0 in configs:
        for tree, src in trees:  # the before-tree first (unless --this-first), then this one: side by side
            try:
                r = run_one(backend, n, args.repeats, args.heartbeat, replicas,
                            f"{args.profile}/{backend}-{n}-{replicas}-{tree}" if args.profile else None,
                            switch, args.sign, src, gen0, not args.no_sessions)
            except RuntimeError as exc:
                print(f"{backend} {n}: skipped ({exc})", flush=True)
                continue
            r.update(switch_interval=switch, gc_gen0=gen0, signed=args.sign, load_avg=os.getloadavg(),
                     sessions=args.sign and not args.no_sessions, tree=tree if gen0 is None else f"{tree}/g{gen0}")
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print(f"agents sign their requests: {'yes (--sign)' if args.sign else 'no (token only; --sign to sign)'}"
          + (f"; on a session (MAC): {'no (--no-sessions)' if args.no_sessions else 'yes'}" if args.sign else ""))
    print(f"{'tree':<13}{'backend':<11}{'repl':>5}{'agents':>7}{'enrol s':>9}{'app p50':>9}{'app p99':>9}{'fan':>6}"
          f"{'glob p50':>10}{'glob p99':>10}{'fan':>6}{'api p50':>9}{'api p99':>9}{'cpu/1k':>8}{'rss MiB':>14}"
          f"{'errs':>6}")
    for r in rows:
        a, g = r["relabel-app"], r["relabel-global"]
        rss = "/".join(str(x) for x in r["rss_mib"])
        print(f"{r['tree']:<13}{r['backend']:<11}{r['replicas']:>5}{r['agents']:>7}{r['enrol_s']:>9.1f}{a['p50_ms']:>9.0f}"
              f"{a['p99_ms']:>9.0f}{a['fanout']:>6.0f}{g['p50_ms']:>10.0f}{g['p99_ms']:>10.0f}{g['fanout']:>6.0f}"
              f"{r['api_p50_ms']:>9.1f}{r['api_p99_ms']:>9.1f}{g['cpu_s_per_1k_agents_per_change']:>8.2f}"
              f"{rss:>14}{r['agent_errors']:>6}")
    print("(latencies in ms from the API call until each affected agent acknowledged; fan = hosts affected;\n"
          " cpu/1k = controller CPU-seconds, all replicas, per 1,000 agents per global change; rss per replica)")
    print()
    print("global relabel, where the time goes (ms from the API call; agent i polls replica i mod N,"
          " every change is made through the first):")
    for r in rows:
        g = r["relabel-global"]
        per = "  ".join(f"r{k}: first {f} p50 {m} p99 {n}" for k, (f, m, n) in enumerate(g["replica_ms"]))
        print(f"  {r['tree']} {r['backend']} x{r['replicas']} {r['agents']}: write call {g['put_p50_ms']:.0f}  {per}"
              f"  PostgreSQL CPU-s per change {g['db_cpu_s_per_change']:.2f}")
        if g.get("full_gc"):
            full = "  ".join(f"r{k}: {n} in {ms} ms, CPU {c} (longest {top})"
                             for k, (n, ms, top, c) in enumerate(g["full_gc"]))
            young = "  ".join(f"r{k}: {n} in {ms} ms, CPU {c} (longest {top})"
                              for k, (n, ms, top, c) in enumerate(g["young_gc"]))
            print(f"    collections in the scenario, full: {full}\n      young: {young}")


if __name__ == "__main__":
    main()
