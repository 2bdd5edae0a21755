"""Kernel e2e: a pod relabel through the Kubernetes API flips a real TCP connection within 1 s.

Two "pods" are lab network namespaces on one bridge (the harness plays their kubelet: it patches
each pod's status with the namespace's addresses). The cluster sync turns them into workloads; a
real ``stockade agent`` runs inside the server pod's namespace (enrolled as that pod's workload,
programming nftables there). The policy allows app=client -> app=server on 8080/tcp. Relabelling
the client pod through the apiserver must block, then allow again, a real connection.

This proves the path API -> sync -> controller -> agent -> kernel inside a pod's namespace. It is
not yet the node agent of issue 15 (one agent per node finding every local pod's namespace):
here one agent per pod namespace stands in for it.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from stockade.lab import HostSpec, Lab, Probe, ProbeKind
from tests.e2e.harness import (
    AgentProcess,
    Api,
    ControllerLink,
    ControllerProcess,
    bound,
    load_note,
    nft_table,
    wait_for,
)
from tests.k8s.conftest import Cluster
from tests.k8s.kube import Kube, SyncThread

pytestmark = pytest.mark.kernel
PORT = 8080


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class World:
    lab: Lab
    api: Api
    kube: Kube
    ns: str
    server: tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]
    client: tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]
    agent: AgentProcess


@pytest.fixture(scope="module")
def world(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("pods")
    v4, v6 = k8s_cluster.pod_v4, k8s_cluster.pod_v6
    server = (v4[10], v6[0x10])
    client = (v4[11], v6[0x11])
    with Lab([HostSpec("server", server, (PORT,)), HostSpec("client", client)]) as lab:
        link = ControllerLink(lab, f"{v4[1]}/24", f"{v6[1]}/64")
        ctl = ControllerProcess(tmp / "controller", str(v4[1]), _free_port("127.0.0.1"), tmp / "controller.log")
        (tmp / "controller").mkdir()
        sync: SyncThread | None = None
        agent: AgentProcess | None = None
        try:
            ctl.start()
            api = Api(ctl.url, ctl.first_run["user"], ctl.first_run["password"], ctl.ca_cert)
            for name, values in (("app", []), ("env", ["prod", "dev"])):
                r = api.http.put(f"/label-keys/{name}", json={"name": name, "values": values})
                if r.status_code == 404:
                    api.ok("POST", "/label-keys", 201, json={"name": name, "values": values})
            port = ctl.port
            failsafe = {"name": "default", "controller": [str(v4[1]), str(v6[1])], "controller_port": port}
            r = api.http.put("/failsafe/default", json=failsafe)  # the agent's path to the controller stays open
            if r.status_code == 404:
                api.ok("POST", "/failsafe", 201, json=failsafe)
            else:
                assert r.status_code == 200, r.text
            api.ok("POST", "/services", 201, json={"name": "web-8080", "ports": [f"{PORT}/tcp"]})
            api.ok("POST", "/rulesets", 201, json={"name": "pods", "scope": "all", "rules": [
                {"consumers": [{"labels": {"app": "client"}}], "providers": [{"labels": {"app": "server"}}],
                 "services": ["web-8080"]}]})
            api.ok("POST", "/policy/provision", 201, json={"message": "k8s e2e"})
            key = str(api.ok("POST", "/api-keys", 201, json={"name": "k8s-sync", "role": "admin"})["key"])

            kube = Kube(k8s_cluster)
            ns = kube.namespace({"env": "dev"}, prefix="e2e")
            for pod, addrs in (("server", server), ("client", client)):
                kube.pod(ns, pod, {"app": pod})
                kube.play_kubelet(ns, pod, [str(a) for a in addrs])
            sync = SyncThread(k8s_cluster, ctl.url, key, ca_cert=ctl.ca_cert).start()
            wl = f"k8s.{ns}.server"
            assert wait_for(lambda: api.http.get(f"/workloads/{wl}").status_code == 200, 30) is not None

            code = api.adoption_code("pods", wl)  # enrols as the pod's existing workload (labels, mode kept)
            agent = AgentProcess(wl, lab.netns("server"), tmp / "agent", ctl.url, code, tmp / "agent.log",
                                 ca_cert=ctl.ca_cert)
            agent.start()
            assert wait_for(lambda: api.converged([wl]), 60) is not None, agent.log_tail()
            yield World(lab, api, kube, ns, server, client, agent)
        finally:
            if agent is not None:
                agent.stop()
            if sync is not None:
                sync.stop()
            ctl.kill()
            link.remove()


def _connects(w: World, family: int) -> bool:
    i = 0 if family == 4 else 1
    probe = Probe("client", "server", ProbeKind.TCP, w.client[i], w.server[i], PORT)
    w.lab.flush_conntrack()
    return w.lab.probe([probe], timeout=0.3)[0].succeeded


def _flips_within(w: World, expect: bool, seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < bound(seconds) + 3:
        if _connects(w, 4) is expect and _connects(w, 6) is expect:
            return time.monotonic() - start
    raise AssertionError(f"connection not {'allowed' if expect else 'blocked'} ({load_note()}): {w.agent.log_tail()}")


def test_a_pod_relabel_in_the_api_flips_a_real_connection(world: World) -> None:
    assert _connects(world, 4) and _connects(world, 6)
    world.kube.label_pod(world.ns, "client", {"app": "other"})
    took = _flips_within(world, False, 1.0)
    print(f"relabel -> blocked in {took * 1000:.0f} ms ({load_note()})")
    assert took <= bound(1.0)
    world.kube.label_pod(world.ns, "client", {"app": "client"})
    took = _flips_within(world, True, 1.0)
    print(f"relabel back -> allowed in {took * 1000:.0f} ms ({load_note()})")
    assert took <= bound(1.0)


def test_the_policy_is_programmed_inside_the_server_pods_namespace_only(world: World) -> None:
    assert "chain inbound" in nft_table(world.lab, "server")
    assert nft_table(world.lab, "client") == ""  # no agent there: untouched
