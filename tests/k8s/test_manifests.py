"""``stockade k8s manifests`` against the real apiserver: every object is accepted as rendered, and the
RBAC is least privilege (a token of each ServiceAccount can do what its component needs, nothing more)."""

from __future__ import annotations

import ssl
import subprocess
import sys
from typing import Any

import httpx
import pytest
import yaml

from stockade.k8s.manifests import ManifestValues, manifests
from tests.k8s.conftest import Cluster
from tests.k8s.kube import Kube

PATHS = {
    "Namespace": "/api/v1/namespaces",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "DaemonSet": "/apis/apps/v1/namespaces/{ns}/daemonsets",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
}


def test_the_cli_prints_what_the_module_renders() -> None:
    out = subprocess.run([sys.executable, "-m", "stockade.cli", "k8s", "manifests", "--controller",
                          "https://10.0.0.1:8443", "--image", "stockade.local/stockade:1", "--no-host-policy"],
                         capture_output=True, text=True, check=True).stdout
    docs = list(yaml.safe_load_all(out))
    assert docs == manifests(ManifestValues("https://10.0.0.1:8443", "stockade.local/stockade:1", host_policy=False))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    assert "--no-host-policy" in ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--per-pod-poll" not in ds["spec"]["template"]["spec"]["containers"][0]["args"]  # the node protocol
    assert all(d["kind"] != "Secret" and "data" not in d for d in docs)  # secrets are referenced, never inlined
    per_pod = subprocess.run([sys.executable, "-m", "stockade.cli", "k8s", "manifests", "--controller",
                              "https://10.0.0.1:8443", "--image", "stockade.local/stockade:1", "--per-pod-poll"],
                             capture_output=True, text=True, check=True).stdout
    ds = next(d for d in yaml.safe_load_all(per_pod) if d["kind"] == "DaemonSet")
    assert "--per-pod-poll" in ds["spec"]["template"]["spec"]["containers"][0]["args"]
    bad = subprocess.run([sys.executable, "-m", "stockade.cli", "k8s", "manifests", "--controller", "ftp://x",
                          "--image", "i"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "controller" in bad.stderr


def _token(kube: Kube, ns: str, sa: str) -> str:
    r = kube.ok("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
                json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                      "spec": {"expirationSeconds": 600}})
    return str(r["status"]["token"])


def _can(cluster: Cluster, token: str, method: str, path: str, body: Any = None) -> bool:
    with httpx.Client(base_url=cluster.url, verify=ssl.create_default_context(cafile=str(cluster.ca_cert)),
                      headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        r = c.request(method, path, json=body, params={"dryRun": "All"} if method != "GET" else None)
    assert r.status_code in (200, 201, 403, 404), r.text
    return r.status_code in (200, 201)


@pytest.mark.parametrize("sync", [True])
def test_the_manifests_are_accepted_and_their_rbac_is_least_privilege(k8s_cluster: Cluster, sync: bool) -> None:
    kube = Kube(k8s_cluster)
    ns = f"stockade-{kube.namespace().split('-')[1]}"  # a fresh name per run (namespaces never finish deleting)
    values = ManifestValues("https://10.0.0.1:8443", "stockade.local/stockade:1", namespace=ns, sync=sync)
    docs = manifests(values)
    suffix = ns.removeprefix("stockade-")
    for doc in docs:  # cluster-scoped names made unique per run
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] += f"-{suffix}"
            if doc["kind"] == "ClusterRoleBinding":
                doc["roleRef"]["name"] += f"-{suffix}"
        kube.ok("POST", PATHS[doc["kind"]].format(ns=ns), json=doc)
    node, sync_token = _token(kube, ns, "stockade-node"), _token(kube, ns, "stockade-sync")
    assert _can(k8s_cluster, node, "GET", "/api/v1/pods")
    assert _can(k8s_cluster, node, "GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&watch=false")
    for method, path in (("GET", "/api/v1/secrets"), ("GET", "/api/v1/namespaces"), ("GET", "/api/v1/nodes"),
                         ("DELETE", f"/api/v1/namespaces/{ns}/pods/x"), ("GET", "/api/v1/configmaps")):
        assert not _can(k8s_cluster, node, method, path), (method, path)
    assert _can(k8s_cluster, sync_token, "GET", "/api/v1/namespaces")
    assert _can(k8s_cluster, sync_token, "GET", "/api/v1/pods")
    event = {"metadata": {"generateName": "s-"}, "involvedObject": {"kind": "Pod", "namespace": ns, "name": "x"},
             "reason": "StockadeSkipped", "message": "m", "type": "Warning"}
    assert _can(k8s_cluster, sync_token, "POST", f"/api/v1/namespaces/{ns}/events", event)
    for method, path in (("GET", "/api/v1/secrets"), ("DELETE", f"/api/v1/namespaces/{ns}/pods/x"),
                         ("GET", "/api/v1/nodes"), ("PATCH", f"/api/v1/namespaces/{ns}")):
        assert not _can(k8s_cluster, sync_token, method, path), (method, path)
