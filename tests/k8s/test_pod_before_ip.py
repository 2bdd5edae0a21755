"""Kernel e2e: a bound pod's policy is in force in its namespace before its IP exists, and it is a peer nowhere.

The path is real: kube-apiserver, the cluster sync, the controller and ``stockade k8s node-agent`` (a
process, as the DaemonSet runs it). The node is simulated the way bench/k8s.py does it (a network
namespace with a process in the cgroup ``pod<uid>``, found by the node agent exactly as on a real
node), so the moment the pod's sandbox exists and the moment its IP reaches the API are the test's to
choose: here the IP comes only after the test has checked the pod is programmed.

* the sync writes the bound pod at once as an address-less workload (its ``k8s-node`` label, no
  address), and its node agent enrols it, so the pod's namespace is programmed with its own policy
  as soon as the namespace exists - while the API still shows no IP;
* meanwhile it is in no peer set: the server's table (whose inbound set selects app=client) is not
  touched, not even re-applied (same table handle), and the server's revision does not move;
* the IP then makes it a peer by a set delta: the server's set gains the address, its table handle
  unchanged (a full apply replaces the table: a new handle).

On the code before address-less workloads the client's namespace stays unprogrammed until its IP.

And a change made inside a pod's namespace (its table flushed) is restored within a second or two by
the pod's change feed (nf_tables' netlink group in the pod's namespace), though the node agent here
reads a pod's table back only every 60 s: before the feed was on for pods, it stayed changed until then.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stockade.k8s.podns import pin_prefix
from tests.e2e.harness import Api, load_note, wait_for
from tests.k8s.conftest import Cluster, _free_port
from tests.k8s.kube import Kube, SyncThread, provision_client_server_policy, start_controller

pytestmark = pytest.mark.kernel
PORT = 8080
CGROUP_ROOT = Path("/sys/fs/cgroup/pids")


class SimPod:
    """A pod of the simulated node: created in the API now; ``sandbox()`` makes its namespace and process."""

    def __init__(self, kube: Kube, ns: str, name: str, node: str, app: str, cgroup: Path) -> None:
        self.kube, self.ns, self.name, self.cgroup_root = kube, ns, name, cgroup
        kube.pod(ns, name, {"app": app}, node=node)
        self.uid = str(kube.ok("GET", f"/api/v1/namespaces/{ns}/pods/{name}")["metadata"]["uid"])
        self.netns = f"h15g-{secrets.token_hex(4)}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroup = cgroup / f"pod{self.uid}"

    def sandbox(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "sleep", "100000"])
        self.cgroup.mkdir()
        (self.cgroup / "cgroup.procs").write_text(str(self.proc.pid))

    def nft(self, *args: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", self.netns, "nft", *args], capture_output=True, text=True,
                           check=False)
        return r.stdout if r.returncode == 0 else ""

    def table_handle(self) -> int | None:
        for obj in json.loads(self.nft("-j", "list", "tables") or '{"nftables": []}')["nftables"]:
            t = obj.get("table")
            if t and t["family"] == "inet" and t["name"] == "stockade":
                return int(t["handle"])
        return None

    def api_ips(self) -> list[str]:
        status = self.kube.ok("GET", f"/api/v1/namespaces/{self.ns}/pods/{self.name}").get("status", {})
        return [p["ip"] for p in status.get("podIPs") or []]

    def remove(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
            for _ in range(50):
                try:
                    self.cgroup.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


@dataclass
class World:
    kube: Kube
    api: Api
    ns: str
    node: str
    cgroup: Path
    log: Path
    pods: list[SimPod]

    def pod(self, name: str, app: str) -> SimPod:
        p = SimPod(self.kube, self.ns, name, self.node, app, self.cgroup)
        self.pods.append(p)
        return p

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture
def world(k8s_cluster: Cluster, tmp_path: Path) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ctl, api, key = start_controller(tmp_path, _free_port())
    node = f"h15g-{secrets.token_hex(3)}"
    cgroup = CGROUP_ROOT / f"stockade-test-{node}"
    cgroup.mkdir()
    sync: SyncThread | None = None
    agent: subprocess.Popen[bytes] | None = None
    log = tmp_path / "node-agent.log"
    kube = Kube(k8s_cluster)
    w = World(kube, api, kube.namespace({"env": "dev"}, prefix="h15g"), node, cgroup, log, [])
    try:
        provision_client_server_policy(api, PORT, "address-less pods")
        sync = SyncThread(k8s_cluster, ctl.url, key).start()
        (tmp_path / "code").write_text(api.activation_code("k8s-nodes", mode="idle"))
        with log.open("wb") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "stockade.cli", "k8s", "node-agent", "--node", node, "--controller", ctl.url,
                 "--activation-code-file", str(tmp_path / "code"), "--kubeconfig", str(k8s_cluster.kubeconfig),
                 "--state-dir", str(tmp_path / "state"), "--no-host-policy", "--log-level", "info",
                 "--pod-tamper-interval", "60"],  # a restore within seconds can only be the change feed's
                stdout=out, stderr=subprocess.STDOUT)
        yield w
    finally:
        for p in w.pods:
            kube.delete_pod(w.ns, p.name)
        prefix = pin_prefix(node)
        wait_for(lambda: not any(n.startswith(prefix) for n in os.listdir("/run/netns")), 15, 0.1)
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        for p in w.pods:
            p.remove()
        for n in os.listdir("/run/netns"):
            if n.startswith(prefix):
                subprocess.run(["ip", "netns", "del", n], check=False)
        if sync is not None:
            sync.stop()
        ctl.kill()
        cgroup.rmdir()


def _addresses(api: Api, name: str) -> list[str] | None:
    r = api.http.get(f"/workloads/{name}")
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return [a for i in r.json()["body"].get("interfaces", []) for a in i["addresses"]]


def test_a_bound_pod_is_programmed_before_its_ip_and_becomes_a_peer_by_a_set_delta(
        world: World, k8s_cluster: Cluster) -> None:
    w = world
    server_ip, client_ip = str(k8s_cluster.pod_v4[61]), str(k8s_cluster.pod_v4[62])
    server = w.pod("server", "server")
    server.sandbox()
    w.kube.play_kubelet(w.ns, "server", [server_ip])
    assert wait_for(lambda: "8080" in server.nft("list", "table", "inet", "stockade"), 30) is not None, w.tail()
    assert wait_for(lambda: w.api.converged([f"k8s.{w.ns}.server"]), 30) is not None, w.tail()
    handle = server.table_handle()
    assert handle is not None
    server_rev = w.api.agents()[f"k8s.{w.ns}.server"]["applied_revision"]

    client = w.pod("client", "client")
    name = f"k8s.{w.ns}.client"
    # bound, no sandbox, no IP: a workload already, with no address (a peer nowhere)
    assert wait_for(lambda: _addresses(w.api, name) == [], 10) is not None, w.tail()
    assert w.api.workload(name)["labels"]["k8s-node"] == w.node
    client.sandbox()
    took = wait_for(lambda: "8080" in client.nft("list", "table", "inet", "stockade"), 10, 0.005)
    assert took is not None, f"the client's namespace was not programmed before its IP ({load_note()}):\n{w.tail()}"
    print(f"sandbox -> the pod's policy in its namespace: {took * 1000:.0f} ms, no IP yet ({load_note()})")
    assert client.api_ips() == [] and _addresses(w.api, name) == []
    assert wait_for(lambda: w.api.converged([name]), 10) is not None, w.tail()
    # the server's table was not touched: no re-apply, no member (its app=client set is still empty),
    # not even a new revision
    assert server.table_handle() == handle
    assert w.api.agents()[f"k8s.{w.ns}.server"]["applied_revision"] == server_rev
    assert client_ip not in server.nft("list", "table", "inet", "stockade")

    w.kube.play_kubelet(w.ns, "client", [client_ip])
    assert wait_for(lambda: client_ip in server.nft("list", "table", "inet", "stockade"), 10) is not None, w.tail()
    assert server.table_handle() == handle, "the client's IP reached the server by a full re-apply, not a set delta"
    assert _addresses(w.api, name) == [client_ip]
    # the client's runtime never reported its (empty, at its start) interfaces over the sync's addresses
    time.sleep(1.0)
    assert _addresses(w.api, name) == [client_ip]


def test_tampering_inside_a_pods_namespace_is_restored_by_its_change_feed(world: World, k8s_cluster: Cluster) -> None:
    w = world
    pod = w.pod("target", "server")
    pod.sandbox()
    w.kube.play_kubelet(w.ns, "target", [str(k8s_cluster.pod_v4[63])])
    assert wait_for(lambda: "8080" in pod.nft("list", "table", "inet", "stockade"), 30) is not None, w.tail()
    assert wait_for(lambda: w.api.converged([f"k8s.{w.ns}.target"]), 30) is not None, w.tail()
    before = pod.nft("list", "chain", "inet", "stockade", "inbound")
    assert before
    for tamper in (["flush", "chain", "inet", "stockade", "inbound"], ["delete", "table", "inet", "stockade"]):
        subprocess.run(["ip", "netns", "exec", pod.netns, "nft", *tamper], check=True)
        took = wait_for(lambda: pod.nft("list", "chain", "inet", "stockade", "inbound") == before, 10, 0.01)
        assert took is not None, f"{tamper}: not restored within 10 s ({load_note()}):\n{w.tail()}"
        assert took < 3.0, f"{tamper}: restored after {took:.1f} s, not by the change feed ({load_note()})"
        print(f"{' '.join(tamper)} inside the pod: restored in {took * 1000:.0f} ms ({load_note()})")
