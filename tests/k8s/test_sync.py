"""Cluster sync against a real kube-apiserver + etcd and a real controller process.

The test plays the kubelet (patches ``pods/NAME/status``) and reads the controller's REST API:
pods become workloads with mapped labels and v4+v6 addresses within a second of the API change,
follow relabels, leave when deleted or when they stop being mappable (with an Event on the pod),
and nothing is lost across a restart of the sync or of the apiserver, or an expired watch (410).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from stockade.k8s.reflector import Reflector
from tests.asyncutil import run_async
from tests.e2e.harness import Api, ControllerProcess, bound, load_note, wait_for
from tests.k8s.conftest import ApiServer, Cluster
from tests.k8s.kube import Kube, SyncThread, start_controller


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControllerProcess, Api, str]]:
    ctl, api, key = start_controller(tmp_path_factory.mktemp("ctl"), _free_port())
    try:
        yield ctl, api, key
    finally:
        ctl.kill()


@pytest.fixture
def kube(k8s_cluster: Cluster) -> Kube:
    return Kube(k8s_cluster)


def workload(api: Api, name: str) -> dict[str, Any] | None:
    r = api.http.get(f"/workloads/{name}")
    if r.status_code == 404:
        return None
    r.raise_for_status()
    body: dict[str, Any] = r.json()["body"]
    return body


def addresses(body: dict[str, Any] | None) -> list[str]:
    return [a for i in (body or {}).get("interfaces", []) for a in i["addresses"]]


def within(predicate: Any, seconds: float, what: str) -> float:
    took = wait_for(predicate, bound(seconds) + 2.0, 0.01)
    assert took is not None, f"{what}: not within {bound(seconds):.1f} s ({load_note()})"
    assert took <= bound(seconds), f"{what}: {took:.2f} s > {bound(seconds):.2f} s ({load_note()})"
    return took


def test_pods_become_workloads_follow_changes_and_leave(
    k8s_cluster: Cluster, kube: Kube, controller: tuple[ControllerProcess, Api, str]
) -> None:
    ctl, api, key = controller
    ns = kube.namespace({"env": "dev"})
    name = f"k8s.{ns}.web-1"
    v4, v6 = str(k8s_cluster.pod_v4[5]), str(k8s_cluster.pod_v6[5])
    sync = SyncThread(k8s_cluster, ctl.url, key).start()
    try:
        assert wait_for(sync.synced, 30) is not None, sync.error
        kube.pod(ns, "web-1", {"app.kubernetes.io/name": "web"})
        time.sleep(0.3)
        assert workload(api, name) is None  # Pending, no IP, no node label declared here: not a workload yet

        kube.play_kubelet(ns, "web-1", [v4, v6])
        took = within(lambda: addresses(workload(api, name)) == [v4, v6], 1.0, "pod IPs -> workload")
        body = workload(api, name)
        assert body is not None and body["labels"] == {"app": "web", "env": "dev"}
        print(f"pod Running -> workload in {took * 1000:.0f} ms ({load_note()})")

        kube.label_pod(ns, "web-1", {"app.kubernetes.io/name": "api"})
        within(lambda: (workload(api, name) or {}).get("labels", {}).get("app") == "api", 1.0, "pod relabel")

        kube.label_namespace(ns, {"env": "prod"})
        within(lambda: (workload(api, name) or {}).get("labels", {}).get("env") == "prod", 1.0, "namespace relabel")

        # a value the Stockade key does not allow: the pod leaves (never a workload without its env label)
        kube.label_namespace(ns, {"env": "staging"})
        within(lambda: workload(api, name) is None, 1.0, "unmappable namespace label")
        assert wait_for(lambda: any(e.get("reason") == "StockadeSkipped" for e in kube.events(ns)), 5) is not None
        kube.label_namespace(ns, {"env": "dev"})
        within(lambda: workload(api, name) is not None, 1.0, "mappable again")

        kube.play_kubelet(ns, "web-1", [v4])  # the v6 address went away
        within(lambda: addresses(workload(api, name)) == [v4], 1.0, "address change")

        kube.delete_pod(ns, "web-1")
        within(lambda: workload(api, name) is None, 1.0, "pod delete")
        assert sync.error is None
    finally:
        sync.stop()


def test_malformed_pods_are_skipped_and_the_watch_goes_on(
    k8s_cluster: Cluster, kube: Kube, controller: tuple[ControllerProcess, Api, str]
) -> None:
    ctl, api, key = controller
    ns = kube.namespace({"env": "dev"})
    sync = SyncThread(k8s_cluster, ctl.url, key).start()
    try:
        assert wait_for(sync.synced, 30) is not None, sync.error
        kube.pod(ns, "huge", {f"l{i}": "x" for i in range(300)})  # the apiserver takes it; Stockade won't
        kube.play_kubelet(ns, "huge", [str(k8s_cluster.pod_v4[20])])
        kube.pod(ns, "bad-app", {"app": ""})  # valid in Kubernetes, not a Stockade value
        kube.play_kubelet(ns, "bad-app", [str(k8s_cluster.pod_v4[21])])
        kube.pod(ns, "fine", {"app": "ok"})
        kube.play_kubelet(ns, "fine", [str(k8s_cluster.pod_v4[22])])
        within(lambda: workload(api, f"k8s.{ns}.fine") is not None, 1.0, "the pod after two malformed ones")
        assert workload(api, f"k8s.{ns}.huge") is None and workload(api, f"k8s.{ns}.bad-app") is None
        assert sync.sync is not None
        reasons = {str(s.pod): s.reason for s in sync.sync.skips if s.pod is not None}
        assert "labels" in reasons[f"{ns}/huge"] and "app" in reasons[f"{ns}/bad-app"]
    finally:
        sync.stop()


def test_nothing_is_lost_across_a_restart_of_the_sync(
    k8s_cluster: Cluster, kube: Kube, controller: tuple[ControllerProcess, Api, str]
) -> None:
    ctl, api, key = controller
    ns = kube.namespace({"env": "dev"})
    ips = [str(k8s_cluster.pod_v4[30 + i]) for i in range(3)]
    for i, pod in enumerate(("a", "b", "c")):
        kube.pod(ns, pod, {"app": "x"})
        kube.play_kubelet(ns, pod, [ips[i]])
    sync = SyncThread(k8s_cluster, ctl.url, key).start()
    assert wait_for(lambda: all(workload(api, f"k8s.{ns}.{p}") for p in "abc"), bound(5)) is not None
    sync.stop()
    # while the sync is down: one pod deleted, one relabelled, one created
    kube.delete_pod(ns, "a")
    kube.label_pod(ns, "b", {"app": "y"})
    kube.pod(ns, "d", {"app": "x"})
    kube.play_kubelet(ns, "d", [str(k8s_cluster.pod_v4[40])])
    sync = SyncThread(k8s_cluster, ctl.url, key).start()
    try:
        def converged() -> bool:
            b = workload(api, f"k8s.{ns}.b")
            return (workload(api, f"k8s.{ns}.a") is None and b is not None and b["labels"]["app"] == "y"
                    and workload(api, f"k8s.{ns}.d") is not None)
        assert wait_for(converged, bound(5)) is not None
    finally:
        sync.stop()


def test_nothing_is_lost_across_a_restart_of_the_apiserver(
    k8s_cluster: Cluster, k8s_control: tuple[Cluster, ApiServer], kube: Kube,
    controller: tuple[ControllerProcess, Api, str],
) -> None:
    ctl, api, key = controller
    ns = kube.namespace({"env": "dev"})
    sync = SyncThread(k8s_cluster, ctl.url, key).start()
    try:
        assert wait_for(sync.synced, 30) is not None, sync.error
        kube.pod(ns, "before", {"app": "x"})
        kube.play_kubelet(ns, "before", [str(k8s_cluster.pod_v4[50])])
        k8s_control[1].restart_apiserver()  # the event above may or may not have been read before the cut
        kube.pod(ns, "after", {"app": "x"})
        kube.play_kubelet(ns, "after", [str(k8s_cluster.pod_v4[51])])
        assert wait_for(lambda: workload(api, f"k8s.{ns}.before") is not None
                        and workload(api, f"k8s.{ns}.after") is not None, bound(15)) is not None
        assert sync.sync is not None
        pods = next(r for r in sync.sync.reflectors if r.kind == "Pod")
        print(f"pod reflector listed {pods.lists} time(s) across the apiserver restart")
    finally:
        sync.stop()


def test_an_expired_resource_version_relists(k8s_cluster: Cluster, k8s_control: tuple[Cluster, ApiServer],
                                            kube: Kube) -> None:
    """A watch from a version older than the apiserver keeps answers 410 Gone: the reflector re-lists.

    The premise is made here, not inherited from test order: a restarted apiserver's watch cache
    starts at the current version, so version 2 is older than anything it holds (a fresh cache that
    has seen every event since the cluster began would still serve it).
    """
    kube.namespace()
    k8s_control[1].restart_apiserver()
    kube.namespace()

    class Recorder:
        def __init__(self) -> None:
            self.replaced: list[int] = []

        async def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
            self.replaced.append(len(objects))

        async def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
            pass

        async def malformed(self, kind: str, reason: str) -> None:
            pass

    async def scenario() -> tuple[Recorder, Reflector]:
        cfg = k8s.Configuration()
        await k8s_config.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
        async with k8s.ApiClient(cfg) as client:
            rec = Recorder()
            r = Reflector("Namespace", k8s.CoreV1Api(client).list_namespace, rec)
            r.resource_version = "2"  # long compacted out of the watch cache
            task = asyncio.create_task(r.run())
            for _ in range(1200):  # 60 s: the full suite loads both cores
                if rec.replaced:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            return rec, r

    rec, r = run_async(scenario())
    assert rec.replaced and rec.replaced[0] >= 1, "no re-list after 410"
    assert r.lists == 1 and r.resource_version not in (None, "2")


def test_the_harness_caches_its_binaries_outside_the_clone(k8s_cluster: Cluster) -> None:
    repo = Path(__file__).resolve().parents[2]
    script = Path(__file__).with_name("k8s.sh")
    bin_dir = Path(subprocess.run([str(script), "bin-dir"], capture_output=True, text=True, check=True).stdout.strip())
    assert (bin_dir / "kube-apiserver").is_file() and (bin_dir / "etcd").is_file()
    assert not bin_dir.resolve().is_relative_to(repo) and not k8s_cluster.run_dir.is_relative_to(repo)
    assert k8s_cluster.url.startswith("https://127.0.0.1:")
