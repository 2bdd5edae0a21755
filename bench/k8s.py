"""Kubernetes node agent benchmark (issue 15): one node agent enforcing 110 pods (Kubernetes' default maximum).

A real kube-apiserver + etcd (tests/k8s/k8s.sh), a real controller and the cluster sync; the node
is simulated the way the harness plays further kubelets: each pod is a network namespace with a
process in a cgroup named ``pod<uid>`` (so the node agent finds it exactly as on a real node:
cgroup + procfs, see stockade.k8s.podns), its IP patched into ``status.podIPs`` through the API.
The node agent is the real ``stockade k8s node-agent`` process (no host policy: this machine's own
firewall is not the bench's). Measured:

* the start-up: all pods programmed, then until the node agent says it is settled (every pod
  started, no apply or proof pending; its start-up proofs done), and its CPU meanwhile;
* RSS and CPU of the node agent at rest (110 pods enforced, settled) and during churn (pods deleted and
  created through the API, ``--churn-rate`` of each per second);
* time to program a new pod's namespace (goal <= 50 ms), as a user sees it: from the pod's sandbox
  existing (its namespace and a process in the pod's cgroup: what the node agent looks for) to the
  pod's first policy in force inside it (the node agent's wall-clock stage, from its log). New pods
  in churn are created bound to the node; the bench plays the kubelet: the sandbox comes
  ``--sandbox-delay`` later and the IP in the API ``--ip-delay`` after that. Also: IP in the API ->
  in force (negative when the policy was in force before the IP), and every stage of the way.

    python bench/k8s.py                     # 110 pods, 10 s at rest, 10 s of churn at 2+2 pods/s
    python bench/k8s.py --sandbox-delay 0 --ip-delay 0   # sandbox and IP at once (the kubelet's best case)
    python bench/k8s.py --pods 30 --churn-seconds 5
    python bench/k8s.py --agent-src /work/wt/OLD/src --json old.json   # the node agent of another tree
    python bench/k8s.py --baseline old.json                             # side by side: old | this tree
    python bench/k8s.py --pod-nft --json nft.json && python bench/k8s.py --baseline nft.json
                                         # pods' applies with nft processes | over netlink (the default)

Needs root, Go-built binaries in the harness cache (tests/k8s/k8s.sh build), ``ip`` and ``nft``.
The pod-churn fan-out benchmark of the issue (10,000 pods on 100 nodes) is bench/k8s_fanout.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.k8s.conftest import SCRIPT, Cluster, _ports_env  # noqa: E402
from tests.k8s.kube import Kube, SyncThread, start_controller  # noqa: E402

from stockade.k8s.mapping import PodKey, workload_name  # noqa: E402
from stockade.k8s.podns import pin_prefix  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/pids")
TICK = os.sysconf("SC_CLK_TCK")


# A new pod's stages, every one a wall-clock instant (the bench's own, the sync's, and the node agent's
# from its log), listed per pod in the order they happened up to its policy in force; the table shows
# each transition that occurred (p50 / max of the time from the stage before). In a real node the
# kubelet creates the sandbox some time after the pod is bound (--sandbox-delay here) and reports the
# IP some time after that (--ip-delay): the bench plays both.
STAGES = {
    "created": "pod created in the API, bound to the node",
    "sync-bound": "the sync saw the bound pod (its watch)",
    "committed": "the controller committed the pod's workload (the sync's first write returned)",
    "sandbox": "sandbox created (its process in the pod's cgroup: findable)",
    "api": "IP patched in the API",
    "sync": "the sync saw the IP (its watch)",
    "committed-ip": "the controller committed the pod's address (the sync's write returned)",
    "seen": "the node agent's watch saw the pod (before address-less workloads: its IP)",
    "ip": "the node agent's watch saw the IP",
    "taken": "a start began (start pool)",
    "spotted": "the reconcile loop saw the namespace (procfs; an enrolled pod awaiting its sandbox)",
    "started": "the start attempt that succeeded began (start pool)",
    "found": "namespace found (procfs)",
    "pinned": "namespace pinned (ip netns attach)",
    "enrolled": "pod credential (+ first policy) from POST /pods/enroll, retried until the workload is committed",
    "flows": "its flow reader bound (NFLOG in its namespace), before the first apply",
    "applied": "the enrolment's policy applied and read back (fast path)",
    "runtime": "its agent runtime started",
    "agent-enrolled": "runtime has its client",
    "agent-answered": "first long-poll answered",
    "agent-admitted": "admitted by the apply gate",
    "agent-fetched": "policy in hand",
    "agent-applied": "ruleset applied and read back",
}
AGENT_STAGES = ("seen", "ip", "taken", "spotted", "started", "found", "pinned", "enrolled", "flows", "applied",
                "runtime", "agent-enrolled", "agent-answered", "agent-admitted", "agent-fetched", "agent-applied")


class SyncTimes:
    """When the in-process sync saw each pod bound and with its IP (by uid), and when its first write
    and its first write with an address returned (by workload name)."""

    def __init__(self, sync: object) -> None:
        self.bound: dict[str, float] = {}
        self.saw: dict[str, float] = {}
        self.committed: dict[str, float] = {}
        self.committed_ip: dict[str, float] = {}
        orig_event = sync.event  # type: ignore[attr-defined]
        ctl = sync._ctl  # type: ignore[attr-defined]
        orig_batch, orig_put = ctl.batch_workloads, ctl.put_workload

        async def event(kind: str, type_: str, obj: dict) -> None:  # type: ignore[type-arg]
            status = obj.get("status") or {}
            if kind == "Pod":
                self.bound.setdefault(obj["metadata"]["uid"], time.time())
                if status.get("podIPs"):
                    self.saw.setdefault(obj["metadata"]["uid"], time.time())
            await orig_event(kind, type_, obj)

        def wrote(bodies: list, now: float) -> None:  # type: ignore[type-arg]
            for body in bodies:
                self.committed.setdefault(body["name"], now)
                if any(i.get("addresses") for i in body.get("interfaces", [])):
                    self.committed_ip.setdefault(body["name"], now)

        async def batch(upsert: list, delete: list) -> None:  # type: ignore[type-arg]
            await orig_batch(upsert, delete)
            wrote(upsert, time.time())

        async def put(body: dict) -> None:  # type: ignore[type-arg]
            await orig_put(body)
            wrote([body], time.time())

        sync.event = event  # type: ignore[attr-defined]
        ctl.batch_workloads, ctl.put_workload = batch, put


def in_force(t: dict[str, float]) -> float | None:
    """When the pod's first policy was in force in its namespace: the fast path's apply, else its runtime's."""
    got = [t[k] for k in ("applied", "agent-applied") if k in t]
    return min(got) if got else None


def pod_times(pods: list[SimPod], agent_log: str, sync: SyncTimes) -> list[dict[str, float]]:
    logged = {uid: json.loads(v) for uid, v in re.findall(r"pod ([0-9a-f-]+): stages (\{.*\})", agent_log)}
    out = []
    for p in pods:
        t = {k: v for k, v in logged.get(p.uid, {}).items() if k in AGENT_STAGES}
        t.update(created=p.created_time, sandbox=p.sandbox_time, api=p.api_time)
        for name, table, key in (("sync-bound", sync.bound, p.uid), ("sync", sync.saw, p.uid),
                                 ("committed", sync.committed, p.workload),
                                 ("committed-ip", sync.committed_ip, p.workload)):
            if key in table:
                t[name] = table[key]
        out.append(t)
    return out


def _p(values: list[float]) -> str:
    if not values:
        return "-"
    ms = [v * 1000 for v in values]
    p99 = statistics.quantiles(ms, n=100)[98] if len(ms) > 1 else ms[0]
    return f"{statistics.median(ms):.0f} / {p99:.0f} / {max(ms):.0f}"


def stage_table(times: list[dict[str, float]]) -> tuple[list[str], dict]:  # type: ignore[type-arg]
    """Markdown rows: each transition's share of a new pod's latency, then the totals."""
    rows, out = [], {}

    def line(label: str, values: list[float]) -> None:
        rows.append(f"| {label} | {_p(values)} | {len(values)} |")
        out[label] = _p(values)

    rows += ["| stage of a new pod (from the stage before it) | p50 / p99 / max ms | n |", "|---|---|---|"]
    steps: dict[tuple[str, str], list[float]] = {}
    order: dict[tuple[str, str], list[float]] = {}
    for t in times:
        done = in_force(t)
        if done is None:
            continue
        chain = sorted(((n, v) for n, v in t.items() if v <= done), key=lambda x: x[1])
        for (a_name, a_t), (b_name, b_t) in itertools.pairwise(chain):
            steps.setdefault((a_name, b_name), []).append(b_t - a_t)
            order.setdefault((a_name, b_name), []).append(b_t - t["created"])
    for key in sorted(steps, key=lambda k: statistics.median(order[k])):
        line(f"{key[0]} -> {key[1]}: {STAGES[key[1]]}", steps[key])
    return rows, out


class SimPod:
    """A pod of the simulated node: created (bound) in the API at once; then, as a kubelet does it,
    its sandbox (netns + a sleeping process in cgroup pod<uid>) and later its IP in the API."""

    def __init__(self, kube: Kube, ns: str, name: str, node: str, ip: str, app: str, cgroup: Path,
                 labels: dict[str, str] | None = None, netns_prefix: str = "bk") -> None:
        self.kube, self.ns, self.name, self.ip, self.cgroup_root = kube, ns, name, ip, cgroup
        self.created_time = time.time()
        kube.ok("POST", f"/api/v1/namespaces/{ns}/pods", json={
            "metadata": {"name": name, "labels": {"app": app, **(labels or {})}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none", "imagePullPolicy": "Never"}]}})
        self.uid = kube.ok("GET", f"/api/v1/namespaces/{ns}/pods/{name}")["metadata"]["uid"]
        self.netns = f"{netns_prefix}-{secrets.token_hex(4)}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroup = cgroup / f"pod{self.uid}"
        self.sandbox_time = self.api_time = float("nan")
        self.deleted = False

    def sandbox(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "sleep", "100000"])
        self.cgroup.mkdir()
        (self.cgroup / "cgroup.procs").write_text(str(self.proc.pid))
        self.sandbox_time = time.time()  # wall clock: the stages are compared with the agent's log

    def start(self) -> None:
        self.api_time = time.time()
        self.kube.play_kubelet(self.ns, self.name, [self.ip])

    def kubelet(self, sandbox_delay: float, ip_delay: float) -> threading.Thread:
        """Sandbox after ``sandbox_delay``, IP ``ip_delay`` after that, on a thread of its own."""
        def run() -> None:
            time.sleep(sandbox_delay)
            self.sandbox()
            time.sleep(ip_delay)
            self.start()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    @property
    def workload(self) -> str:
        return workload_name(PodKey(self.ns, self.name))

    def programmed(self) -> bool:
        if self.proc is None:
            return False
        r = subprocess.run(["ip", "netns", "exec", self.netns, "nft", "list", "chain", "inet", "stockade", "inbound"],
                           capture_output=True, check=False)
        return r.returncode == 0

    def delete(self) -> None:
        if self.deleted:
            return
        self.deleted = True
        self.kube.delete_pod(self.ns, self.name)
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.netns], check=False)
        for _ in range(50):
            try:
                self.cgroup.rmdir()
                return
            except OSError:
                time.sleep(0.02)


def usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024  # type: ignore[union-attr]
    return cpu, rss


def window(pid: int, seconds: float) -> tuple[float, int]:
    c0, _ = usage(pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    c1, rss = usage(pid)
    return (c1 - c0) / (time.monotonic() - t0) * 100, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--rest-seconds", type=float, default=10)
    ap.add_argument("--churn-seconds", type=float, default=10)
    ap.add_argument("--settle-timeout", type=float, default=120,
                    help="longest wait for the node agent to say it is settled before the rest window")
    ap.add_argument("--churn-rate", type=float, default=2.0, help="pods deleted and created per second, each")
    ap.add_argument("--agent-src", type=Path, help="run the node agent from this source tree (e.g. main's)")
    ap.add_argument("--json", type=Path, help="write the rows here (for a later --baseline)")
    ap.add_argument("--baseline", type=Path, help="rows of an earlier --json run, printed beside these")
    ap.add_argument("--per-pod-poll", action="store_true",
                    help="the node agent's per-pod protocol (a long-poll per pod; the default is one per node)")
    ap.add_argument("--sandbox-delay", type=float, default=0.3,
                    help="a new pod in churn: seconds from its creation in the API to its sandbox (the kubelet's part)")
    ap.add_argument("--ip-delay", type=float, default=0.2,
                    help="a new pod in churn: seconds from its sandbox to its IP in the API (the kubelet's status)")
    ap.add_argument("--no-pod-change-feed", action="store_true",
                    help="pods' tamper watch without a change feed (read back every 10 s only; before session 9)")
    ap.add_argument("--no-frozen-heap", action="store_true",
                    help="the node agent's collections after proofs walk the whole heap (before session 10)")
    ap.add_argument("--pod-nft", action="store_true",
                    help="the node agent applies and reads pods' tables with nft processes (the path before netlink)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; pods' tables via "
          f"{'nft processes' if args.pod_nft else 'netlink'}; "
          f"{'per-pod protocol' if args.per_pod_poll else 'node agent default protocol'}; pods' change feed "
          f"{'off' if args.no_pod_change_feed else 'on'}")
    agent_env = dict(os.environ)
    if args.agent_src is not None:
        agent_env["PYTHONPATH"] = str(args.agent_src.resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-k8s-"))
    env = _ports_env()
    subprocess.run([str(SCRIPT), "start", str(tmp / "k8s")], env=env, check=True)
    values = dict(line.split("=", 1) for line in (tmp / "k8s" / "env").read_text().split())
    net = ipaddress.IPv4Network(f"10.246.{secrets.randbelow(64) * 4}.0/22")
    cluster = Cluster(values["K8S_API"], Path(values["K8S_TOKEN_FILE"]).read_text().strip(), Path(values["K8S_CA"]),
                      tmp / "k8s" / "kubeconfig", tmp / "k8s", net, ipaddress.IPv6Network("fd46::/64"))
    cgroup = CGROUP_ROOT / f"stockade-bench-{secrets.token_hex(3)}"
    cgroup.mkdir()
    ctl = agent = sync = None
    pods: list[SimPod] = []
    try:
        ctl, api, key = start_controller(tmp, _free())
        api.ok("POST", "/label-keys", 201, json={"name": "k8s-node", "values": []})
        api.ok("POST", "/services", 201, json={"name": "web", "ports": ["8080/tcp"]})
        api.ok("POST", "/rulesets", 201, json={"name": "pods", "scope": "all", "rules": [
            {"consumers": [{"labels": {"app": "client"}}], "providers": [{"labels": {"app": "server"}}],
             "services": ["web"]}]})
        api.ok("POST", "/policy/provision", 201, json={"message": "bench"})
        sync = SyncThread(cluster, ctl.url, key).start()
        assert sync.sync is not None
        sync_times = SyncTimes(sync.sync)
        (tmp / "code").write_text(api.activation_code("k8s-nodes", mode="idle"))
        log = tmp / "node-agent.log"
        with log.open("wb") as out:
            agent = subprocess.Popen([sys.executable, "-m", "stockade.cli", "k8s", "node-agent", "--node", "bench-node",
                                      "--controller", ctl.url, "--activation-code-file", str(tmp / "code"),
                                      "--kubeconfig", str(cluster.kubeconfig), "--state-dir", str(tmp / "state"),
                                      "--no-host-policy", "--log-level", "info",
                                      *(["--pod-nft"] if args.pod_nft else []),
                                      *(["--no-pod-change-feed"] if args.no_pod_change_feed else []),
                                      *(["--no-frozen-heap"] if args.no_frozen_heap else []),
                                      *(["--per-pod-poll"] if args.per_pod_poll else [])],
                                     stdout=out, stderr=subprocess.STDOUT, env=agent_env)
        kube = Kube(cluster)
        ns = kube.namespace(prefix="bench")
        hosts = iter(net.hosts())
        t0 = time.monotonic()
        for i in range(args.pods):
            p = SimPod(kube, ns, f"p{i}", "bench-node", str(next(hosts)), ("client", "server")[i % 2], cgroup)
            p.sandbox()
            p.start()
            pods.append(p)
        while not all(p.programmed() for p in pods):
            time.sleep(0.2)
            if time.monotonic() - t0 > 600:
                raise SystemExit("pods not programmed in 600 s: " + log.read_text()[-2000:])
        programmed = time.monotonic() - t0
        print(f"{args.pods} pods programmed in {programmed:.1f} s")
        # at rest = settled, as the node agent itself says (every pod started, no apply or proof queued,
        # running or asked for): until then the start-up's proofs are still running. An agent that never
        # says so (a tree before session 9's h15h) gets --settle-timeout seconds
        s0, ts = usage(agent.pid)[0], time.monotonic()
        said = f"node agent settled: {args.pods} pods enforced"
        first10: float | None = None  # CPU in the first 10 s after programmed (the rest window before session 9)
        while said not in log.read_text() and time.monotonic() - ts < args.settle_timeout:
            time.sleep(0.2)
            if first10 is None and time.monotonic() - ts >= 10:
                first10 = (usage(agent.pid)[0] - s0) / (time.monotonic() - ts) * 100
        settle = time.monotonic() - ts
        settle_cpu_s = usage(agent.pid)[0] - s0
        if first10 is None:  # settled within 10 s: the rest of those 10 s at rest
            time.sleep(max(0.0, ts + 10 - time.monotonic()))
            first10 = (usage(agent.pid)[0] - s0) / (time.monotonic() - ts) * 100
        settled_said = said in log.read_text()
        print(f"settled {settle:.1f} s after programmed ({'said by the agent' if settled_said else 'timeout'})")
        time.sleep(1)
        rest_cpu, rest_rss = window(agent.pid, args.rest_seconds)
        # churn: delete the oldest and create a new pod, churn-rate of each per second; each new pod gets its
        # sandbox --sandbox-delay after its creation and its IP --ip-delay after that (a thread plays its kubelet)
        c0, _ = usage(agent.pid)
        tc, tc_wall = time.monotonic(), time.time()
        n = args.pods
        churned: list[SimPod] = []
        kubelets: list[threading.Thread] = []
        peak_rss = 0
        while time.monotonic() - tc < args.churn_seconds:
            step = time.monotonic()
            pods.pop(0).delete()
            p = SimPod(kube, ns, f"p{n}", "bench-node", str(next(hosts)), ("client", "server")[n % 2], cgroup)
            n += 1
            kubelets.append(p.kubelet(args.sandbox_delay, args.ip_delay))
            pods.append(p)
            churned.append(p)
            peak_rss = max(peak_rss, usage(agent.pid)[1])
            time.sleep(max(0.0, 1 / args.churn_rate - (time.monotonic() - step)))
        for t in kubelets:
            t.join(30)
        deadline = time.monotonic() + 60
        while not all(q.programmed() for q in churned) and time.monotonic() < deadline:
            time.sleep(0.05)
        c1, _ = usage(agent.pid)
        churn_cpu = (c1 - c0) / (time.monotonic() - tc) * 100
        time.sleep(1.0)  # the agent's stage lines follow its first-apply lines
        agent_log = log.read_text()
        applied = dict(re.findall(r"pod ([0-9a-f-]+): first policy applied ([0-9.]+) ms", agent_log))
        inside = [float(v) for v in applied.values()]
        times = pod_times(churned, agent_log, sync_times)
        done = [(t, f) for t in times if (f := in_force(t)) is not None]
        q = statistics.quantiles
        load = os.getloadavg()[0]
        pauses = [(float(at), float(ms) / 1000)
                  for ms, at in re.findall(r"gc pause ([0-9.]+) ms at ([0-9.]+)", agent_log) if float(at) >= tc_wall]
        # (logged by a node agent of session 10 on, >= 10 ms)
        hit = sum(any(at < f and at + ms > t["sandbox"] for at, ms in pauses) for t, f in done)
        # other pods' peer-set deltas: their waits in the apply gate (behind starts and holds), per 5 s window
        # of the node agent's log (a node agent of session 11 on)
        gates = [(int(n), float(p50), float(p99), float(mx)) for at, n, p50, p99, mx in re.findall(
            r"gate waits at ([0-9.]+): ([0-9]+) deltas, p50 ([0-9.]+) / p99 ([0-9.]+) / max ([0-9.]+) ms", agent_log)
            if float(at) >= tc_wall + 5]
        rows = {
            "start-up: all pods programmed (first apply in each namespace), s": f"{programmed:.1f}",
            "start-up: programmed -> settled (no apply or proof pending), s":
                f"{settle:.1f}" + ("" if settled_said else " (not said: timeout)"),
            "CPU from programmed to settled, CPU-seconds (% of one core)":
                f"{settle_cpu_s:.1f} s ({settle_cpu_s / settle * 100:.1f} %)",
            "CPU in the first 10 s after programmed (the rest window before session 9)": f"{first10:.1f} %",
            "RSS at rest": f"{rest_rss / 2**20:.0f} MiB",
            "CPU at rest": f"{rest_cpu:.1f} % of one core",
            "RSS during churn (peak)": f"{peak_rss / 2**20:.0f} MiB",
            f"CPU during churn ({args.churn_rate:g} deletes + {args.churn_rate:g} creates/s)": f"{churn_cpu:.1f} %",
            "**new pod: sandbox created -> its policy in force in its namespace** (goal <= 50), p50 / p99 / max ms":
                f"{_p([f - t['sandbox'] for t, f in done])} (n={len(done)} of {len(churned)})",
            "new pod: IP in the API -> its policy in force, p50 / p99 / max ms (negative: before the IP)":
                f"{_p([f - t['api'] for t, f in done])}",
            "new pod: created in the API -> its policy in force, p50 / p99 / max ms":
                f"{_p([f - t['created'] for t, f in done])}",
            "new pods in force before their IP was in the API": f"{sum(f < t['api'] for t, f in done)} of {len(done)}",
            "full collections >= 10 ms in churn: n, p50 / max ms (new pods waiting through one)":
                (f"{len(pauses)}, {statistics.median(p for _a, p in pauses) * 1000:.0f} / "
                 f"{max(p for _a, p in pauses) * 1000:.0f} ({hit} of {len(done)})") if pauses else "0 (or not logged)",
            "other pods' deltas in churn: their wait in the apply gate, n; worst window's p50 / p99; max ms":
                (f"{sum(g[0] for g in gates)}; {max(g[1] for g in gates):.0f} / {max(g[2] for g in gates):.0f}; "
                 f"{max(g[3] for g in gates):.0f}") if gates else "- (not logged)",
            "any pod: taken up -> first apply (the agent's own timer), p50 / p99":
                f"{statistics.median(inside):.1f} / {q(inside, n=100)[98]:.1f} ms (n={len(inside)})",
            "load average at the end": f"{load:.1f}",
        }
        print()
        print(f"churn: a new pod's sandbox {args.sandbox_delay:g} s after its creation, its IP {args.ip_delay:g} s "
              "after that")
        if args.baseline is not None:
            old = json.loads(args.baseline.read_text())
            print(f"| node agent, {args.pods} pods | before | after |")
            print("|---|---|---|")
            for k, v in rows.items():
                print(f"| {k} | {old.get(k, '-')} | {v} |")
        else:
            print(f"| node agent, {args.pods} pods | value |")
            print("|---|---|")
            for k, v in rows.items():
                print(f"| {k} | {v} |")
        stage_rows, stage_values = stage_table(times)
        print()
        print(f"New pods during churn, stage by stage (wall clock; load average {os.getloadavg()[0]:.1f}):")
        print()
        print("\n".join(stage_rows))
        if args.json is not None:
            args.json.write_text(json.dumps({**rows, **{"stage " + k: v for k, v in stage_values.items()}}, indent=1))
    finally:
        for p in pods:
            p.delete()
        prefix = pin_prefix("bench-node")
        deadline = time.monotonic() + 30  # the node agent unpins deleted pods' namespaces itself
        while time.monotonic() < deadline and any(n.startswith(prefix) for n in os.listdir("/run/netns")):
            time.sleep(0.1)
        if agent is not None:
            agent.terminate()
            agent.wait(20)
        if sync is not None:
            sync.stop()
        if ctl is not None:
            ctl.kill()
        subprocess.run([str(SCRIPT), "stop", str(tmp / "k8s")], env=env, check=False)
        for d in cgroup.glob("pod*"):
            d.rmdir()
        cgroup.rmdir()


def _free() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
