"""The cluster sync with NetworkPolicies, against a real kube-apiserver and a real controller process.

NetworkPolicies created, changed and deleted through the apiserver reach the controller's
``network-policies`` kind and, at once, the pods' compiled host policies; a pod relabel changes
only peer-set members (same rules); an SCTP port is a real rule (it was isolate-only and an Event
before SCTP was supported); an inexpressible policy (an unknown protocol, which the apiserver
refuses, so its watch event is handed to the running sync) is stored isolate-only and reported
as a Warning Event on the NetworkPolicy.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from stockade.model import EnforcementMode
from tests.e2e.harness import Api, ControllerProcess, wait_for
from tests.k8s.conftest import Cluster
from tests.k8s.kube import Kube, SyncThread, start_controller

NETPOL = "/apis/networking.k8s.io/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def setup(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Kube, SyncThread]]:
    ctl: ControllerProcess
    ctl, api, key = start_controller(tmp_path_factory.mktemp("ctl"), _free_port())
    sync = SyncThread(k8s_cluster, ctl.url, key, network_policies=True, mode=EnforcementMode.SELECTIVE)
    try:
        sync.start()
        yield api, Kube(k8s_cluster), sync
    finally:
        sync.stop()
        ctl.kill()


def _host_policy(api: Api, workload: str) -> dict[str, Any] | None:
    r = api.http.get(f"/workloads/{workload}/host-policy")
    return r.json()["policy"] if r.status_code == 200 else None


def _inbound(api: Api, workload: str) -> list[tuple[str, str]]:
    hp = _host_policy(api, workload)
    return [(r["action"], r["rule_id"]) for r in (hp or {}).get("rules", []) if r["direction"] == "in"]


def _members(api: Api, workload: str, rule_id: str) -> list[str]:
    hp = _host_policy(api, workload) or {}
    peer = next(r["peer"] for r in hp["rules"] if r["rule_id"] == rule_id)
    return sorted(m for s in hp["sets"] if s["name"] == peer for m in s["members"])


def test_network_policies_reach_the_pods_compiled_policy(setup: tuple[Api, Kube, SyncThread], k8s_cluster: Cluster
                                                         ) -> None:
    api, kube, _sync = setup
    ns = kube.namespace({"team": "blue"}, prefix="np")
    v4 = k8s_cluster.pod_v4
    for i, pod in enumerate(("a", "b", "c")):
        kube.pod(ns, pod, {"pod": pod})
        kube.play_kubelet(ns, pod, [str(v4[200 + i])])
    wa = f"k8s.{ns}.a"
    assert wait_for(lambda: _host_policy(api, f"k8s.{ns}.c") is not None, 30) is not None, _sync.error
    body = {"metadata": {"name": "a-from-b"}, "spec": {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}}
    kube.ok("POST", f"{NETPOL}/namespaces/{ns}/networkpolicies", json=body)
    rid = f"netpol/{ns}/a-from-b/ingress/0"
    want = [("allow", rid), ("deny", f"netpol/{ns}/a-from-b/ingress")]
    assert wait_for(lambda: _inbound(api, wa) == want, 10) is not None, _inbound(api, wa)
    assert _members(api, wa, rid) == [f"{v4[201]}/32"]
    assert _inbound(api, f"k8s.{ns}.b") == []  # selected by no policy

    # a pod relabel while the policy stands: the same rules, one more peer
    kube.label_pod(ns, "c", {"pod": "b"})
    assert wait_for(lambda: _members(api, wa, rid) == sorted([f"{v4[201]}/32", f"{v4[202]}/32"]), 10) is not None
    assert _inbound(api, wa) == want

    # an SCTP port: a real allow rule on 80/sctp, no problem and no Warning Event
    sctp = {"metadata": {"name": "sctp"}, "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                                                   "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}}
    kube.ok("POST", f"{NETPOL}/namespaces/{ns}/networkpolicies", json=sctp)
    want_b = [("allow", f"netpol/{ns}/sctp/ingress/0"), ("deny", f"netpol/{ns}/sctp/ingress")]
    assert wait_for(lambda: _inbound(api, f"k8s.{ns}.b") == want_b, 10) is not None, _inbound(api, f"k8s.{ns}.b")
    stored = api.ok("GET", f"/network-policies/k8s.{ns}.sctp")["body"]
    assert [r["ports"] for r in stored["rules"]] == [["80/sctp"]] and stored["problems"] == []
    assert not any(e.get("reason") == "StockadeUnsupported" for e in kube.events(ns))

    # an inexpressible policy: the apiserver refuses every object Stockade cannot express (protocols
    # beyond TCP/UDP/SCTP, bad selectors), so the watch event is handed to the running sync directly,
    # as a looser or older apiserver could send it: stored isolate-only, reported on the real apiserver
    dccp = {"metadata": {"name": "dccp", "namespace": ns}, "spec": {
        "podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80, "protocol": "DCCP"}]}]}}
    assert _sync.sync is not None and _sync.sync.netpol is not None and _sync._loop is not None
    asyncio.run_coroutine_threadsafe(_sync.sync.netpol.event("NetworkPolicy", "ADDED", dccp), _sync._loop).result(10)
    # pod a stays isolated (one isolation deny for all its policies); dccp adds no allow, a-from-b's
    # allow still applies (upstream's union)
    assert wait_for(lambda: api.http.get(f"/network-policies/k8s.{ns}.dccp").status_code == 200, 10) is not None
    assert _inbound(api, wa) == want
    stored = api.ok("GET", f"/network-policies/k8s.{ns}.dccp")["body"]
    assert stored["rules"] == [] and "DCCP" in stored["problems"][0]

    def warned() -> bool:
        return any(e.get("reason") == "StockadeUnsupported" and e["involvedObject"]["name"] == "dccp"
                   and e["involvedObject"]["kind"] == "NetworkPolicy" for e in kube.events(ns))

    assert wait_for(warned, 10) is not None
    asyncio.run_coroutine_threadsafe(_sync.sync.netpol.event("NetworkPolicy", "DELETED", dccp), _sync._loop).result(10)
    assert wait_for(lambda: api.http.get(f"/network-policies/k8s.{ns}.dccp").status_code == 404, 10) is not None

    # deleted in the cluster: gone from the controller and from the pod's policy
    kube.ok("DELETE", f"{NETPOL}/namespaces/{ns}/networkpolicies/a-from-b")
    assert wait_for(lambda: _inbound(api, wa) == [], 10) is not None
    assert api.http.get(f"/network-policies/k8s.{ns}.a-from-b").status_code == 404
