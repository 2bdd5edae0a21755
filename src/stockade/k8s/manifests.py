"""The install manifests (issue 15): node-agent DaemonSet, sync Deployment, least-privilege RBAC.

``stockade k8s manifests --controller URL --image IMAGE ...`` prints them (YAML, one stream);
``deploy/helm/stockade`` renders the same objects from Helm values. Pure: values in, plain data out.

Least privilege, object by object:

* **node agent** (ServiceAccount ``stockade-node``): ``get/list/watch pods`` - it lists only its
  own node's (``fieldSelector=spec.nodeName``); RBAC can't narrow a list by field, which is why the
  *controller* decides which pods a node may enrol (:mod:`stockade.controller.services.pod_enrolment`),
  not the node's API rights. Nothing else in the API. On the host it needs what a firewall agent
  needs: ``hostNetwork`` (the node's own policy), ``hostPID`` (pods' ``/proc/<pid>/ns/net``), and
  ``privileged`` for ``/run/netns`` mounted with Bidirectional propagation (pinning pod namespaces)
  and nftables inside other namespaces.
* **sync** (``stockade-sync``): ``get/list/watch`` namespaces and pods, ``create/patch`` events
  (the Warning it posts on a skipped pod). No node, secret or write access to pods.
* Secrets are referenced, never rendered: ``stockade-node-code`` (key ``code``: the pairing
  profile code the nodes enrol with) and ``stockade-sync-key`` (key ``key``: an admin API key),
  created by the operator; the controller's CA from ConfigMap ``stockade-ca`` (key ``ca.pem``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from stockade.model.labels import is_valid_name

LABELS = {"app.kubernetes.io/part-of": "stockade"}


@dataclass(frozen=True)
class ManifestValues:
    controller: str
    image: str
    namespace: str = "stockade"
    pull_policy: str = "IfNotPresent"
    host_policy: bool = True
    with_ca: bool = True
    sync: bool = True
    cni_bin_dir: str = "/opt/cni/bin"

    def __post_init__(self) -> None:
        if not self.controller.startswith(("https://", "http://")):
            raise ValueError("controller: must be an http(s) URL")
        if not is_valid_name(self.namespace) or "." in self.namespace:
            raise ValueError("namespace: not a valid Kubernetes namespace name")
        if self.pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError("pull_policy: Always, IfNotPresent or Never")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError("image: required, no spaces")


def _meta(name: str, v: ManifestValues, component: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**LABELS, "app.kubernetes.io/component": component}}
    if namespaced:
        meta["namespace"] = v.namespace
    return meta


def _rbac(name: str, v: ManifestValues, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, v, name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta(name, v, name, namespaced=False), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(name, v, name, namespaced=False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": v.namespace}]},
    ]


def _ca(v: ManifestValues) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    if not v.with_ca:
        return [], [], []
    return (["--ca-cert", "/etc/stockade/ca/ca.pem"],
            [{"name": "ca", "mountPath": "/etc/stockade/ca", "readOnly": True}],
            [{"name": "ca", "configMap": {"name": "stockade-ca"}}])


def node_daemonset(v: ManifestValues) -> dict[str, Any]:
    ca_args, ca_mounts, ca_volumes = _ca(v)
    args = ["k8s", "node-agent", "--controller", v.controller, "--activation-code-file", "/etc/stockade/code/code",
            "--state-dir", "/var/lib/stockade/node", *ca_args]
    if not v.host_policy:
        args.append("--no-host-policy")
    host = [("state", "/var/lib/stockade", "DirectoryOrCreate"), ("netns", "/run/netns", "DirectoryOrCreate"),
            ("cni-bin", v.cni_bin_dir, "DirectoryOrCreate")]
    labels = {**LABELS, "app.kubernetes.io/component": "stockade-node"}
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta("stockade-node", v, "stockade-node"),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": "stockade-node", "hostNetwork": True, "hostPID": True,
                    "dnsPolicy": "ClusterFirstWithHostNet", "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "initContainers": [{  # the chained default-deny CNI plugin, for the node's conflist
                        "name": "install-cni", "image": v.image, "imagePullPolicy": v.pull_policy,
                        "command": ["/bin/sh", "-c",
                                    "printf '#!/bin/sh\\nexec /opt/stockade/bin/python -m stockade.k8s.cni\\n' "
                                    "> /host/cni-bin/stockade-default-deny && chmod 755 "
                                    "/host/cni-bin/stockade-default-deny"],
                        "volumeMounts": [{"name": "cni-bin", "mountPath": "/host/cni-bin"}],
                    }],
                    "containers": [{
                        "name": "node-agent", "image": v.image, "imagePullPolicy": v.pull_policy,
                        "command": ["/opt/stockade/bin/stockade"], "args": args,
                        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                        "securityContext": {"privileged": True},
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                        "volumeMounts": [
                            {"name": "state", "mountPath": "/var/lib/stockade"},
                            {"name": "netns", "mountPath": "/run/netns", "mountPropagation": "Bidirectional"},
                            {"name": "code", "mountPath": "/etc/stockade/code", "readOnly": True},
                            *ca_mounts,
                        ],
                    }],
                    "volumes": [
                        *({"name": n, "hostPath": {"path": p, "type": t}} for n, p, t in host),
                        {"name": "code", "secret": {"secretName": "stockade-node-code"}},
                        *ca_volumes,
                    ],
                },
            },
        },
    }


def sync_deployment(v: ManifestValues) -> dict[str, Any]:
    ca_args, ca_mounts, ca_volumes = _ca(v)
    labels = {**LABELS, "app.kubernetes.io/component": "stockade-sync"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("stockade-sync", v, "stockade-sync"),
        "spec": {
            "replicas": 1, "strategy": {"type": "Recreate"},  # one writer; it re-lists after a restart
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": "stockade-sync",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {
                        "type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "sync", "image": v.image, "imagePullPolicy": v.pull_policy,
                        "command": ["/opt/stockade/bin/python", "-m", "stockade.k8s"],
                        "args": ["--controller", v.controller, "--api-key-file", "/etc/stockade/key/key", *ca_args],
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "512Mi"}},
                        "volumeMounts": [{"name": "key", "mountPath": "/etc/stockade/key", "readOnly": True},
                                         *ca_mounts],
                    }],
                    "volumes": [{"name": "key", "secret": {"secretName": "stockade-sync-key"}}, *ca_volumes],
                },
            },
        },
    }


NODE_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
SYNC_RULES = [
    {"apiGroups": [""], "resources": ["namespaces", "pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
]


def manifests(v: ManifestValues) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": v.namespace, "labels": dict(LABELS)}},
        *_rbac("stockade-node", v, NODE_RULES),
        node_daemonset(v),
    ]
    if v.sync:
        docs += [*_rbac("stockade-sync", v, SYNC_RULES), sync_deployment(v)]
    return docs


def render(v: ManifestValues) -> str:
    return yaml.safe_dump_all(manifests(v), sort_keys=False, default_flow_style=False)
