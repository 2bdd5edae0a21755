"""Kernel e2e: a NetworkPolicy created in the apiserver blocks and allows a real connection.

The whole path: apiserver -> cluster sync (``--network-policies``, pods in selective mode) ->
the controller's ``network-policies`` kind -> a real ``stockade agent`` inside the server pod's
network namespace (nftables) -> the kernel. Two "pods" are lab namespaces whose addresses the
harness patches into the pods' status (it plays the kubelet). Steps: no policy (selective: open);
default-deny ingress in the namespace (blocked); plus an allow from ``role=client`` on 8080/tcp
(allowed); the client relabelled (blocked again, a peer-set change); the policies deleted (open).
Each flip must happen within 1 s (stretched by the machine's load, as every e2e bound).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from stockade.lab import HostSpec, Lab, Probe, ProbeKind
from stockade.model import EnforcementMode
from stockade.model.addresses import IPAddress
from tests.e2e.harness import AgentProcess, Api, ControllerLink, ControllerProcess, bound, load_note, wait_for
from tests.k8s.conftest import Cluster
from tests.k8s.kube import Kube, SyncThread

pytestmark = pytest.mark.kernel
PORT = 8080
NETPOL = "/apis/networking.k8s.io/v1"


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
    server: tuple[IPAddress, IPAddress]
    client: tuple[IPAddress, IPAddress]
    agent: AgentProcess


@pytest.fixture(scope="module")
def world(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("netpol-e2e")
    # addresses no other test of the session cluster uses (deleted namespaces never finish terminating
    # here, so a pod of another module keeps its address: test_sync uses 5-51, pod_enforcement 10-11)
    v4, v6 = k8s_cluster.pod_v4, k8s_cluster.pod_v6
    server: tuple[IPAddress, IPAddress] = (v4[130], v6[0x130])
    client: tuple[IPAddress, IPAddress] = (v4[131], v6[0x131])
    with Lab([HostSpec("server", server, (PORT,)), HostSpec("client", client)]) as lab:
        link = ControllerLink(lab, f"{v4[2]}/24", f"{v6[2]}/64")
        ctl = ControllerProcess(tmp / "controller", str(v4[2]), _free_port("127.0.0.1"), tmp / "controller.log")
        (tmp / "controller").mkdir()
        sync: SyncThread | None = None
        agent: AgentProcess | None = None
        try:
            ctl.start()
            api = Api(ctl.url, ctl.first_run["user"], ctl.first_run["password"], ctl.ca_cert)
            failsafe = {"name": "default", "controller": [str(v4[2]), str(v6[2])], "controller_port": ctl.port}
            r = api.http.put("/failsafe/default", json=failsafe)  # the agent's path to the controller stays open
            if r.status_code == 404:
                api.ok("POST", "/failsafe", 201, json=failsafe)
            api.ok("POST", "/policy/provision", 201, json={"message": "netpol e2e"})
            key = str(api.ok("POST", "/api-keys", 201, json={"name": "k8s-sync", "role": "admin"})["key"])
            kube = Kube(k8s_cluster)
            ns = kube.namespace({}, prefix="npe2e")
            for pod, addrs in (("server", server), ("client", client)):
                kube.pod(ns, pod, {"role": pod})
                kube.play_kubelet(ns, pod, [str(a) for a in addrs])
            sync = SyncThread(k8s_cluster, ctl.url, key, ca_cert=ctl.ca_cert, network_policies=True,
                              mode=EnforcementMode.SELECTIVE).start()
            wl = f"k8s.{ns}.server"
            assert wait_for(lambda: api.http.get(f"/workloads/{wl}").status_code == 200, 30) is not None
            code = api.adoption_code("pods", wl)
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
    w.lab.flush_conntrack()
    return w.lab.probe([Probe("client", "server", ProbeKind.TCP, w.client[i], w.server[i], PORT)],
                       timeout=0.3)[0].succeeded


def _flips_within(w: World, expect: bool, seconds: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < bound(seconds) + 3:
        if _connects(w, 4) is expect and _connects(w, 6) is expect:
            took = time.monotonic() - start
            print(f"{what}: {'allowed' if expect else 'blocked'} in {took * 1000:.0f} ms ({load_note()})")
            return took
    raise AssertionError(f"{what}: not {'allowed' if expect else 'blocked'} ({load_note()}): {w.agent.log_tail()}")


def test_networkpolicies_in_the_api_flip_a_real_connection(world: World) -> None:
    w = world
    assert _connects(w, 4) and _connects(w, 6)  # selective, no policy: open
    base = f"{NETPOL}/namespaces/{w.ns}/networkpolicies"
    w.kube.ok("POST", base, json={"metadata": {"name": "deny"}, "spec": {"podSelector": {},
                                                                         "policyTypes": ["Ingress"]}})
    assert _flips_within(w, False, 1.0, "default deny created") <= bound(1.0)
    w.kube.ok("POST", base, json={"metadata": {"name": "from-client"}, "spec": {
        "podSelector": {"matchLabels": {"role": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": PORT}]}]}})
    assert _flips_within(w, True, 1.0, "allow from role=client") <= bound(1.0)
    w.kube.label_pod(w.ns, "client", {"role": "other"})
    assert _flips_within(w, False, 1.0, "client relabelled") <= bound(1.0)
    w.kube.label_pod(w.ns, "client", {"role": "client"})
    assert _flips_within(w, True, 1.0, "client relabelled back") <= bound(1.0)
    w.kube.ok("DELETE", f"{base}/from-client")
    w.kube.ok("DELETE", f"{base}/deny")
    w.kube.label_pod(w.ns, "client", {"role": "other"})
    assert _flips_within(w, True, 1.0, "policies deleted") <= bound(1.0)
