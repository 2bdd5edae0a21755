"""The NetworkPolicy half of the cluster sync: watch NetworkPolicies, resolve, write the changes.

:class:`NetpolSync` owns a :class:`~stockade.k8s.netpol.NetpolResolver` and a
:class:`~stockade.k8s.reflector.Reflector` of ``networking.k8s.io/v1`` NetworkPolicies (run by the
sync, which forwards its events here); the
:class:`~stockade.k8s.sync.ClusterSync` forwards it every namespace and pod it sees (pod and
namespace labels, container ports), so a relabel re-resolves only the policies it concerns.
``flush`` (run by the sync's worker) writes each resolved policy whose body changed to the
controller's ``network-policies`` kind (PUT/POST), and deletes the stored ones no policy wants
any more (after a re-list too: nothing deleted while the sync was down survives).

Why a stored kind of its own and not rulesets: a NetworkPolicy isolates the pods it selects
(Stockade's own allow rules must not open those directions) and resolves named ports per pod;
neither is a Stockade ruleset, and the evaluator needs the NetworkPolicy itself to name it in
``explain``. Storing the *resolved* form (workload names, address ranges, numeric ports) keeps
Kubernetes' label syntax out of the controller, and an inventory kind takes effect at once like
a pod's workload (the cluster, not the draft, owns it).

A policy with parts Stockade cannot express is stored with its ``problems`` (it isolates and
allows nothing: never wider) and reported once per reason as a Warning Event
``StockadeUnsupported`` on the NetworkPolicy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kubernetes_asyncio import client as k8s

from stockade.codec.netpol_body import encode, object_name
from stockade.k8s.controller_client import ControllerClient
from stockade.k8s.netpol import NetpolResolver, pod_info

log = logging.getLogger(__name__)

NETWORK_POLICY = "NetworkPolicy"


class NetpolSync:
    def __init__(
        self,
        networking: k8s.NetworkingV1Api,
        core: k8s.CoreV1Api,
        controller: ControllerClient,
        wake: asyncio.Event,
        *,
        post_events: bool = True,
    ) -> None:
        self._core, self._ctl, self._wake, self._post_events = core, controller, wake, post_events
        self.resolver = NetpolResolver()
        self.pushed: dict[str, dict[str, Any]] = {}
        self.reported: dict[tuple[str, str], str] = {}
        self._sweep = False
        # the ClusterSync handles its events (it knows when every kind is listed) and forwards them here
        self.list_fn = networking.list_network_policy_for_all_namespaces

    async def load(self) -> None:
        self.pushed = await self._ctl.network_policies()

    # ---- what the cluster sync forwards -------------------------------------------------------

    def namespace(self, name: str, labels: dict[str, str] | None) -> None:
        if labels is None:
            self.resolver.remove_namespace(name)
        else:
            self.resolver.set_namespace(name, labels)

    def namespaces(self, all_labels: dict[str, dict[str, str]]) -> None:
        for name in [n for n in self.resolver.namespaces if n not in all_labels]:
            self.resolver.remove_namespace(name)
        for name, labels in all_labels.items():
            self.resolver.set_namespace(name, labels)

    def pod(self, obj: dict[str, Any], deleted: bool) -> None:
        info = pod_info(obj)
        if info is None:
            return
        if deleted:
            self.resolver.remove_pod(info.namespace, info.name)
        else:
            self.resolver.set_pod(info)

    def pods(self, objects: list[dict[str, Any]]) -> None:
        infos = [i for i in (pod_info(o) for o in objects) if i is not None]
        keep = {(i.namespace, i.name) for i in infos}
        for key in [k for k in self.resolver.pods if k not in keep]:
            self.resolver.remove_pod(*key)
        for info in infos:
            self.resolver.set_pod(info)

    # ---- reflector handler --------------------------------------------------------------------

    async def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        wanted = set()
        for obj in objects:
            spec = self.resolver.set_policy(obj)
            wanted.add((spec.namespace, spec.name))
        for key in [k for k in self.resolver.policies if k not in wanted]:
            self.resolver.remove_policy(*key)
        self._sweep = True
        self._wake.set()

    async def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else None
        if meta is None or not isinstance(meta.get("namespace"), str) or not isinstance(meta.get("name"), str):
            await self.malformed(kind, "NetworkPolicy without metadata.namespace/name")
            return
        if type_ == "DELETED":
            self.resolver.remove_policy(meta["namespace"], meta["name"])
        else:
            self.resolver.set_policy(obj)
        self._wake.set()

    async def malformed(self, kind: str, reason: str) -> None:
        log.warning("k8s sync: skipped a %s: %s", kind, reason)

    # ---- writing ------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every resolved policy whose body changed; delete what no policy wants."""
        wanted: dict[str, dict[str, Any]] = {}
        for np in self.resolver.resolved():
            body = encode(np)
            wanted[body["name"]] = body
            if np.problems:
                self._report(np.namespace, np.name, "; ".join(np.problems))
            else:
                self.reported.pop((np.namespace, np.name), None)
        for name, body in sorted(wanted.items()):
            if self.pushed.get(name) != body:
                await self._ctl.put_network_policy(body)
                self.pushed[name] = body
        for name in sorted(set(self.pushed) - set(wanted)):
            await self._ctl.delete_network_policy(name)
            del self.pushed[name]
        self._sweep = False

    def _report(self, namespace: str, name: str, reason: str) -> None:
        if self.reported.get((namespace, name)) == reason:
            return
        self.reported[(namespace, name)] = reason
        log.warning("k8s sync: NetworkPolicy %s/%s not fully expressible (%s): its pods fall back to deny",
                    namespace, name, reason)
        if self._post_events:
            task = asyncio.get_running_loop().create_task(self._post_event(namespace, name, reason))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _post_event(self, namespace: str, name: str, reason: str) -> None:
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name=f"{name[:40]}.stockade-", namespace=namespace),
            involved_object=k8s.V1ObjectReference(api_version="networking.k8s.io/v1", kind="NetworkPolicy",
                                                  namespace=namespace, name=name),
            reason="StockadeUnsupported",
            message=(f"Stockade cannot express: {reason}. The pods it selects fall back to deny for the "
                     f"directions it covers ({object_name(namespace, name)})")[:1000],
            type="Warning",
            source=k8s.V1EventSource(component="stockade-k8s-sync"),
        )
        with contextlib.suppress(Exception):  # best effort: logged above either way
            await self._core.create_namespaced_event(namespace, body)


_background: set[asyncio.Task[None]] = set()
