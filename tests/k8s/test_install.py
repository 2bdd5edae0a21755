"""The install, for real: the image built from Debian packages + the wheel, imported into the node's
containerd, the Helm chart installed on the real cluster, and the node agent DaemonSet's pod - not a
process of the test - enforcing the other pods of the real node.

* ``tests/k8s/image.sh build``: deploy/image/build.sh's docker archive, cached outside the clone by
  a hash of its inputs; imported with ``ctr -n k8s.io images import`` (no registry);
* kube-controller-manager (daemonset + root-ca-cert-publisher controllers) and kube-scheduler, built
  from the apiserver's own k8s.io/kubernetes module, run for this module only;
* ``helm install`` (helm built from Go modules) of deploy/helm/stockade with the sync left beside the
  controller (``sync: false``) and the apiserver's address for the host-network agent (no kube-proxy
  here); the DaemonSet controller creates the pod, the scheduler binds it, the kubelet runs it
  (hostNetwork, hostPID, privileged, the API token from the projected volume);
* the pod's init container installs the CNI plugin's host wrapper, which runs the plugin inside the
  agent's container: pods created afterwards start default-deny before their policy arrives;
* a ruleset allows app=client -> app=server 8080/tcp: busybox ``nc`` probes in a client pod connect,
  the same probes in an intruder pod never do (from its first instant), v4; and the server pod's
  table is inside its own namespace, pinned by the agent in the pod (Bidirectional /run/netns).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.k8s.podns import pin_name, pin_prefix
from tests.e2e.harness import Api, bound, wait_for
from tests.k8s.conftest import SCRIPT, Cluster, _free_port
from tests.k8s.kube import Kube, SyncThread, provision_client_server_policy, start_controller
from tests.k8s.node_fixture import Node, pod_body
from tests.k8s.test_helm import CHART, run_helm

pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("k8s-node")]
IMAGE_SCRIPT = Path(__file__).with_name("image.sh")
PORT = 8080
SERVER = f"nc -ll -p {PORT} -e /bin/echo ok"
STATE = Path("/var/lib/stockade")  # the DaemonSet's state hostPath (the chart's)


@dataclass
class Installed:
    node: Node
    kube: Kube
    api: Api
    ns: str  # the test pods' namespace
    system_ns: str  # the release's
    log_dir: Path

    def pod(self, name: str, ns: str | None = None) -> dict[str, Any]:
        got: dict[str, Any] = self.kube.ok("GET", f"/api/v1/namespaces/{ns or self.ns}/pods/{name}")
        return got

    def running(self, name: str) -> bool:
        status = self.pod(name).get("status", {})
        return bool(status.get("phase") == "Running" and status.get("podIPs"))

    def agent_pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kube.ok("GET", f"/api/v1/namespaces/{self.system_ns}/pods")["items"]
        return items

    def agent_log(self) -> str:
        """The DaemonSet pod's container output (kubelet's log file)."""
        out = []
        for p in self.agent_pods():
            d = self.node.node_dir / "pod-logs" / f"{self.system_ns}_{p['metadata']['name']}_{p['metadata']['uid']}"
            out += [f.read_text()[-3000:] for f in sorted(d.glob("*/*.log"))]
        return "\n".join(out) or "(no agent pod log)"

    def logs(self, name: str) -> str:
        return self.node.pod_log(self.ns, name, self.pod(name)["metadata"]["uid"])


def _image(node: Node) -> str:
    """Build (or take from the cache) the image and import it into the node's containerd; returns its tag."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is needed to build the image (.ci/run installs it)")
    tar = subprocess.run([str(IMAGE_SCRIPT), "build"], capture_output=True, text=True, check=False, timeout=1800)
    assert tar.returncode == 0, tar.stderr[-3000:]
    tag = subprocess.run([str(IMAGE_SCRIPT), "tag"], capture_output=True, text=True, check=True).stdout.strip()
    sock = (node.node_dir / "sock").read_text().strip()
    subprocess.run(["ctr", "--address", sock, "-n", "k8s.io", "images", "import", tar.stdout.strip()],
                   check=True, capture_output=True, timeout=300)
    return tag


@pytest.fixture(scope="module")
def installed(k8s_cluster: Cluster, k8s_node: Node, helm: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("install")
    tag = _image(k8s_node)
    wrapper = k8s_node.node_dir / "cni-bin" / "stockade-default-deny"
    node_wrapper = wrapper.read_text()  # the node harness's own; the chart's init container replaces it
    shutil.rmtree(STATE / "node", ignore_errors=True)  # an earlier run's credential names another controller
    state_existed = STATE.exists()
    env = {**os.environ, "K8S_RUN": str(k8s_cluster.run_dir)}
    kube = Kube(k8s_cluster)
    ctl, api, key = start_controller(tmp, _free_port())
    sync: SyncThread | None = None
    system_ns = kube.namespace(prefix="stockade")
    release = False
    try:
        provision_client_server_policy(api, PORT, "install e2e")
        sync = SyncThread(k8s_cluster, ctl.url, key).start()
        code = api.activation_code("k8s-nodes", mode="idle")
        kube.ok("POST", f"/api/v1/namespaces/{system_ns}/secrets",
                json={"metadata": {"name": "stockade-node-code"}, "stringData": {"code": code}})
        subprocess.run([str(SCRIPT), "start-controllers", str(k8s_cluster.run_dir)], env=env, check=True, timeout=60)
        values = {"controller": ctl.url, "image": tag, "imagePullPolicy": "Never", "hostPolicy": False,
                  "ca": False, "sync": False, "cniBinDir": str(wrapper.parent),
                  "apiServer": k8s_cluster.url.removeprefix("https://")}
        (tmp / "values.yaml").write_text(yaml.safe_dump(values))
        helm_env = ["--kubeconfig", str(k8s_cluster.kubeconfig), "--namespace", system_ns]
        r = run_helm(helm, tmp, "install", "stockade", str(CHART), "-f", str(tmp / "values.yaml"), *helm_env)
        assert r.returncode == 0, r.stdout + r.stderr
        release = True
        w = Installed(k8s_node, kube, api, kube.namespace({"env": "dev"}, prefix="inst"), system_ns, tmp)

        def agent_running() -> bool:
            pods = w.agent_pods()
            return len(pods) == 1 and pods[0].get("status", {}).get("phase") == "Running" and "node-agent.pid" in {
                p.name for p in (STATE / "node").glob("*.pid")}

        assert wait_for(agent_running, 120), f"{w.agent_pods()} {w.agent_log()}"
        yield w
    finally:
        if release:
            _delete_pods_while_the_agent_runs(kube, k8s_node)
            r = run_helm(helm, tmp, "uninstall", "stockade", "--kubeconfig", str(k8s_cluster.kubeconfig),
                         "--namespace", system_ns)
            assert r.returncode == 0, r.stdout + r.stderr
        subprocess.run([str(SCRIPT), "stop-controllers", str(k8s_cluster.run_dir)], env=env, check=False, timeout=60)
        for p in kube.ok("GET", f"/api/v1/namespaces/{system_ns}/pods")["items"]:  # no garbage collector here
            kube.http.delete(f"/api/v1/namespaces/{system_ns}/pods/{p['metadata']['name']}",
                             params={"gracePeriodSeconds": "0"})
        wait_for(lambda: not kube.ok("GET", f"/api/v1/namespaces/{system_ns}/pods")["items"], 60)
        wrapper.write_text(node_wrapper)  # the node's other tests run their own agent beside the kubelet
        shutil.rmtree(STATE / "node" if state_existed else STATE, ignore_errors=True)
        if sync is not None:
            sync.stop()
        ctl.kill()


def _delete_pods_while_the_agent_runs(kube: Kube, node: Node) -> None:
    """The test pods (not the agent's) deleted first, so the agent in the pod removes its namespace pins."""
    for p in kube.ok("GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={node.name}"})["items"]:
        m = p["metadata"]
        if m["namespace"].startswith("inst-"):
            kube.http.delete(f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                             params={"gracePeriodSeconds": "0"})
    prefix = pin_prefix(node.name)
    wait_for(lambda: not any(n.startswith(prefix) for n in os.listdir("/run/netns")), 30)


def _prober(server_v4: str) -> str:
    return (f"while :; do if echo x | nc -w 1 {server_v4} {PORT} 2>/dev/null | grep -q ok; then echo CONNECTED; "
            "else echo TRY; fi; sleep 0.1; done")


def test_the_chart_runs_the_agent_pod_on_the_node_and_it_enforces_the_other_pods(installed: Installed) -> None:
    w = installed
    agent = w.agent_pods()[0]
    assert agent["spec"]["nodeName"] == w.node.name  # bound by the scheduler, created by the DaemonSet controller
    assert agent["spec"]["hostNetwork"] and agent["spec"]["hostPID"]
    wrapper = (w.node.node_dir / "cni-bin" / "stockade-default-deny").read_text()
    assert "nsenter" in wrapper and "/opt/stockade/bin/python" in wrapper  # the init container's host wrapper
    w.kube.ok("POST", f"/api/v1/namespaces/{w.ns}/pods", json=pod_body("server", w.node.name, {"app": "server"},
                                                                         SERVER))
    assert wait_for(lambda: w.running("server"), 60), w.agent_log()
    server_v4 = next(p["ip"] for p in w.pod("server")["status"]["podIPs"] if ipaddress.ip_address(p["ip"]).version == 4)
    for name, app in (("intruder", "intruder"), ("client", "client")):
        w.kube.ok("POST", f"/api/v1/namespaces/{w.ns}/pods", json=pod_body(name, w.node.name, {"app": app},
                                                                             _prober(server_v4)))
    assert wait_for(lambda: w.running("client") and w.running("intruder"), 60), w.agent_log()
    workloads = [f"k8s.{w.ns}.{p}" for p in ("server", "client", "intruder")]
    assert wait_for(lambda: w.api.converged(workloads), bound(30)) is not None, w.agent_log()
    assert wait_for(lambda: "CONNECTED" in w.logs("client"), bound(10)), w.logs("client")[-300:] + w.agent_log()
    started = time.monotonic()
    assert wait_for(lambda: w.logs("intruder").count("TRY") >= 10, 30), w.logs("intruder")[-300:]
    assert "CONNECTED" not in w.logs("intruder"), w.logs("intruder")[-500:]
    # the pod's policy is in the pod's own namespace, pinned on the host by the agent inside its container
    pin = pin_name(w.pod("server")["metadata"]["uid"], pin_prefix(w.node.name))
    listing = subprocess.run(["ip", "netns", "exec", pin, "nft", "list", "table", "inet", "stockade"],
                             capture_output=True, text=True, check=True).stdout
    assert "chain inbound" in listing and "chain forward" not in listing  # the policy replaced the default-deny
    print(f"agent pod {agent['metadata']['name']} enforcing: client connected, intruder refused "
          f"{w.logs('intruder').count('TRY')} times ({time.monotonic() - started:.1f} s)")
