"""Kernel e2e on a real node: the node agent enforces real pods inside their own network namespaces.

A kubelet (built from Go modules) with Debian's containerd/runc/CNI bridge runs real busybox pods
(``k8s_node``). The cluster sync makes them workloads; ``stockade k8s node-agent`` (a real process,
as the DaemonSet runs it) finds each pod's namespace from its UID (cgroup + procfs), enrols the pod
with its node credential and programs the pod's policy inside that namespace. The policy allows
app=client -> app=server on 8080/tcp. Probes are real TCP connections made *inside the client
pod's namespace*, v4 and v6. The node agent runs with its defaults: the node protocol (one long-poll,
ack batch and batch enrolment for all its pods; ``test_node_per_pod.py`` runs ``--per-pod-poll``).

* a change reaches the pods through the node's one long-poll (the controller's request counters);
* the pods' flows (NFLOG in each pod's namespace) reach the map;
* a pod relabel through the API flips a real connection within 1 s (both ways);
* pod churn: pods labelled ``intruder`` try the server every 0.1 s from their first instant while
  pods are created and deleted; not one connection succeeds (the sandbox starts default-deny via
  the chained CNI plugin, then the pod's policy replaces it), while ``client`` pods created in the
  same churn do connect (the real policy replaced the default-deny);
* the node's other tables (kubelet's iptables KUBE-* chains) stay untouched, and a node can't
  enrol a pod bound to another node.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stockade.backends.common import in_netns
from stockade.k8s.podns import pin_name, pin_prefix
from tests.e2e.harness import Api, bound, load_note, wait_for
from tests.k8s.conftest import Cluster, _free_port
from tests.k8s.kube import Kube, SyncThread, provision_client_server_policy, start_controller
from tests.k8s.node_fixture import Node, pod_body

pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("k8s-node")]
PORT = 8080
SERVER = f"nc -ll -p {PORT} -e /bin/echo ok"


@dataclass
class World:
    node: Node
    kube: Kube
    api: Api
    ns: str
    agent: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]

    def pod(self, name: str) -> dict[str, Any]:
        got: dict[str, Any] = self.kube.ok("GET", f"/api/v1/namespaces/{self.ns}/pods/{name}")
        return got

    def create(self, name: str, labels: dict[str, str], script: str) -> None:
        self.kube.ok("POST", f"/api/v1/namespaces/{self.ns}/pods", json=pod_body(name, self.node.name, labels, script))

    def ips(self, name: str) -> tuple[str, str]:
        ips = [p["ip"] for p in self.pod(name)["status"].get("podIPs", [])]
        v4 = next(i for i in ips if ipaddress.ip_address(i).version == 4)
        v6 = next(i for i in ips if ipaddress.ip_address(i).version == 6)
        return v4, v6

    def running(self, name: str) -> bool:
        status = self.pod(name).get("status", {})
        return bool(status.get("phase") == "Running" and status.get("podIPs"))


@contextmanager
def node_world(k8s_cluster: Cluster, k8s_node: Node, tmp: Path, prefix: str, flags: tuple[str, ...]) -> Iterator[World]:
    """A controller, the sync and ``stockade k8s node-agent`` (with ``flags``) enforcing a server and a
    client pod of a fresh namespace, both converged."""
    ctl, api, key = start_controller(tmp, _free_port())
    sync: SyncThread | None = None
    agent: subprocess.Popen[bytes] | None = None
    log = tmp / "node-agent.log"
    try:
        provision_client_server_policy(api, PORT, f"node agent e2e ({prefix})")
        sync = SyncThread(k8s_cluster, ctl.url, key).start()
        code = api.activation_code("k8s-nodes", mode="idle")
        (tmp / "code").write_text(code)
        with log.open("wb") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "stockade.cli", "k8s", "node-agent", "--node", k8s_node.name,
                 "--controller", ctl.url, "--activation-code-file", str(tmp / "code"),
                 "--kubeconfig", str(k8s_cluster.kubeconfig), "--state-dir", str(tmp / "state"),
                 "--no-host-policy", *flags], stdout=out, stderr=subprocess.STDOUT)
        kube = Kube(k8s_cluster)
        ns = kube.namespace({"env": "dev"}, prefix=prefix)
        w = World(k8s_node, kube, api, ns, agent, log)
        w.create("server", {"app": "server"}, SERVER)
        w.create("client", {"app": "client"}, "sleep 3600")
        assert wait_for(lambda: w.running("server") and w.running("client"), 60), w.log_tail()
        wls = [f"k8s.{ns}.server", f"k8s.{ns}.client"]
        assert wait_for(lambda: api.converged(wls), 60) is not None, w.log_tail()
        yield w
    finally:
        if agent is not None:
            _delete_pods_and_pins(Kube(k8s_cluster), k8s_node)
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        if sync is not None:
            sync.stop()
        ctl.kill()


@pytest.fixture(scope="module")
def world(k8s_cluster: Cluster, k8s_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The node agent as deployed: its defaults (the node protocol)."""
    with node_world(k8s_cluster, k8s_node, tmp_path_factory.mktemp("nodeagent"), "node", ()) as w:
        yield w


def test_pod_flows_reach_the_map_per_app_and_namespace(world: World) -> None:
    """Pod agents report their flows (NFLOG inside the pod's namespace) like hosts; with ``k8s-namespace``
    declared, the map groups pods per app and namespace."""
    flows_reach_the_map(world)


def flows_reach_the_map(world: World) -> None:
    assert _connects(world, 4)
    client = f"group:app=client,k8s-namespace={world.ns}"
    server = f"group:app=server,k8s-namespace={world.ns}"

    def edge() -> bool:
        m = world.api.ok("GET", "/flows/map", params={"keys": "app,k8s-namespace"})
        return any(e["src"] == client and e["dst"] == server and f"{PORT}/tcp" in e["services"] for e in m["edges"])

    assert wait_for(edge, bound(30), interval=0.5) is not None, world.log_tail()
    m = world.api.ok("GET", "/flows/map", params={"keys": "app,k8s-namespace"})
    groups = {n["id"]: n["workloads"] for n in m["nodes"]}
    assert groups[server] == [f"k8s.{world.ns}.server"]


def _delete_pods_and_pins(kube: Kube, node: Node) -> None:
    """The node's pods deleted while the node agent runs, so it removes its namespace pins itself."""
    for p in kube.ok("GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={node.name}"})["items"]:
        kube.http.delete(f"/api/v1/namespaces/{p['metadata']['namespace']}/pods/{p['metadata']['name']}",
                         params={"gracePeriodSeconds": "0"})
    prefix = pin_prefix(node.name)
    wait_for(lambda: not any(n.startswith(prefix) for n in os.listdir("/run/netns")), 30)


def route_count(world: World, route: str) -> float:
    """Requests the controller answered on ``route`` (its Prometheus counter, every status)."""
    text = world.api.http.get(str(world.api.http.base_url).removesuffix("/api/v1/") + "/metrics").text
    pattern = r'stockade_http_requests_total\{[^}]*route="' + re.escape(route) + r'"[^}]*\} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, text))


def _pin(w: World, pod: str) -> str:
    return pin_name(w.pod(pod)["metadata"]["uid"], pin_prefix(w.node.name))


def _connects(w: World, family: int) -> bool:
    """A new TCP connection from inside the client pod's namespace to the server pod."""
    v4, v6 = w.ips("server")
    addr = v4 if family == 4 else v6

    def attempt() -> bool:
        with socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.settimeout(0.3)
            try:
                s.connect((addr, PORT))
                return s.recv(8).startswith(b"ok")
            except OSError:
                return False

    return in_netns(_pin(w, "client"), attempt)


def _flips_within(w: World, expect: bool, seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < bound(seconds) + 3:
        if _connects(w, 4) is expect and _connects(w, 6) is expect:
            return time.monotonic() - start
    raise AssertionError(f"connection not {'allowed' if expect else 'blocked'} ({load_note()}): {w.log_tail()}")


def test_each_pod_is_enforced_inside_its_own_namespace(world: World) -> None:
    for pod in ("server", "client"):
        listing = subprocess.run(["ip", "netns", "exec", _pin(world, pod), "nft", "list", "table", "inet", "stockade"],
                                 capture_output=True, text=True, check=True).stdout
        assert "chain inbound" in listing
        assert "chain forward" not in listing  # the CNI plugin's default-deny table was replaced by the policy
    assert _connects(world, 4) and _connects(world, 6)
    # kubelet's own iptables chains in the node's namespace are still there and untouched
    assert ":KUBE-FIREWALL" in subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True,
                                             check=True).stdout


def test_a_pods_first_policy_comes_with_its_enrolment_before_its_runtime_starts(world: World) -> None:
    """The fast path of a new pod: the node agent applies the policy that ``POST /pods/enroll`` brought
    (include_policy) in its start thread, before the pod's runtime exists or long-polls; the pods are
    enforced by that policy (test above: the client connects, the table is the policy's)."""
    logged = {uid: json.loads(v) for uid, v in re.findall(r"pod ([0-9a-f-]+): stages (\{.*\})", world.log.read_text())}
    for pod in ("server", "client"):
        stages = logged[world.pod(pod)["metadata"]["uid"]]
        # the namespace is looked for (and pinned) while the enrolment waits for the commit: either comes first
        assert stages["seen"] <= min(stages["enrolled"], stages["found"]), stages
        assert max(stages["enrolled"], stages["found"]) <= stages["applied"] <= stages["runtime"], stages
        # protection first, visibility right after: its flow reader is bound after the first apply (off the
        # path to "in force") but before its runtime exists, so before the node acknowledges the pod
        assert stages["applied"] <= stages["flows"] <= stages["runtime"], stages
        assert stages.get("agent-answered", float("inf")) > stages["applied"], stages


def test_a_change_reaches_the_pods_through_the_nodes_one_long_poll(world: World) -> None:
    """The default protocol: batch enrolment, ONE long-poll for all the node's pods carrying their acks. No pod
    runtime long-polled, acknowledged or heartbeated on its own (one heartbeat at its start), and every
    pod still converged on its own revision."""
    node_poll = "/agents/{agent_id}/pods/updates"
    assert route_count(world, "/agents/{agent_id}/pods/enroll-batch") >= 1  # the pods came in a batch
    before = route_count(world, node_poll)
    world.kube.label_pod(world.ns, "client", {"app": "other"})
    assert _flips_within(world, False, 1.0) <= bound(1.0)
    world.kube.label_pod(world.ns, "client", {"app": "client"})
    assert _flips_within(world, True, 1.0) <= bound(1.0)
    wls = [f"k8s.{world.ns}.server", f"k8s.{world.ns}.client"]
    assert wait_for(lambda: world.api.converged(wls), 30) is not None, world.log_tail()
    assert route_count(world, node_poll) >= before + 2  # the node long-polled and was answered, per change
    # the acks ride on the node's next long-poll (pods/acks only for an apply finishing while one is
    # out, session 10): no count of pods/acks to expect; `converged` above shows they all arrived
    assert route_count(world, "/agents/{agent_id}/pods/enroll") == 0
    assert route_count(world, "/agents/{agent_id}/policy/wait") == 0  # --no-host-policy: nobody long-polls alone
    assert route_count(world, "/agents/{agent_id}/ack") == 0
    identities = len(world.api.ok("GET", "/agents"))
    assert route_count(world, "/agents/{agent_id}/heartbeat") <= identities  # one per pod runtime, at its start
    agents = [a for a in world.api.ok("GET", "/agents") if a["workload"] in wls and not a["revoked"]]
    assert len(agents) == 2 and all(a["status"] == "online" and a["converged"] for a in agents), agents


def test_a_pod_relabel_in_the_api_flips_a_real_connection_on_a_real_node(world: World) -> None:
    assert _connects(world, 4) and _connects(world, 6)
    world.kube.label_pod(world.ns, "client", {"app": "other"})
    took = _flips_within(world, False, 1.0)
    print(f"relabel -> blocked in {took * 1000:.0f} ms ({load_note()})")
    assert took <= bound(1.0)
    world.kube.label_pod(world.ns, "client", {"app": "client"})
    took = _flips_within(world, True, 1.0)
    print(f"relabel back -> allowed in {took * 1000:.0f} ms ({load_note()})")
    assert took <= bound(1.0)


def _prober(server_v4: str) -> str:
    return (f"while :; do if echo x | nc -w 1 {server_v4} {PORT} 2>/dev/null | grep -q ok; then echo CONNECTED; "
            "else echo TRY; fi; sleep 0.1; done")


def _probe_from_node(addr: str) -> bool:
    """A TCP connection from the node's own namespace (no policy there) to a pod."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect((addr, PORT))
            return True
        except OSError:
            return False


def _watch_victims(world: World, victims: list[str], until: threading.Event, hits: list[str],
                   probes: list[int]) -> None:
    """Probe each victim pod from the node from the moment its IP is in the API until ``until``."""
    ips: dict[str, str] = {}
    while not until.is_set():
        for v in victims:
            if v not in ips:
                r = world.kube.http.get(f"/api/v1/namespaces/{world.ns}/pods/{v}")
                status = r.json().get("status", {}) if r.status_code == 200 else {}
                got = [p["ip"] for p in status.get("podIPs", []) if "." in p["ip"]]
                if not got:
                    continue
                ips[v] = got[0]
            probes[0] += 1
            if _probe_from_node(ips[v]):
                hits.append(v)


def _churn_round(world: World, round_: int, server_v4: str) -> tuple[int, int]:
    """Four intruders, two victims and two clients created together.

    Intruders (app=intruder) try the server every 0.1 s from their first instant; victims
    (app=victim, a server on 8080 that no rule opens) are probed from the node from the moment their
    IP appears in the API, i.e. while their containers start and before their own policy is applied:
    only the sandbox's default-deny stands then. Clients (app=client) must get through once their
    policy is in force. Returns (intruder attempts refused, victim probes refused)."""
    intruders = [f"intruder-{round_}-{i}" for i in range(4)]
    victims = [f"victim-{round_}-{i}" for i in range(2)]
    friends = [f"friend-{round_}-{i}" for i in range(2)]
    until, hits, probes = threading.Event(), [], [0]
    watcher = threading.Thread(target=_watch_victims, args=(world, victims, until, hits, probes), daemon=True)
    watcher.start()
    try:
        for name in victims:
            world.create(name, {"app": "victim"}, SERVER)
        for name in intruders:
            world.create(name, {"app": "intruder"}, _prober(server_v4))
        for name in friends:
            world.create(name, {"app": "client"}, _prober(server_v4))
        pods = intruders + victims + friends
        assert wait_for(lambda: all(world.running(p) for p in pods), 60), world.log_tail()
        uids = {p: world.pod(p)["metadata"]["uid"] for p in pods}

        def logs(p: str) -> str:
            return world.node.pod_log(world.ns, p, uids[p])

        # the clients get through once their policy is in force (so the probers really probe) ...
        assert wait_for(lambda: all("CONNECTED" in logs(p) for p in friends), bound(10)), world.log_tail()
        assert wait_for(lambda: all(logs(p).count("TRY") >= 3 for p in intruders), 30), world.log_tail()
        wls = [f"k8s.{world.ns}.{v}" for v in victims]
        assert wait_for(lambda: world.api.converged(wls), 30) is not None, world.log_tail()  # victims protected
    finally:
        until.set()
        watcher.join(10)
    assert not hits, f"victim pods reached from the node before/while protected: {sorted(set(hits))}"
    tries = 0
    for p in intruders:  # ... the intruders never did, from their first instant
        text = logs(p)
        assert "CONNECTED" not in text, f"{p} connected: {text[-500:]}"
        tries += text.count("TRY")
    for p in pods:
        world.kube.delete_pod(world.ns, p)
    return tries, probes[0]


def test_pod_churn_never_lets_a_blocked_pod_connect(world: World) -> None:
    server_v4 = world.ips("server")[0]
    rounds = [_churn_round(world, r, server_v4) for r in range(3)]
    tries, probes = sum(r[0] for r in rounds), sum(r[1] for r in rounds)
    assert probes > 20  # the victims were really probed while they started
    print(f"churn: 12 intruder pods, {tries} refused attempts; 6 victim pods probed {probes} times from their IP's "
          "first appearance, 0 connections; 6 client pods allowed")


def test_another_node_cannot_enrol_this_nodes_pods(world: World, tmp_path: Path) -> None:
    from stockade.agent.host import HostReport
    from stockade.agent.state import Credential, StateDir
    from stockade.agent_signature import new_private_key, public_key_text
    from stockade.errors import AuthError
    from stockade.k8s.node_poll import NodeControllerClient

    url = world.api.http.base_url
    controller = f"{url.scheme}://{url.host}:{url.port}"
    code = str(world.api.ok("POST", "/pairing-profiles/k8s-nodes/codes", 201)["code"])
    state = StateDir(tmp_path / "other-node")
    client = NodeControllerClient(controller)
    try:
        e = client.enroll(code, HostReport("node-other", "linux", ()), public_key_text(state.load_or_create_key()))
        client.use_credential(Credential(controller, e.agent_id, e.token, e.workload, state.key_path), None)
        for pod in ("server", "client"):  # bound to the real node, not to node-other
            with pytest.raises(AuthError, match="not bound to node 'node-other'"):
                client.enroll_pod(f"k8s.{world.ns}.{pod}", public_key_text(new_private_key()))
    finally:
        client.close()
    assert _connects(world, 4)  # the real node's pods are untouched
