"""A real Kubernetes node for the tests: kubelet (built from Go modules) + Debian's containerd, runc and CNI.

``k8s_node`` (session scope; tests/k8s/node/node.sh does the work) builds kubelet once into the
harness's cache (``tests/k8s/k8s.sh build node``, outside the clone) and the two local images
(pause from our own pause.c, busybox from Debian's busybox-static), then starts one node
registered with the session's apiserver: pods bound to it (``spec.nodeName``, no scheduler;
``imagePullPolicy: Never``, no registry) get real sandboxes, network namespaces and IPs from the
CNI bridge, v4 and v6, and start default-deny (the chained ``stockade-default-deny`` plugin).

One kubelet per machine (it has hard-coded host paths), so the fixture holds a machine-wide lock
while its node runs (a concurrent session waits for it); the node's pod ranges get ``blackhole``
routes like the cluster's. On teardown the test pods are deleted through the API while the kubelet
still runs (so CNI DEL releases addresses and namespaces), then node.sh stops exactly what it
started and restores what kubelet changed (iptables KUBE-* chains, sysctls).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import stockade
from tests.k8s.conftest import SCRIPT, Cluster, _free_port, blackholed
from tests.k8s.kube import Kube

NODE_SCRIPT = Path(__file__).with_name("node") / "node.sh"
LOCK = Path("/run/lock/stockade-k8s-node.lock")
BUSYBOX = "stockade.local/busybox:1"


@dataclass(frozen=True)
class Node:
    name: str
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network
    node_dir: Path
    bridge: str

    def pod_log(self, ns: str, pod: str, uid: str) -> str:
        """The container ``c``'s output (kubelet's log file; no exec/logs API needed)."""
        d = self.node_dir / "pod-logs" / f"{ns}_{pod}_{uid}" / "c"
        return "".join(p.read_text() for p in sorted(d.glob("*.log"))) if d.exists() else ""


def pod_body(name: str, node: str, labels: dict[str, str], script: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node, "automountServiceAccountToken": False, "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0, "restartPolicy": "Never",
            "containers": [{"name": "c", "image": BUSYBOX, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", script]}],
        },
    }


def _bin_dir(env: dict[str, str]) -> Path:
    out = subprocess.run([str(SCRIPT), "bin-dir"], env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def k8s_node(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("a real node needs root")
    missing = [b for b in ("containerd", "runc", "ctr", "gcc") if shutil.which(b) is None]
    missing += [p for p in ("/usr/lib/cni/bridge", "/bin/busybox") if not Path(p).exists()]
    if missing:
        pytest.skip(f"a real node needs {', '.join(missing)} (.ci/run installs them)")
    env = dict(os.environ)
    if not (_bin_dir(env) / "kubelet").exists():
        if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
            pytest.skip("Go is needed to build kubelet once (tests/k8s/k8s.sh build node)")
        subprocess.run([str(SCRIPT), "build", "node"], env=env, check=True, timeout=3600)
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = LOCK.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one node per machine: wait for another session's node to stop
    r = secrets.randbelow(256)
    name = f"node-{secrets.token_hex(3)}"
    v4 = ipaddress.IPv4Network(f"10.245.{r}.0/24")
    v6 = ipaddress.IPv6Network(f"fd45:245:0:{r:x}::/64")
    run_dir = tmp_path_factory.mktemp("node")
    env.update({
        "K8S_RUN": str(k8s_cluster.run_dir), "NODE_NAME": name, "NODE_V4": str(v4), "NODE_V6": str(v6),
        "KUBELET_PORT": str(_free_port()), "KUBELET_HEALTHZ_PORT": str(_free_port()),
        "STOCKADE_PYTHON": sys.executable, "STOCKADE_SRC": str(Path(stockade.__file__).parents[1]),
    })
    kube = Kube(k8s_cluster)
    try:
        with blackholed(v4, v6):
            try:
                subprocess.run([str(NODE_SCRIPT), "start", str(run_dir)], env=env, check=True, timeout=300)
                values = dict(line.split("=", 1) for line in (run_dir / "node" / "env").read_text().split())
                yield Node(name, v4, v6, Path(values["NODE_DIR"]), values["BRIDGE"])
            finally:
                _delete_pods(kube, name)
                subprocess.run([str(NODE_SCRIPT), "stop", str(run_dir)], env=env, check=False, timeout=180)
                kube.http.delete(f"/api/v1/nodes/{name}")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _delete_pods(kube: Kube, node: str) -> None:
    """Every pod bound to ``node``, deleted while its kubelet runs (CNI DEL frees IPs and namespaces)."""
    pods = kube.ok("GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={node}"})["items"]
    for p in pods:
        m = p["metadata"]
        kube.http.delete(f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}", params={"gracePeriodSeconds": "0"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not kube.ok("GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={node}"})["items"]:
            return
        time.sleep(0.2)
