"""The node agent's view of the API: the pods bound to one node, as :class:`LocalPod` values.

A :class:`~stockade.k8s.reflector.Reflector` over ``pods`` with ``fieldSelector=spec.nodeName=NODE``
(so a node lists only its own pods; the DaemonSet's service account needs ``get/list/watch`` on
pods and nothing else). Every list and event hands the complete set to :meth:`NodeAgent.set_pods`;
malformed objects are skipped (and logged), the watch goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from kubernetes_asyncio import client as k8s

from stockade.k8s.mapping import _pod_addresses, pod_key, workload_name
from stockade.k8s.node_agent import NodeAgent
from stockade.k8s.node_types import LocalPod
from stockade.k8s.podns import _UID_RE
from stockade.k8s.reflector import WATCH_SECONDS, Reflector

log = logging.getLogger("stockade.k8s.node")


def local_pod(obj: dict[str, Any]) -> LocalPod | str:
    """The pod as the node agent needs it, or what is wrong with it."""
    key = pod_key(obj)
    if key is None:
        return "pod without namespace/name"
    uid = obj["metadata"].get("uid")
    if not isinstance(uid, str) or not _UID_RE.match(uid):
        return f"pod {key}: metadata.uid is not a UID"
    status = obj.get("status")
    phase = status.get("phase") if isinstance(status, dict) else None
    addrs = _pod_addresses(status)
    if isinstance(addrs, str):
        return f"pod {key}: {addrs}"
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    host_net = bool(spec.get("hostNetwork")) if isinstance(spec, dict) else False
    finished = phase in ("Succeeded", "Failed")
    if finished:
        addrs = ()
    return LocalPod(uid, key.namespace, key.name, workload_name(key), addrs, host_net, finished)


class PodWatch:
    """Feeds a :class:`NodeAgent` with the pods of its node."""

    def __init__(self, core: k8s.CoreV1Api, node: NodeAgent, *, watch_seconds: int = WATCH_SECONDS) -> None:
        self.node = node
        self.pods: dict[str, LocalPod] = {}
        self.synced = asyncio.Event()
        list_fn = functools.partial(core.list_pod_for_all_namespaces,
                                    field_selector=f"spec.nodeName={node.options.node}")
        self.reflector = Reflector("pods", list_fn, self, watch_seconds=watch_seconds)

    async def run(self) -> None:
        await self.reflector.run()

    def _add(self, obj: dict[str, Any]) -> None:
        pod = local_pod(obj)
        if isinstance(pod, str):
            log.warning("skipped: %s", pod)
            return
        self.pods[pod.uid] = pod

    async def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        self.pods = {}
        for obj in objects:
            self._add(obj)
        self.node.set_pods(self.pods)
        self.synced.set()

    async def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        if type_ == "DELETED":
            uid = obj.get("metadata", {}).get("uid") if isinstance(obj.get("metadata"), dict) else None
            self.pods.pop(str(uid), None)
        else:
            self._add(obj)
        self.node.set_pods(self.pods)

    async def malformed(self, kind: str, reason: str) -> None:
        log.warning("skipped malformed %s: %s", kind, reason)
