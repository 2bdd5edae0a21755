"""Kubernetes node agent benchmark (issue 15): one node agent enforcing 110 pods (Kubernetes' default maximum).

A real kube-apiserver + etcd (tests/k8s/k8s.sh), a real controller and the cluster sync; the node
is simulated the way the harness plays further kubelets: each pod is a network namespace with a
process in a cgroup named ``pod<uid>`` (so the node agent finds it exactly as on a real node:
cgroup + procfs, see stockade.k8s.podns), its IP patched into ``status.podIPs`` through the API.
The node agent is the real ``stockade k8s node-agent`` process (no host policy: this machine's own
firewall is not the bench's). Measured:

* RSS and CPU of the node agent at rest (110 pods enforced) and during churn (pods deleted and
  created through the API, ``--churn-rate`` of each per second);
* time to program a new pod's namespace: from the node agent taking the pod up (its namespace
  found) to the pod's first policy applied inside it (the agent's own log line; goal <= 50 ms), and
  from the pod's IP appearing in the API to the table being in the namespace (seen from outside).

    python bench/k8s.py                     # 110 pods, 10 s at rest, 10 s of churn at 2+2 pods/s
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


# A new pod's stages. Two chains run side by side from the IP's patch in the API: the sync's (it sees
# the IP, its write commits the workload) and the node agent's (its own log, wall clock: its watch
# sees the IP ... the ruleset is in force). The agent's stages are taken in the order they happened
# (the fast path applies the policy its enrolment brought before the runtime starts), each timed
# from the one before; the table lists every transition that occurred.
STAGES = {
    "api": "IP patched in the API",
    "sync": "the sync saw the IP (its watch)",
    "committed": "the controller committed the workload (the sync's write returned)",
    "seen": "the node agent's watch saw the IP",
    "taken": "a start began (start pool)",
    "found": "namespace found (procfs)",
    "pinned": "namespace pinned (ip netns attach)",
    "enrolled": "pod credential (+ first policy) from POST /pods/enroll, retried until the workload is committed",
    "flows": "its flow reader bound (NFLOG in its namespace), before the first apply",
    "runtime": "its agent runtime started",
    "agent-enrolled": "runtime has its client",
    "agent-answered": "first long-poll answered",
    "agent-admitted": "admitted by the apply gate",
    "agent-fetched": "policy in hand",
    "agent-applied": "ruleset applied and read back",
    "outside": "the bench sees the table (polled every churn step)",
}
AGENT_CHAIN = ("seen", "taken", "found", "pinned", "enrolled", "flows", "runtime", "agent-enrolled", "agent-answered",
               "agent-admitted", "agent-fetched", "agent-applied")


class SyncTimes:
    """When the in-process sync saw each pod's IP (by uid) and its write returned (by workload name)."""

    def __init__(self, sync: object) -> None:
        self.saw: dict[str, float] = {}
        self.committed: dict[str, float] = {}
        orig_event = sync.event  # type: ignore[attr-defined]
        ctl = sync._ctl  # type: ignore[attr-defined]
        orig_batch, orig_put = ctl.batch_workloads, ctl.put_workload

        async def event(kind: str, type_: str, obj: dict) -> None:  # type: ignore[type-arg]
            status = obj.get("status") or {}
            if kind == "Pod" and status.get("podIPs"):
                self.saw.setdefault(obj["metadata"]["uid"], time.time())
            await orig_event(kind, type_, obj)

        async def batch(upsert: list, delete: list) -> None:  # type: ignore[type-arg]
            await orig_batch(upsert, delete)
            now = time.time()
            for body in upsert:
                self.committed.setdefault(body["name"], now)

        async def put(body: dict) -> None:  # type: ignore[type-arg]
            await orig_put(body)
            self.committed.setdefault(body["name"], time.time())

        sync.event = event  # type: ignore[attr-defined]
        ctl.batch_workloads, ctl.put_workload = batch, put


def stage_table(pods: list[tuple[SimPod, float]], agent_log: str, sync: SyncTimes) -> tuple[list[str], dict]:  # type: ignore[type-arg]
    """Markdown rows: each stage's share of a new pod's latency (p50 / max over ``pods``), and the
    agent's part (its watch saw the IP, or the workload committed, -> ruleset in force)."""
    logged = {uid: json.loads(v) for uid, v in re.findall(r"pod ([0-9a-f-]+): stages (\{.*\})", agent_log)}
    per_pod: list[dict[str, float]] = []
    for p, outside in pods:
        t = dict(logged.get(p.uid, {}))
        t["api"] = p.api_time
        if p.uid in sync.saw:
            t["sync"] = sync.saw[p.uid]
        if p.workload in sync.committed:
            t["committed"] = sync.committed[p.workload]
        t["outside"] = outside
        per_pod.append(t)
    rows, out = [], {}

    def line(label: str, values: list[float]) -> None:
        if values:
            text = f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f}"
        else:
            text = "-"
        rows.append(f"| {label} | {text} | {len(values)} |")
        out[label] = text

    rows += ["| stage of a new pod (from the stage before it) | p50 / max ms | n |", "|---|---|---|"]
    steps: dict[tuple[str, str], list[float]] = {}
    order: dict[tuple[str, str], list[float]] = {}
    for t in per_pod:
        chain = [("api", t["api"])]
        if "agent-applied" in t:
            chain += sorted(((n, t[n]) for n in AGENT_CHAIN if n in t and t[n] <= t["agent-applied"]),
                            key=lambda x: x[1])
        chain.append(("outside", t["outside"]))
        pairs = list(itertools.pairwise(chain))
        if "sync" in t:
            pairs.append((("api", t["api"]), ("sync", t["sync"])))
            if "committed" in t:
                pairs.append((("sync", t["sync"]), ("committed", t["committed"])))
        for (a_name, a_t), (b_name, b_t) in pairs:
            steps.setdefault((a_name, b_name), []).append(b_t - a_t)
            order.setdefault((a_name, b_name), []).append(b_t - t["api"])
    for key in sorted(steps, key=lambda k: (k[1] == "outside", k[0] != "api" or k[1] not in ("sync", "seen"),
                                            statistics.median(order[k]))):
        line(f"{key[0]} -> {key[1]}: {STAGES[key[1]]}", steps[key])
    line("**agent: its watch saw the IP -> ruleset in force** (goal <= 50)",
         [t["agent-applied"] - t["seen"] for t in per_pod if "agent-applied" in t and "seen" in t])
    line("**agent: workload committed -> ruleset in force**",
         [t["agent-applied"] - max(t["committed"], t["seen"]) for t in per_pod
          if "agent-applied" in t and "committed" in t and "seen" in t])
    line("**end to end: IP in the API -> table seen in the namespace**",
         [t["outside"] - t["api"] for t in per_pod])
    return rows, out


class SimPod:
    """A pod of the simulated node: netns + a sleeping process in cgroup pod<uid>."""

    def __init__(self, kube: Kube, ns: str, name: str, node: str, ip: str, app: str, cgroup: Path) -> None:
        self.kube, self.ns, self.name, self.ip = kube, ns, name, ip
        kube.ok("POST", f"/api/v1/namespaces/{ns}/pods", json={
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none", "imagePullPolicy": "Never"}]}})
        self.uid = kube.ok("GET", f"/api/v1/namespaces/{ns}/pods/{name}")["metadata"]["uid"]
        self.netns = f"bk-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "sleep", "100000"])
        self.cgroup = cgroup / f"pod{self.uid}"
        self.cgroup.mkdir()
        (self.cgroup / "cgroup.procs").write_text(str(self.proc.pid))

    def start(self) -> float:
        self.api_time = time.time()  # wall clock: the stages are compared with the agent's log
        self.kube.play_kubelet(self.ns, self.name, [self.ip])
        return time.monotonic()

    @property
    def workload(self) -> str:
        return workload_name(PodKey(self.ns, self.name))

    def programmed(self) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.netns, "nft", "list", "chain", "inet", "stockade", "inbound"],
                           capture_output=True, check=False)
        return r.returncode == 0

    def delete(self) -> None:
        self.kube.delete_pod(self.ns, self.name)
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
    ap.add_argument("--churn-rate", type=float, default=2.0, help="pods deleted and created per second, each")
    ap.add_argument("--agent-src", type=Path, help="run the node agent from this source tree (e.g. main's)")
    ap.add_argument("--json", type=Path, help="write the rows here (for a later --baseline)")
    ap.add_argument("--baseline", type=Path, help="rows of an earlier --json run, printed beside these")
    ap.add_argument("--per-pod-poll", action="store_true",
                    help="the node agent's per-pod protocol (a long-poll per pod; the default is one per node)")
    ap.add_argument("--pod-nft", action="store_true",
                    help="the node agent applies and reads pods' tables with nft processes (the path before netlink)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; pods' tables via "
          f"{'nft processes' if args.pod_nft else 'netlink'}; "
          f"{'per-pod protocol' if args.per_pod_poll else 'node agent default protocol'}")
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
                                      *(["--per-pod-poll"] if args.per_pod_poll else [])],
                                     stdout=out, stderr=subprocess.STDOUT, env=agent_env)
        kube = Kube(cluster)
        ns = kube.namespace(prefix="bench")
        hosts = iter(net.hosts())
        t0 = time.monotonic()
        for i in range(args.pods):
            p = SimPod(kube, ns, f"p{i}", "bench-node", str(next(hosts)), ("client", "server")[i % 2], cgroup)
            p.start()
            pods.append(p)
        while not all(p.programmed() for p in pods):
            time.sleep(0.2)
            if time.monotonic() - t0 > 600:
                raise SystemExit("pods not programmed in 600 s: " + log.read_text()[-2000:])
        print(f"{args.pods} pods programmed in {time.monotonic() - t0:.1f} s")
        time.sleep(2)
        rest_cpu, rest_rss = window(agent.pid, args.rest_seconds)
        # churn: delete the oldest and create a new pod, churn-rate of each per second; time each new pod
        seen: list[float] = []
        c0, _ = usage(agent.pid)
        tc = time.monotonic()
        n = args.pods
        pending: list[tuple[SimPod, float]] = []
        churned: list[tuple[SimPod, float]] = []  # new pods in churn, when the table was seen (wall clock)
        peak_rss = 0
        while time.monotonic() - tc < args.churn_seconds:
            step = time.monotonic()
            pods.pop(0).delete()
            p = SimPod(kube, ns, f"p{n}", "bench-node", str(next(hosts)), ("client", "server")[n % 2], cgroup)
            n += 1
            pending.append((p, p.start()))
            pods.append(p)
            for q, started in list(pending):
                if q.programmed():
                    seen.append(time.monotonic() - started)
                    churned.append((q, time.time()))
                    pending.remove((q, started))
            peak_rss = max(peak_rss, usage(agent.pid)[1])
            time.sleep(max(0.0, 1 / args.churn_rate - (time.monotonic() - step)))
        for q, started in pending:
            while not q.programmed():
                time.sleep(0.005)
            seen.append(time.monotonic() - started)
            churned.append((q, time.time()))
        c1, _ = usage(agent.pid)
        churn_cpu = (c1 - c0) / (time.monotonic() - tc) * 100
        applied = dict(re.findall(r"pod ([0-9a-f-]+): first policy applied ([0-9.]+) ms", log.read_text()))
        inside = [float(v) for v in applied.values()]
        in_churn = [float(applied[p.uid]) for p in pods[args.pods - len(seen):] if p.uid in applied] or [float("nan")]
        q = statistics.quantiles
        load = os.getloadavg()[0]
        rows = {
            "RSS at rest": f"{rest_rss / 2**20:.0f} MiB",
            "CPU at rest": f"{rest_cpu:.1f} % of one core",
            "RSS during churn (peak)": f"{peak_rss / 2**20:.0f} MiB",
            f"CPU during churn ({args.churn_rate:g} deletes + {args.churn_rate:g} creates/s)": f"{churn_cpu:.1f} %",
            "program a new pod's namespace: taken up -> first apply, p50 / p99":
                f"{statistics.median(inside):.1f} / {q(inside, n=100)[98]:.1f} ms (n={len(inside)})",
            "new pod during churn: taken up -> first apply, p50 / max":
                f"{statistics.median(in_churn):.1f} / {max(in_churn):.1f} ms (n={len(in_churn)})",
            "new pod: IP in the API -> table in its namespace, p50 / max":
                f"{statistics.median(seen) * 1000:.0f} / {max(seen) * 1000:.0f} ms (n={len(seen)})",
            "load average at the end": f"{load:.1f}",
        }
        print()
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
        time.sleep(0.5)  # the agent's stage lines follow its first-apply lines
        stage_rows, stage_values = stage_table(churned, log.read_text(), sync_times)
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
