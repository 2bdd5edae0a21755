"""The install manifests (issue 15): node-agent DaemonSet, sync Deployment, least-privilege RBAC.

``stockade k8s manifests --controller URL --image IMAGE ...`` prints them (YAML, one stream);
``deploy/helm/stockade`` renders the same objects from Helm values (``tests/k8s/test_helm.py`` holds
the two equal, object for object, for several sets of values). Pure: values in, plain data out.

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
* The API token is mounted only where it is used: ``automountServiceAccountToken: false`` and an
  explicit projected volume (a bound, expiring ServiceAccount token, the cluster CA from
  ``kube-root-ca.crt``, the namespace) in the node-agent and sync containers - the same files the
  ServiceAccount admission plugin would mount, but not in the init container, and independent of it.
* ``api_server`` (``HOST:PORT``) overrides ``KUBERNETES_SERVICE_HOST``/``_PORT`` for the node agent:
  on a node whose Service VIPs don't work without the agent (no kube-proxy; the agent is on the
  host network), it reaches the apiserver directly (Cilium's ``k8sServiceHost`` does the same).

The CNI plugin runs on the *host* (the runtime executes it), where the image's Python does not
exist: the init container installs a host wrapper (:func:`stockade.k8s.cni.host_wrapper`) that
runs the plugin inside the running node agent's mount namespace, found by the PID the agent writes
to ``<state>/node-agent.pid`` (``hostPID``: a host PID).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a namespace name (RFC 1123 label)

LABELS = {"app.kubernetes.io/part-of": "stockade"}


@dataclass(frozen=True)
class ManifestValues:
    controller: str
    image: str
    namespace: str = "stockade"
    pull_policy: str = "IfNotPresent"
    host_policy: bool = True
    node_poll: bool = True  # False: the node agent runs --per-pod-poll (one long-poll per pod, as before session 7)
    with_ca: bool = True
    sync: bool = True
    cni_bin_dir: str = "/opt/cni/bin"
    create_namespace: bool = True
    api_server: str = ""  # HOST:PORT of the apiserver for the node agent ("" = the kubernetes Service)

    def __post_init__(self) -> None:
        if not self.controller.startswith(("https://", "http://")):
            raise ValueError("controller: must be an http(s) URL")
        if not _DNS_LABEL.fullmatch(self.namespace):
            raise ValueError("namespace: not a valid Kubernetes namespace name")
        if self.pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError("pull_policy: Always, IfNotPresent or Never")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError("image: required, no spaces")
        if not self.cni_bin_dir.startswith("/") or ".." in self.cni_bin_dir.split("/"):
            raise ValueError("cni_bin_dir: an absolute path")
        if self.api_server:
            host, sep, port = self.api_server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(
                    c.isspace() or c in "/@" for c in host):
                raise ValueError("api_server: HOST:PORT")


STATE_DIR = "/var/lib/stockade"  # the host path (and the same path in the agent's container)
PIDFILE = f"{STATE_DIR}/node/node-agent.pid"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where in-cluster clients look


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


def _api_token() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ServiceAccount's API credentials as a volume and its mount (see the module docstring)."""
    volume = {"name": "kube-api", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}}
    return volume, {"name": "kube-api", "mountPath": TOKEN_DIR, "readOnly": True}


def node_daemonset(v: ManifestValues) -> dict[str, Any]:
    ca_args, ca_mounts, ca_volumes = _ca(v)
    token_volume, token_mount = _api_token()
    args = ["k8s", "node-agent", "--controller", v.controller, "--activation-code-file", "/etc/stockade/code/code",
            "--state-dir", f"{STATE_DIR}/node", "--pidfile", PIDFILE, *ca_args]
    if not v.host_policy:
        args.append("--no-host-policy")
    if not v.node_poll:
        args.append("--per-pod-poll")
    env: list[dict[str, Any]] = [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    if v.api_server:
        host, _, port = v.api_server.rpartition(":")
        env += [{"name": "KUBERNETES_SERVICE_HOST", "value": host.strip("[]")},
                {"name": "KUBERNETES_SERVICE_PORT", "value": port}]
    host_paths = [("state", STATE_DIR, "DirectoryOrCreate"), ("netns", "/run/netns", "DirectoryOrCreate"),
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
                    "serviceAccountName": "stockade-node", "automountServiceAccountToken": False,
                    "hostNetwork": True, "hostPID": True,
                    "dnsPolicy": "ClusterFirstWithHostNet", "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "initContainers": [{  # the chained default-deny CNI plugin, for the node's conflist
                        "name": "install-cni", "image": v.image, "imagePullPolicy": v.pull_policy,
                        "command": ["/opt/stockade/bin/stockade", "k8s", "cni-install", "/host/cni-bin",
                                    "--agent-pidfile", PIDFILE],
                        "volumeMounts": [{"name": "cni-bin", "mountPath": "/host/cni-bin"}],
                    }],
                    "containers": [{
                        "name": "node-agent", "image": v.image, "imagePullPolicy": v.pull_policy,
                        "command": ["/opt/stockade/bin/stockade"], "args": args,
                        "env": env,
                        "securityContext": {"privileged": True},
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                        "volumeMounts": [
                            {"name": "state", "mountPath": STATE_DIR},
                            {"name": "netns", "mountPath": "/run/netns", "mountPropagation": "Bidirectional"},
                            {"name": "code", "mountPath": "/etc/stockade/code", "readOnly": True},
                            token_mount,
                            *ca_mounts,
                        ],
                    }],
                    "volumes": [
                        *({"name": n, "hostPath": {"path": p, "type": t}} for n, p, t in host_paths),
                        {"name": "code", "secret": {"secretName": "stockade-node-code"}},
                        token_volume,
                        *ca_volumes,
                    ],
                },
            },
        },
    }


def sync_deployment(v: ManifestValues) -> dict[str, Any]:
    ca_args, ca_mounts, ca_volumes = _ca(v)
    token_volume, token_mount = _api_token()
    labels = {**LABELS, "app.kubernetes.io/component": "stockade-sync"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("stockade-sync", v, "stockade-sync"),
        "spec": {
            "replicas": 1, "strategy": {"type": "Recreate"},  # one writer; it re-lists after a restart
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": "stockade-sync", "automountServiceAccountToken": False,
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
                                         token_mount, *ca_mounts],
                    }],
                    "volumes": [{"name": "key", "secret": {"secretName": "stockade-sync-key"}}, token_volume,
                                *ca_volumes],
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
    docs: list[dict[str, Any]] = []
    if v.create_namespace:
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": v.namespace, "labels": dict(LABELS)}})
    docs += [
        *_rbac("stockade-node", v, NODE_RULES),
        node_daemonset(v),
    ]
    if v.sync:
        docs += [*_rbac("stockade-sync", v, SYNC_RULES), sync_deployment(v)]
    return docs


def render(v: ManifestValues) -> str:
    return yaml.safe_dump_all(manifests(v), sort_keys=False, default_flow_style=False)
