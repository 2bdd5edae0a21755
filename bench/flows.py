"""Flow benchmark: ingestion records/s, application-map latency, Explorer queries over a large store.

One controller process (uvicorn + uvloop, plain HTTP on 127.0.0.1; SQLite, or a throwaway
PostgreSQL cluster) holding a generated estate of 1,000 workloads in 50 app groups (25 apps x
prod/dev, 20 workloads each, roles web/app/db/cache, one ruleset per group). Phases, per backend:

1. **ingestion** - ``--senders`` threads in this process post uploads of
   ``--batch`` records (the agent wire format) as enrolled agents, for ``--duration`` seconds
   (default 60; ``--full``: the issue's 5 minutes). Each agent's records repeat its workload's
   usual connections (both sides) 95% of the time and come from a new internet address 5% of
   the time (scanners; 131,072 distinct ones, then they recur), so the summary table grows.
   Rate = records the controller accepted per second of wall time; the controller compacts on
   its own while ingesting; the time to drain what was left in the ingest log is printed too.
   The usual records are encoded once; each upload is assembled when it is sent.
2. **map** - ``GET /flows/map`` (last 24 h: everything ingested) x 5: median and worst; the
   number of stored summaries it aggregates is printed.
3. **explorer** - ``--explorer-rows`` summaries (default 1,000,000; ``--full``: 10,000,000)
   written straight into the store over the last 29 days, then Explorer queries through the
   API, each timed 3 x (worst kept): newest page, by destination workload, by source labels, by
   IP (either end), by port + verdict, one workload over one hour.

Targets (issue 6): ingestion >= 100,000 records/s, map <= 500 ms, explorer <= 1 s. The
machine's load average is printed: on a shared 2-core machine wall times include waiting
for a core.

    python bench/flows.py                         # SQLite and PostgreSQL, short run
    python bench/flows.py --full                  # 5 min ingestion, 10M-row explorer store
    python bench/flows.py --backends sqlite --duration 20 --explorer-rows 200000
    python bench/flows.py --backends postgresql --replicas 1 3   # ingestion over 1 vs 3 replicas (issue 18)

``--replicas``: that many controller processes on one PostgreSQL database; sender ``k`` uploads to
replica ``k mod N`` (each appends and compacts its own), the map and the Explorer read through the
first. On PostgreSQL the flow tables are partitioned by day, so the 29-day Explorer store spans 30
partitions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from controller import PgCluster

APPS, ENVS, PER_GROUP = 25, ("prod", "dev"), 20
ROLES = ("web", "app", "db", "cache")
TARGET_INGEST, TARGET_MAP_MS, TARGET_EXPLORER_MS = 100_000, 500.0, 1000.0
NEW_SOURCES = 0.05  # share of records from a never-seen internet address (the summary table grows by these)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the estate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str
    app: str
    env: str
    role: str
    ip: str


def estate() -> list[Host]:
    hosts = []
    n = 0
    for a in range(APPS):
        for env in ENVS:
            for i in range(PER_GROUP):
                n += 1
                hosts.append(Host(f"h{n:04d}", f"app{a:02d}", env, ROLES[i % len(ROLES)],
                                  f"10.{100 + n // 250}.{n % 250}.{1 + i % 200}"))
    return hosts


def estate_yaml(hosts: list[Host]) -> str:
    docs = [
        "apiVersion: stockade.io/v1\nkind: LabelKey\nname: app\n",
        "apiVersion: stockade.io/v1\nkind: LabelKey\nname: env\n",
        "apiVersion: stockade.io/v1\nkind: LabelKey\nname: role\n",
        "apiVersion: stockade.io/v1\nkind: Service\nname: web\nports: [443/tcp]\n",
        "apiVersion: stockade.io/v1\nkind: Service\nname: api\nports: [8080/tcp]\n",
        "apiVersion: stockade.io/v1\nkind: Service\nname: pg\nports: [5432/tcp]\n",
        "apiVersion: stockade.io/v1\nkind: Service\nname: redis\nports: [6379/tcp]\n",
    ]
    for a in range(APPS):
        for env in ENVS:
            docs.append(
                f"apiVersion: stockade.io/v1\nkind: Ruleset\nname: app{a:02d}-{env}\n"
                f"scope: [{{labels: {{app: app{a:02d}, env: {env}}}}}]\nrules:\n"
                "  - {consumers: [{labels: {role: web}}], providers: [{labels: {role: app}}], services: [api]}\n"
                "  - {consumers: [{labels: {role: app}}], providers: [{labels: {role: db}}], services: [pg]}\n"
                "  - {consumers: [{labels: {role: app}}], providers: [{labels: {role: cache}}], services: [redis]}\n")
    for h in hosts:
        docs.append(f"apiVersion: stockade.io/v1\nkind: Workload\nname: {h.name}\n"
                    f"labels: {{app: {h.app}, env: {h.env}, role: {h.role}}}\n"
                    f"interfaces: [{{name: eth0, addresses: [{h.ip}]}}]\nmode: visibility\n")
    return "---\n".join(docs)


PEER_PORTS = {"web": ("app", 8080), "app": ("db", 5432), "cache": ("app", 6379)}


def usual_records(h: Host, hosts: list[Host], rng: random.Random) -> list[list[Any]]:
    """The workload's usual connections, as it would report them (both directions)."""
    group = [x for x in hosts if x.app == h.app and x.env == h.env]
    out: list[list[Any]] = []
    for peer in group:
        if PEER_PORTS.get(h.role, ("", 0))[0] == peer.role:
            port = PEER_PORTS[h.role][1]
            out.append([h.ip, peer.ip, "tcp", port, "out", "allowed", "ruleset/x/0", 1, 0, 0])
        if PEER_PORTS.get(peer.role, ("", 0))[0] == h.role:
            port = PEER_PORTS[peer.role][1]
            out.append([peer.ip, h.ip, "tcp", port, "in", "allowed", "ruleset/x/0", 1, 0, 0])
    other = rng.choice([x for x in hosts if x.app != h.app])
    out.append([h.ip, other.ip, "tcp", 443, "out", "potentially-blocked", "default", 1, 0, 0])
    return out


class BodyMaker:
    """Uploads for one agent: its usual records (pre-encoded) and, 5% of the time, a never-seen source."""

    _sequence = 0
    _lock = threading.Lock()

    def __init__(self, h: Host, hosts: list[Host], batch: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.host = h
        self.batch = batch
        self.t0 = time.time()
        usual = usual_records(h, hosts, self.rng)
        self.usual = []
        for _ in range(200):  # the same connections seen at different times, in different numbers
            r = list(self.rng.choice(usual))
            r[7] = self.rng.randrange(1, 5)
            r[8] = r[9] = round(self.t0 - self.rng.random() * 5, 3)
            self.usual.append(json.dumps(r))

    def next(self) -> bytes:
        n_new = round(self.batch * NEW_SOURCES)
        with BodyMaker._lock:
            first = BodyMaker._sequence
            BodyMaker._sequence += n_new
        recs = self.rng.choices(self.usual, k=self.batch - n_new)
        t = round(self.t0 - 1, 3)
        for k in range(first, first + n_new):  # 198.18.0.0/15 holds 131,072 sources, then they recur
            a, b = divmod(k % 131_072, 256)
            recs.append(f'["198.{18 + a // 256}.{a % 256}.{b}","{self.host.ip}","tcp",443,"in",'
                        f'"potentially-blocked","default",1,{t},{t}]')
        return f'{{"sent_at":{self.t0:.3f},"dropped":0,"records":[{",".join(recs)}]}}'.encode()


# ---- the controller --------------------------------------------------------------------------------


def serve(database_url: str, port: int) -> None:
    import uvicorn

    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.services.auth import Argon2Params

    settings = ControllerSettings(database_url=database_url, secure_cookies=False, login_limit=(10_000, 60.0),
                                  enroll_limit=(1_000_000, 60.0),
                                  argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1))
    app = create_app(settings)
    cred = app.state.controller.first_run_credential  # None on a replica joining an existing database
    print(json.dumps({"user": cred[0], "password": cred[1]} if cred else {}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools",
                timeout_keep_alive=600)


class Controller:
    """One controller process; ``cred``: the owner's login when this one joins a database another
    replica created (the first prints it)."""

    def __init__(self, url: str, cred: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", url, str(self.port)],
                                     stdout=subprocess.PIPE, text=True)
        try:
            assert self.proc.stdout is not None
            cred = json.loads(self.proc.stdout.readline()) or cred
            assert cred, "the first controller of a database prints its owner's login"
            self.cred = cred
            base = f"http://127.0.0.1:{self.port}/api/v1"
            for _ in range(400):
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            self.http = httpx.Client(base_url=base, timeout=300)
            self.http.headers["Origin"] = f"http://127.0.0.1:{self.port}"  # a cookie-session write must name its origin
            self.http.post("/auth/login", json={"username": cred["user"], "password": cred["password"]})
            key = self.http.post("/api-keys", json={"name": "bench", "role": "owner"}).json()["key"]
            self.http.cookies.clear()
            self.http.headers["Authorization"] = f"Bearer {key}"
            self.base = base
        except BaseException:
            self.proc.kill()  # (a controller that did not come up is not left running)
            raise

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def enroll(ctl: Controller, hosts: list[Host]) -> list[tuple[Host, str, str]]:
    ctl.ok("POST", "/pairing-profiles", json={"name": "bench", "mode": "visibility"})
    out = []
    for h in hosts:
        code = ctl.ok("POST", "/pairing-profiles/bench/codes", json={"workload": h.name})["code"]  # declared: adopt
        a = ctl.ok("POST", "/agents/enroll", json={"activation_code": code, "hostname": h.name,
                                                   "interfaces": [{"name": "eth0", "addresses": [h.ip]}]})
        out.append((h, a["agent_id"], a["token"]))
    return out


# ---- phases -------------------------------------------------------------------------------------


def ingest(ctls: list[Controller], agents: list[tuple[Host, str, str]], hosts: list[Host], senders: int,
           batch: int, duration: float) -> dict[str, Any]:
    """Sender ``k`` uploads to replica ``k mod N`` (each replica appends and compacts its own)."""
    makers = [BodyMaker(h, hosts, batch, seed=i) for i, (h, _a, _t) in enumerate(agents)]
    accepted = [0] * senders
    errors: list[str] = []
    stop = time.monotonic() + duration

    def sender(k: int) -> None:
        with httpx.Client(base_url=ctls[k % len(ctls)].base, timeout=120) as c:
            i = k
            while time.monotonic() < stop:
                _h, agent_id, token = agents[i % len(agents)]
                body = makers[i % len(agents)].next()
                r = c.post(f"/agents/{agent_id}/flows", content=body,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                if r.status_code != 202:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                accepted[k] += int(r.json()["accepted"])
                i += senders

    t0 = time.monotonic()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    d0 = time.monotonic()
    for ctl in ctls:
        ctl.ok("GET", "/flows", params={"limit": 1})  # reads compact whatever is left (each replica its own)
    drain = time.monotonic() - d0
    if errors:
        raise RuntimeError(f"upload refused: {errors[0]}")
    total = sum(accepted)
    return {"records": total, "seconds": round(elapsed, 1), "records_per_s": round(total / elapsed),
            "drain_s": round(drain, 2)}


def timed(ctl: Controller, path: str, params: dict[str, Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        ctl.ok("GET", path, params=params)
        out.append((time.perf_counter() - t) * 1000)
    return out


def stored(url: str) -> int:
    from sqlalchemy import func, select

    from stockade.controller.storage.db import make_engine
    from stockade.controller.storage.flowstore import flows

    engine = make_engine(url)
    with engine.connect() as conn:
        n = int(conn.execute(select(func.count()).select_from(flows)).scalar_one())
    engine.dispose()
    return n


def fill_store(url: str, hosts: list[Host], rows: int) -> float:
    """Write ``rows`` summaries straight into the store, spread over the last 29 days."""
    from stockade.controller.storage.db import make_engine
    from stockade.controller.storage.flowstore import COLUMNS, HOUR_MS, FlowStore, flows

    engine = make_engine(url)
    fs = FlowStore(engine)
    eps = [fs.endpoint_id(h.name, f"app={h.app},env={h.env},role={h.role}") for h in hosts]
    rng = random.Random(7)
    now_h = int(time.time() * 1000) // HOUR_MS
    hours = 29 * 24
    per_hour = max(1, rows // hours)
    t0 = time.monotonic()
    written = 0
    with engine.begin() as conn:
        raw: Any = conn.connection.dbapi_connection
        for k in range(hours):
            bucket = now_h - hours + k
            n = min(per_hour, rows - written)
            if n <= 0:
                break
            batch = []
            for _ in range(n):
                s, d = rng.randrange(len(hosts)), rng.randrange(len(hosts))
                ms = bucket * HOUR_MS + rng.randrange(HOUR_MS)
                unmanaged = rng.random() < 0.2
                src_ip = f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}" if unmanaged else hosts[s].ip
                batch.append((bucket, rng.getrandbits(62), ms, ms, src_ip, hosts[d].ip, "tcp",
                              rng.choice((443, 5432, 8080, 6379, 22)), 1, rng.choice((0, 0, 0, 1, 2)),
                              "default", rng.randrange(1, 50), hosts[d].name, 0 if unmanaged else eps[s], eps[d]))
            if engine.dialect.name == "postgresql":
                with raw.cursor() as cur, cur.copy(f"COPY flows ({', '.join(COLUMNS)}) FROM STDIN") as cp:
                    for r in batch:
                        cp.write_row(r)
            else:
                conn.execute(flows.insert(), [dict(zip(COLUMNS, r, strict=True)) for r in batch])
            written += n
    with engine.begin() as conn:  # what autovacuum / PRAGMA optimize would do over time
        conn.exec_driver_sql("ANALYZE" if engine.dialect.name == "sqlite" else "ANALYZE flows")
    engine.dispose()
    return time.monotonic() - t0


def explorer(ctl: Controller, hosts: list[Host]) -> dict[str, float]:
    h = hosts[137]
    hour_ago = time.time() - 3600
    queries: dict[str, dict[str, Any]] = {
        "newest page": {},
        "dst workload": {"dst_workload": h.name},
        "src labels": {"src_labels": f"app={h.app},role=web"},
        "ip either end": {"ip": h.ip},
        "port+verdict": {"port": 6379, "verdict": "blocked"},
        "workload, 1 h": {"workload": h.name, "since": hour_ago},
    }
    return {name: max(timed(ctl, "/flows", {**q, "limit": 100}, 3)) for name, q in queries.items()}


def run(backend: str, args: argparse.Namespace, replicas: int = 1) -> dict[str, Any]:
    """One row: ``replicas`` controller processes on one database (PostgreSQL only above 1); the
    uploads are spread over them, the map and the Explorer read through the first."""
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-flows-"))
    pg = PgCluster() if backend == "postgresql" else None
    url = pg.url() if pg else f"sqlite:///{tmp / 'stockade.db'}"
    ctls: list[Controller] = []
    try:
        ctl = Controller(url)  # (inside the try: a controller that fails to start still stops the cluster)
        ctls.append(ctl)
        ctls += [Controller(url, ctl.cred) for _ in range(replicas - 1)]
        hosts = estate()
        ctl.ok("PUT", "/policy/draft", content=estate_yaml(hosts), headers={"Content-Type": "application/yaml"})
        ctl.ok("POST", "/policy/provision", json={"message": "bench"})
        agents = enroll(ctl, hosts[:: max(1, len(hosts) // args.agents)][: args.agents])
        print(f"[{backend}] estate: {len(hosts)} workloads, 50 groups; {len(agents)} agents", flush=True)
        ing = ingest(ctls, agents, hosts, args.senders, args.batch, args.duration)
        print(f"[{backend} x{replicas}] ingestion: {ing}", flush=True)
        map_ms = timed(ctl, "/flows/map", {}, 5)
        m = ctl.ok("GET", "/flows/map")
        print(f"[{backend}] map over {stored(url):,} summaries: {len(m['nodes'])} nodes, {len(m['edges'])} edges; "
              f"median {statistics.median(map_ms):.0f} ms, worst {max(map_ms):.0f} ms", flush=True)
        fill_s = fill_store(url, hosts, args.explorer_rows)
        print(f"[{backend}] explorer store: {args.explorer_rows:,} summaries written in {fill_s:.0f}s", flush=True)
        exp = explorer(ctl, hosts)
        print(f"[{backend}] explorer (worst of 3, ms): " + ", ".join(f"{k} {v:.0f}" for k, v in exp.items()),
              flush=True)
        return {"backend": backend, "replicas": replicas, "ingest": ing, "map_median_ms": statistics.median(map_ms),
                "map_worst_ms": max(map_ms), "explorer_ms": exp, "load": os.getloadavg()[0]}
    finally:
        for c in ctls:
            c.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    p.add_argument("--duration", type=float, default=60.0, help="ingestion seconds (default 60; --full: 300)")
    p.add_argument("--explorer-rows", type=int, default=1_000_000, help="stored summaries (--full: 10M)")
    p.add_argument("--full", action="store_true", help="the issue's sizes: 5 min ingestion, 10M stored flows")
    p.add_argument("--senders", type=int, default=4, help="concurrent uploading connections")
    p.add_argument("--batch", type=int, default=5000, help="records per upload")
    p.add_argument("--agents", type=int, default=50, help="enrolled agents the uploads rotate through")
    p.add_argument("--replicas", type=int, nargs="+", default=[1],
                   help="controller processes on one database (PostgreSQL only above 1), side by side: e.g. 1 3")
    args = p.parse_args()
    if args.full:
        args.duration, args.explorer_rows = 300.0, 10_000_000
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for backend in args.backends:
        for replicas in args.replicas:
            if backend == "sqlite" and replicas != 1:
                continue
            try:
                rows.append(run(backend, args, replicas))
            except RuntimeError as exc:
                print(f"{backend}: skipped ({exc})", flush=True)
    print()
    print(f"{'backend':<11}{'repl':>5}{'records/s':>11}{'':>6}{'map ms':>9}{'':>6}{'explorer ms':>13}{'':>6}"
          f"{'load':>6}")
    for r in rows:
        rate, mp, ex = r["ingest"]["records_per_s"], r["map_worst_ms"], max(r["explorer_ms"].values())
        print(f"{r['backend']:<11}{r['replicas']:>5}{rate:>11,}{verdict(rate >= TARGET_INGEST):>6}{mp:>9.0f}"
              f"{verdict(mp <= TARGET_MAP_MS):>6}{ex:>13.0f}{verdict(ex <= TARGET_EXPLORER_MS):>6}{r['load']:>6.1f}")
    print(f"targets: ingestion >= {TARGET_INGEST:,} records/s sustained, map <= {TARGET_MAP_MS:.0f} ms "
          f"(worst of 5), explorer <= {TARGET_EXPLORER_MS:.0f} ms (worst query, worst of 3)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
