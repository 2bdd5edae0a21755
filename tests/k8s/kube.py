"""Test plumbing for the Kubernetes tests: the apiserver driven by plain REST (independent of the
client under test), the kubelet played by patching ``pods/NAME/status``, a controller process with
an admin API key for the sync, and the sync running in a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from stockade.k8s.controller_client import ControllerClient
from stockade.k8s.mapping import LabelMapping
from stockade.k8s.sync import ClusterSync
from stockade.model.workloads import EnforcementMode
from tests.e2e.harness import Api, ControllerProcess
from tests.k8s.conftest import Cluster


class Kube:
    """The apiserver's REST API as the admin; ``play_kubelet`` sets a pod's IPs and phase."""

    def __init__(self, cluster: Cluster) -> None:
        self.http = httpx.Client(
            base_url=cluster.url, verify=ssl.create_default_context(cafile=str(cluster.ca_cert)),
            headers={"Authorization": f"Bearer {cluster.token}"}, timeout=30.0,
        )

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 300:
            raise AssertionError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def namespace(self, labels: dict[str, str] | None = None, prefix: str = "t") -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.ok("POST", "/api/v1/namespaces", json={"metadata": {"name": name, "labels": labels or {}}})
        return name

    def label_namespace(self, ns: str, labels: dict[str, str | None]) -> None:
        self.ok("PATCH", f"/api/v1/namespaces/{ns}", json={"metadata": {"labels": labels}},
                headers={"Content-Type": "application/merge-patch+json"})

    def pod(self, ns: str, name: str, labels: dict[str, str] | None = None, node: str = "node-a") -> None:
        self.ok("POST", f"/api/v1/namespaces/{ns}/pods", json={
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "Never"}]},
        })

    def label_pod(self, ns: str, name: str, labels: dict[str, str | None]) -> None:
        self.ok("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", json={"metadata": {"labels": labels}},
                headers={"Content-Type": "application/merge-patch+json"})

    def play_kubelet(self, ns: str, name: str, ips: list[str], phase: str = "Running") -> None:
        status = {"phase": phase, "podIP": ips[0] if ips else None, "podIPs": [{"ip": ip} for ip in ips] or None}
        self.ok("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", json={"status": status},
                headers={"Content-Type": "application/merge-patch+json"})

    def delete_pod(self, ns: str, name: str) -> None:
        self.ok("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", params={"gracePeriodSeconds": "0"})

    def events(self, ns: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.ok("GET", f"/api/v1/namespaces/{ns}/events")["items"]
        return items


def start_controller(tmp: Path, port: int) -> tuple[ControllerProcess, Api, str]:
    """A controller (plain HTTP on loopback), its owner API, and an admin API key for the sync."""
    ctl = ControllerProcess(tmp / "controller", "127.0.0.1", port, tmp / "controller.log", tls=False)
    (tmp / "controller").mkdir()
    ctl.start()
    api = Api(ctl.url, ctl.first_run["user"], ctl.first_run["password"])
    key = str(api.ok("POST", "/api-keys", 201, json={"name": "k8s-sync", "role": "admin"})["key"])
    for name, values in (("app", []), ("env", ["prod", "dev"])):
        body = {"name": name, "values": values}
        r = api.http.put(f"/label-keys/{name}", json=body)
        if r.status_code == 404:
            api.ok("POST", "/label-keys", 201, json=body)
        else:
            assert r.status_code == 200, r.text
    return ctl, api, key


def provision_client_server_policy(api: Api, port: int, message: str) -> None:
    """The node tests' policy: the pod-identity label keys, and app=client may reach app=server on
    ``port``/tcp, provisioned."""
    for label_key in ("k8s-node", "k8s-namespace"):
        api.ok("POST", "/label-keys", 201, json={"name": label_key, "values": []})
    api.ok("POST", "/services", 201, json={"name": f"web-{port}", "ports": [f"{port}/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "pods", "scope": "all", "rules": [
        {"consumers": [{"labels": {"app": "client"}}], "providers": [{"labels": {"app": "server"}}],
         "services": [f"web-{port}"]}]})
    api.ok("POST", "/policy/provision", 201, json={"message": message})


class SyncThread:
    """A :class:`ClusterSync` on its own event loop in a thread; ``stop`` cancels it (a restart
    of the sync process: all its state is in memory)."""

    def __init__(self, cluster: Cluster, controller_url: str, api_key: str, mapping: LabelMapping | None = None,
                 watch_seconds: int = 240, ca_cert: Path | None = None, network_policies: bool = False,
                 mode: EnforcementMode = EnforcementMode.FULL) -> None:
        self.cluster, self.controller_url, self.api_key, self.ca_cert = cluster, controller_url, api_key, ca_cert
        self.mapping, self.watch_seconds = mapping, watch_seconds
        self.network_policies, self.mode = network_policies, mode
        self.sync: ClusterSync | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> SyncThread:
        self._thread.start()
        assert self._ready.wait(30), "sync did not start"
        return self

    async def _main(self) -> None:
        cfg = k8s.Configuration()
        await k8s_config.load_kube_config(config_file=str(self.cluster.kubeconfig), client_configuration=cfg)
        controller = ControllerClient(self.controller_url, self.api_key, self.ca_cert)
        async with k8s.ApiClient(cfg) as api:
            networking = k8s.NetworkingV1Api(api) if self.network_policies else None
            self.sync = ClusterSync(k8s.CoreV1Api(api), controller, self.mapping, watch_seconds=self.watch_seconds,
                                    networking=networking, mode=self.mode)
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self.sync.run())
            self._ready.set()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # surfaced to the test through .error
                self.error = exc
            finally:
                await controller.aclose()

    def synced(self) -> bool:
        return self.sync is not None and self.sync.synced.is_set()

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(15)
        assert not self._thread.is_alive(), "sync thread did not stop"
