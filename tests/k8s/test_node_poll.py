"""Kernel e2e on a real node, the node protocol (issue 15): ``stockade k8s node-agent --node-poll``.

The same real kubelet, pods and policy as ``test_node_agent.py`` (app=client -> app=server on
8080/tcp), with the node agent speaking for its pods with one request per node
(:mod:`stockade.k8s.node_poll`): batch enrolment, ONE long-poll for all pods, ack batches. A pod
relabel through the API flips a real connection inside the client pod's namespace within 1 s, and
the controller's own request counters show it came through the node's long-poll: no pod runtime
long-polled, acknowledged or heartbeated on its own, and every pod still converged on its own
revision.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.harness import bound, wait_for
from tests.k8s.conftest import Cluster, _free_port
from tests.k8s.kube import Kube, SyncThread, provision_client_server_policy, start_controller
from tests.k8s.node_fixture import Node
from tests.k8s.test_node_agent import PORT, SERVER, World, _delete_pods_and_pins, _flips_within, flows_reach_the_map

pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("k8s-node")]


@pytest.fixture(scope="module")
def poll_world(k8s_cluster: Cluster, k8s_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("nodepoll")
    ctl, api, key = start_controller(tmp, _free_port())
    sync: SyncThread | None = None
    agent: subprocess.Popen[bytes] | None = None
    log = tmp / "node-agent.log"
    try:
        provision_client_server_policy(api, PORT, "node poll e2e")
        sync = SyncThread(k8s_cluster, ctl.url, key).start()
        (tmp / "code").write_text(api.activation_code("k8s-nodes", mode="idle"))
        with log.open("wb") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "stockade.cli", "k8s", "node-agent", "--node", k8s_node.name,
                 "--controller", ctl.url, "--activation-code-file", str(tmp / "code"),
                 "--kubeconfig", str(k8s_cluster.kubeconfig), "--state-dir", str(tmp / "state"),
                 "--no-host-policy", "--node-poll"], stdout=out, stderr=subprocess.STDOUT)
        kube = Kube(k8s_cluster)
        ns = kube.namespace({"env": "dev"}, prefix="npoll")
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


def _route_count(world: World, route: str) -> float:
    """Requests the controller answered on ``route`` (its Prometheus counter, every status)."""
    text = world.api.http.get(str(world.api.http.base_url).removesuffix("/api/v1/") + "/metrics").text
    pattern = r'stockade_http_requests_total\{[^}]*route="' + re.escape(route) + r'"[^}]*\} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, text))


def test_a_change_reaches_the_pods_through_the_nodes_one_long_poll(poll_world: World) -> None:
    world = poll_world
    node_poll = "/agents/{agent_id}/pods/updates"
    assert _route_count(world, "/agents/{agent_id}/pods/enroll-batch") >= 1  # the pods came in a batch
    before = _route_count(world, node_poll)
    world.kube.label_pod(world.ns, "client", {"app": "other"})
    assert _flips_within(world, False, 1.0) <= bound(1.0)
    world.kube.label_pod(world.ns, "client", {"app": "client"})
    assert _flips_within(world, True, 1.0) <= bound(1.0)
    wls = [f"k8s.{world.ns}.server", f"k8s.{world.ns}.client"]
    assert wait_for(lambda: world.api.converged(wls), 30) is not None, world.log_tail()
    assert _route_count(world, node_poll) >= before + 2  # the node long-polled and was answered, per change
    assert _route_count(world, "/agents/{agent_id}/pods/acks") >= 1
    assert _route_count(world, "/agents/{agent_id}/pods/enroll") == 0
    assert _route_count(world, "/agents/{agent_id}/policy/wait") == 0  # --no-host-policy: nobody long-polls alone
    assert _route_count(world, "/agents/{agent_id}/ack") == 0
    identities = len(world.api.ok("GET", "/agents"))
    assert _route_count(world, "/agents/{agent_id}/heartbeat") <= identities  # one per pod runtime, at its start
    agents = [a for a in world.api.ok("GET", "/agents") if a["workload"] in wls and not a["revoked"]]
    assert len(agents) == 2 and all(a["status"] == "online" and a["converged"] for a in agents), agents


def test_pod_flows_reach_the_map_through_the_node_protocol(poll_world: World) -> None:
    """The pods' runtimes report their own flows (NFLOG in each pod's namespace) when the node polls for them."""
    flows_reach_the_map(poll_world)
