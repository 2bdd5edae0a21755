"""Cost of the scope check (issue 12 item 3): a scoped principal's write vs the same write unscoped.

The real app in-process (FastAPI TestClient, SQLite in a temporary directory), loaded with an
estate and provisioned. For each write, the median wall time of ``--reps`` requests (each a
real change: two bodies alternate) by an unscoped owner ("plain") and by a principal scoped to
one app ("scoped": a ruleset-manager for rulesets, a scoped admin for the rest), as CPU time of
the process (the app runs in-process), since wall time on a shared machine is mostly waiting:

* ruleset replace, in scope           - the fast path (only the changed ruleset is expanded);
* ruleset replace reaching outside    - the same check, refused (403) and rolled back;
* service replace                     - the full path (draft compiled before and after);
* workload mode switch                - a live write: the CompilerTxn's host deltas;
* provision                           - the deltas of the new version (plus the unchanged draft).

Estates: ``example`` (the example estate plus one ``app=ops`` database, scope ``app=ops``) and
``medium`` (bench/estate_gen.py: 5,000 workloads, 500 rulesets, 10,000 rules; scope
``app=app0000``).

    python bench/scoped_write.py                    # both estates
    python bench/scoped_write.py --estates example --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estate_gen import SIZES, generate

from stockade.controller.app import create_app
from stockade.controller.context import ControllerSettings
from stockade.controller.services import codec, versions
from stockade.controller.services.auth import Argon2Params
from stockade.controller.services.codec import POLICY_KINDS
from stockade.controller.storage import store
from stockade.model.policy import Policy
from stockade.model.selectors import ALL_WORKLOADS, LabelSelector, Selector
from stockade.paths import example_estate
from stockade.policyfile import load_documents

API = "/api/v1"


@dataclass(frozen=True)
class Row:
    write: str
    plain_ms: float | None
    scoped_ms: float
    note: str


def _example() -> tuple[Policy, str, str]:
    text = "\n---\n".join(p.read_text() for p in sorted(example_estate().glob("*.yaml")))
    text += """
---
apiVersion: stockade.io/v1
kind: Workload
name: ops-db-1
labels: {role: db, app: ops, env: prod, loc: lab}
interfaces:
  - name: eth0
    addresses: [10.70.0.61, fd70::61]
mode: full
"""
    return load_documents(text, "example"), "ops", "ops-db-1"


def _expressible(sel: Selector) -> Selector:
    """The REST codec refuses an exclusion-only selector ("all except role=batch"), which the
    generator uses once: it becomes ``all`` here (the benchmark needs the shape, not the meaning)."""
    if isinstance(sel, LabelSelector) and not sel.require and not sel.groups:
        return ALL_WORKLOADS
    return sel


def _medium() -> tuple[Policy, str, str]:
    policy = generate(SIZES["medium"]).policy
    rulesets = tuple(
        replace(rs, rules=tuple(replace(r, consumers=tuple(map(_expressible, r.consumers)),
                                        providers=tuple(map(_expressible, r.providers))) for r in rs.rules))
        for rs in policy.rulesets
    )
    denies = tuple(replace(d, consumers=tuple(map(_expressible, d.consumers)),
                           providers=tuple(map(_expressible, d.providers))) for d in policy.deny_rules)
    policy = replace(policy, rulesets=rulesets, deny_rules=denies)
    app = "app0000"
    workload = next(w.name for w in policy.workloads if ("app", app) in {(x.key, x.value) for x in w.labels})
    return policy, app, workload


class Bench:
    def __init__(self, client: TestClient, policy: Policy, app: str, workload: str) -> None:
        self.c = client
        self.wall: list[float] = []
        self.app = app
        self.workload = workload
        ctl = client.app.state.controller  # type: ignore[attr-defined]
        user, password = ctl.first_run_credential
        client.post(f"{API}/auth/login", json={"username": user, "password": password}).raise_for_status()
        key = client.post(f"{API}/api-keys", json={"name": "owner", "role": "owner"}).json()["key"]
        client.cookies.clear()
        self.owner = {"Authorization": f"Bearer {key}"}
        self.mgr = self._key("ruleset-manager")
        self.admin = self._key("admin")
        objects = codec.objects_of_policy(policy)
        t0 = time.perf_counter()
        with ctl.sessions.begin() as db:
            for kind in ("label_key", *POLICY_KINDS, "workload"):
                store.put_objects(db, kind, objects.get(kind, {}), "bench", prune=False)
        ctl.dist.load()
        versions.provision(ctl.dist, "bench", "the estate")
        self.load_s = time.perf_counter() - t0
        self.services = sorted(objects["service"])[:2]
        self.wall.clear()

    def _key(self, role: str) -> dict[str, str]:
        r = self.c.post(f"{API}/api-keys", json={"name": role, "role": role, "scope": [f"app={self.app}"]},
                        headers=self.owner)
        r.raise_for_status()
        return {"Authorization": f"Bearer {r.json()['key']}"}

    def call(self, method: str, path: str, who: dict[str, str], expect: int, **kw: Any) -> float:
        """CPU milliseconds of the whole process (client, app thread and SQLite) for one request:
        on a shared machine wall time mostly measures waiting for a core (it is printed too)."""
        t0, c0 = time.perf_counter(), time.process_time()
        r = self.c.request(method, API + path, headers=who, **kw)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if r.status_code != expect:
            raise SystemExit(f"{method} {path}: expected {expect}, got {r.status_code} {r.text}")
        self.wall.append(wall * 1000)
        return cpu * 1000

    def ruleset(self, name: str, service: str, consumers: dict[str, Any] | None = None) -> dict[str, Any]:
        rule: dict[str, Any] = {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
                                "services": [service]}
        if consumers is not None:
            rule = {**rule, "consumers": [consumers], "consumers_scope": "global"}
        return {"name": name, "scope": [{"labels": {"app": self.app}}], "rules": [rule]}


def median(reps: int, fn: Callable[[int], float]) -> float:
    return statistics.median(fn(i) for i in range(reps))


def progress(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def measure(bench: Bench, reps: int, full_reps: int) -> list[Row]:
    b = bench
    s0, s1 = b.services
    rows: list[Row] = []
    for who, name in ((b.owner, "plain-rs"), (b.mgr, "scoped-rs")):
        b.call("POST", "/rulesets", who, 201, json=b.ruleset(name, s0))
    plain = median(reps, lambda i: b.call("PUT", "/rulesets/plain-rs", b.owner, 200,
                                          json=b.ruleset("plain-rs", (s1, s0)[i % 2])))
    scoped = median(reps, lambda i: b.call("PUT", "/rulesets/scoped-rs", b.mgr, 200,
                                           json=b.ruleset("scoped-rs", (s1, s0)[i % 2])))
    rows.append(Row("ruleset replace, in scope", plain, scoped, "fast path"))
    progress(f"{rows[-1]}")
    refused = median(reps, lambda i: b.call("PUT", "/rulesets/scoped-rs", b.mgr, 403,
                                            json=b.ruleset("scoped-rs", (s1, s0)[i % 2], {"all": True})))
    rows.append(Row("ruleset replace reaching outside", None, refused, "403, rolled back"))
    progress(f"{rows[-1]}")

    b.call("POST", "/services", b.owner, 201, json={"name": "bench-svc", "ports": ["7000/tcp"]})
    plain = median(full_reps, lambda i: b.call("PUT", "/services/bench-svc", b.owner, 200,
                                               json={"name": "bench-svc", "ports": [f"{7001 + i}/tcp"]}))
    scoped = median(full_reps, lambda i: b.call("PUT", "/services/bench-svc", b.admin, 200,
                                                json={"name": "bench-svc", "ports": [f"{7101 + i}/tcp"]}))
    rows.append(Row("service replace", plain, scoped, "full path: 2 compiles"))
    progress(f"{rows[-1]}")

    modes = ("selective", "full")
    plain = median(reps, lambda i: b.call("PUT", f"/workloads/{b.workload}/mode", b.owner, 200,
                                          json={"mode": modes[i % 2]}))
    scoped = median(reps, lambda i: b.call("PUT", f"/workloads/{b.workload}/mode", b.admin, 200,
                                           json={"mode": modes[(i + 1) % 2]}))
    rows.append(Row("workload mode switch", plain, scoped, "host deltas"))
    progress(f"{rows[-1]}")

    def provision(who: dict[str, str], i: int) -> float:
        b.call("PUT", "/rulesets/scoped-rs", b.mgr, 200, json=b.ruleset("scoped-rs", (s1, s0)[i % 2]))
        return b.call("POST", "/policy/provision", who, 201, json={"message": f"bench {i}"})

    plain = median(full_reps, lambda i: provision(b.owner, i))
    scoped = median(full_reps, lambda i: provision(b.admin, i + 1))
    rows.append(Row("provision", plain, scoped, "host deltas"))
    return rows


def report(name: str, workloads: int, load_s: float, rows: list[Row], wall: list[float]) -> str:
    out = [f"\n{name}: {workloads} workloads (loaded and provisioned in {load_s:.1f} s wall); "
           f"median CPU ms per request (median wall ms of all requests: {statistics.median(wall):.0f})",
           f"{'write':36} {'plain ms':>9} {'scoped ms':>10} {'overhead':>9}  note"]
    for r in rows:
        plain = f"{r.plain_ms:9.1f}" if r.plain_ms is not None else f"{'-':>9}"
        over = f"{r.scoped_ms - r.plain_ms:+9.1f}" if r.plain_ms is not None else f"{'-':>9}"
        out.append(f"{r.write:36} {plain} {r.scoped_ms:10.1f} {over}  {r.note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estates", nargs="+", choices=("example", "medium"), default=["example", "medium"])
    ap.add_argument("--reps", type=int, default=15, help="requests per fast measurement (median)")
    ap.add_argument("--full-reps", type=int, default=5, help="requests per full-compile measurement")
    args = ap.parse_args(argv)
    with open("/proc/loadavg") as f:
        print(f"load average: {' '.join(f.read().split()[:3])}")
    for name in args.estates:
        policy, app, workload = _example() if name == "example" else _medium()
        with tempfile.TemporaryDirectory() as tmp:
            settings = ControllerSettings(database_url=f"sqlite:///{tmp}/bench.db", secure_cookies=False,
                                          argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1))
            with TestClient(create_app(settings)) as client:
                progress(f"{name}: loading {len(policy.workloads)} workloads")
                bench = Bench(client, policy, app, workload)
                progress(f"{name}: loaded in {bench.load_s:.1f} s")
                rows = measure(bench, args.reps, args.full_reps)
        print(report(f"{name} (scope app={app})", len(policy.workloads), bench.load_s, rows, bench.wall), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
