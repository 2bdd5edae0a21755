"""Kernel e2e on a real node, the per-pod protocol (issue 15): ``stockade k8s node-agent --per-pod-poll``.

The node protocol (one long-poll, ack batch and batch enrolment per node: :mod:`stockade.k8s.node_poll`)
is the default and ``test_node_agent.py`` runs it. Here the same real kubelet, pods and policy
(app=client -> app=server on 8080/tcp) with the protocol of earlier sessions, still selectable: every
pod's runtime enrols, long-polls, acknowledges and heartbeats on its own. A relabel flips a real
connection within 1 s, the pods' flows reach the map, and the controller's request counters show the
node protocol's routes were not used.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import bound, wait_for
from tests.k8s.conftest import Cluster
from tests.k8s.node_fixture import Node
from tests.k8s.test_node_agent import World, _flips_within, flows_reach_the_map, node_world, route_count

pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("k8s-node")]


@pytest.fixture(scope="module")
def pod_world(k8s_cluster: Cluster, k8s_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with node_world(k8s_cluster, k8s_node, tmp_path_factory.mktemp("perpod"), "perpod", ("--per-pod-poll",)) as w:
        yield w


def test_pod_flows_reach_the_map_with_per_pod_polls(pod_world: World) -> None:
    flows_reach_the_map(pod_world)


def test_a_change_reaches_each_pods_own_long_poll(pod_world: World) -> None:
    world = pod_world
    before = route_count(world, "/agents/{agent_id}/policy/wait")
    world.kube.label_pod(world.ns, "client", {"app": "other"})
    assert _flips_within(world, False, 1.0) <= bound(1.0)
    world.kube.label_pod(world.ns, "client", {"app": "client"})
    assert _flips_within(world, True, 1.0) <= bound(1.0)
    wls = [f"k8s.{world.ns}.server", f"k8s.{world.ns}.client"]
    assert wait_for(lambda: world.api.converged(wls), 30) is not None, world.log_tail()
    assert route_count(world, "/agents/{agent_id}/policy/wait") >= before + 2  # the pods' own long-polls
    assert route_count(world, "/agents/{agent_id}/pods/enroll") >= 2
    for node_route in ("pods/updates", "pods/acks", "pods/enroll-batch"):
        assert route_count(world, "/agents/{agent_id}/" + node_route) == 0, node_route
