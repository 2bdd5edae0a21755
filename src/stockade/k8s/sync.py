"""The cluster sync: keeps the controller's ``k8s.*`` workloads equal to the cluster's pods.

Two :class:`~stockade.k8s.reflector.Reflector` s (Namespaces, Pods) feed one in-memory picture;
every change marks the pods it affects dirty and wakes one worker, which computes each dirty pod's
:func:`~stockade.k8s.mapping.desired_workload` and writes only the differences through the REST API:
the changes of one pass (every pod changed while the previous write was under way) as ONE ``POST
/workload-batches`` transaction, so a burst of pod churn is one revision per affected host; a single
change, or a batch the controller refuses, goes one PUT/POST/DELETE per pod. Deletes always go
first, so a new pod that recycled a deleted pod's IP is not refused for holding its address. After a (re-)list of
both kinds the worker also deletes every ``k8s.*`` workload that no pod wants: deletions that
happened while the sync was down or while a watch was expired are not lost. A failed write is
retried with backoff; the pods stay dirty until it lands.

Skips (malformed objects, values a Stockade key does not allow, a namespace not seen yet) are
kept in :attr:`ClusterSync.skips`, logged, and - for pods - posted once per reason as a Warning
``Event`` on the pod (``kubectl describe pod`` shows why it has no policy).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from kubernetes_asyncio import client as k8s

from stockade.k8s.controller_client import ControllerApiError, ControllerClient
from stockade.k8s.mapping import (
    PREFIX,
    DesiredWorkload,
    LabelMapping,
    PodKey,
    Skip,
    desired_workload,
    namespace_labels,
    pod_key,
    workload_name,
)
from stockade.k8s.netpol_sync import NETWORK_POLICY, NetpolSync
from stockade.k8s.reflector import Backoff, Reflector
from stockade.model.labels import LabelKey
from stockade.model.workloads import EnforcementMode

BATCH_MAX = 1000  # workload writes per POST /workload-batches (the controller's limit)
log = logging.getLogger(__name__)

NAMESPACE, POD = "Namespace", "Pod"


class ClusterSync:
    def __init__(
        self,
        core: k8s.CoreV1Api,
        controller: ControllerClient,
        mapping: LabelMapping | None = None,
        *,
        mode: EnforcementMode = EnforcementMode.FULL,
        post_events: bool = True,
        watch_seconds: int = 240,
        networking: k8s.NetworkingV1Api | None = None,
    ) -> None:
        self._core, self._ctl, self._mapping, self._mode = core, controller, mapping or LabelMapping(), mode
        self._post_events = post_events
        self.namespaces: dict[str, dict[str, str]] = {}
        self.pods: dict[PodKey, dict[str, Any]] = {}
        self.pushed: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, LabelKey] = {}
        self.skips: collections.deque[Skip] = collections.deque(maxlen=1000)
        self._reported: dict[PodKey, str] = {}
        self._dirty: set[PodKey] = set()
        self._sweep = False
        self._listed: set[str] = set()
        self._wake = asyncio.Event()
        self.synced = asyncio.Event()  # set after the first complete sweep
        self.reflectors: tuple[Reflector, ...] = (
            Reflector(NAMESPACE, core.list_namespace, self, watch_seconds=watch_seconds),
            Reflector(POD, core.list_pod_for_all_namespaces, self, watch_seconds=watch_seconds),
        )
        # NetworkPolicies (issue 16): watched and resolved when a networking API is given
        self.netpol: NetpolSync | None = None
        self._kinds = {NAMESPACE, POD}
        if networking is not None:
            self.netpol = NetpolSync(networking, core, controller, self._wake, post_events=post_events)
            self.reflectors = (*self.reflectors,
                               Reflector(NETWORK_POLICY, self.netpol.list_fn, self, watch_seconds=watch_seconds))
            self._kinds.add(NETWORK_POLICY)

    async def run(self) -> None:
        self.keys = await self._ctl.label_keys()
        self.pushed = await self._ctl.owned_workloads(PREFIX)
        if self.netpol is not None:
            await self.netpol.load()
        async with asyncio.TaskGroup() as tg:
            for r in self.reflectors:
                tg.create_task(r.run(), name=f"reflect-{r.kind}")
            tg.create_task(self._worker(), name="k8s-sync-worker")

    # ---- reflector handler --------------------------------------------------------------------

    async def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        if kind == NETWORK_POLICY and self.netpol is not None:
            await self.netpol.replace(kind, objects)
            self._listed.add(kind)
            return
        if kind == NAMESPACE:
            fresh: dict[str, dict[str, str]] = {}
            for obj in objects:
                got = namespace_labels(obj)
                if isinstance(got, Skip):
                    self._skip(got)
                else:
                    fresh[got[0]] = got[1]
            self.namespaces = fresh
            if self.netpol is not None:
                self.netpol.namespaces(fresh)
            self._dirty.update(self.pods)
        else:
            pods: dict[PodKey, dict[str, Any]] = {}
            for obj in objects:
                key = pod_key(obj)
                if key is None:
                    self._skip(Skip(None, "pod without metadata.name/namespace"))
                else:
                    pods[key] = obj
            self._dirty.update(self.pods)
            self._dirty.update(pods)
            self.pods = pods
            if self.netpol is not None:
                self.netpol.pods(list(pods.values()))
        self._listed.add(kind)
        self._sweep = True
        self._wake.set()

    async def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        if kind == NETWORK_POLICY and self.netpol is not None:
            await self.netpol.event(kind, type_, obj)
            return
        if kind == NAMESPACE:
            got = namespace_labels(obj)
            if isinstance(got, Skip):
                self._skip(got)
                return
            name, labels = got
            if self.netpol is not None:
                self.netpol.namespace(name, None if type_ == "DELETED" else labels)
            if type_ == "DELETED":
                self.namespaces.pop(name, None)
            elif self.namespaces.get(name) == labels:
                self._wake.set()  # labels the mapping ignores may still matter to a NetworkPolicy
                return
            else:
                self.namespaces[name] = labels
            self._dirty.update(k for k in self.pods if k.namespace == name)
        else:
            key = pod_key(obj)
            if key is None:
                self._skip(Skip(None, "pod without metadata.name/namespace"))
                return
            if self.netpol is not None:
                self.netpol.pod(obj, type_ == "DELETED")
            if type_ == "DELETED":
                self.pods.pop(key, None)
                self._reported.pop(key, None)
            else:
                self.pods[key] = obj
            self._dirty.add(key)
        self._wake.set()

    async def malformed(self, kind: str, reason: str) -> None:
        self._skip(Skip(None, f"{kind}: {reason}"))

    # ---- the worker ---------------------------------------------------------------------------

    async def _worker(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._listed != self._kinds:
                continue  # until both are listed a pod's namespace may be missing: don't flap its workload
            dirty, self._dirty = self._dirty, set()
            sweep, self._sweep = self._sweep, False
            try:
                await self._apply(dirty, sweep)
                if self.netpol is not None:
                    await self.netpol.flush()
                backoff.reset()
                if sweep:
                    self.synced.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # controller down or refusing: keep the work, retry
                log.warning("k8s sync: writing to the controller failed (%s); retrying", exc)
                self._dirty |= dirty
                self._sweep = self._sweep or sweep
                await backoff.wait()
                self._wake.set()

    def _desired(self, key: PodKey) -> DesiredWorkload | Skip | None:
        obj = self.pods.get(key)
        if obj is None:
            return None
        return desired_workload(obj, self.namespaces.get(key.namespace), self._mapping, self.keys, self._mode)

    async def _apply(self, dirty: set[PodKey], sweep: bool) -> None:
        wanted: dict[str, dict[str, Any]] = {}
        keys: dict[str, PodKey] = {}
        gone: set[str] = set()
        for key in sorted(dirty, key=str):
            want = self._desired(key)
            if isinstance(want, DesiredWorkload):
                wanted[want.name] = want.body()
                keys[want.name] = key
                self._reported.pop(key, None)
            else:
                if isinstance(want, Skip):
                    self._skip(want)
                gone.add(workload_name(key))
        if sweep:
            keep = {w.name for k in self.pods if isinstance(w := self._desired(k), DesiredWorkload)}
            gone |= {name for name in self.pushed if name not in keep}
        gone -= set(wanted)
        if await self._apply_batch(wanted, gone):
            return
        await self._apply_singly(wanted, gone, keys)

    async def _apply_singly(self, wanted: dict[str, dict[str, Any]], gone: set[str], keys: dict[str, PodKey]) -> None:
        """One write per pod, deletes first: a deleted pod's address is free before a new pod that
        recycled it is written (Kubernetes reuses pod IPs; the other order refused the new pod)."""
        for name in sorted(gone):
            if name in self.pushed:
                await self._ctl.delete_workload(name)
                del self.pushed[name]
        for name, body in wanted.items():
            if self.pushed.get(name) != body:
                try:
                    await self._ctl.put_workload(body)
                except ControllerApiError as exc:
                    if exc.status != 409:
                        raise
                    # refused for this pod alone (e.g. an address another workload holds): skip it with
                    # an event and go on, so one pod never holds up every other pod's change; it is
                    # tried again at the next re-list or change of the pod
                    self._skip(Skip(keys[name], f"the controller refused it: {exc}"))
                    continue
                self.pushed[name] = body

    async def _apply_batch(self, wanted: dict[str, dict[str, Any]], gone: set[str]) -> bool:
        """Every pod change of this pass as ONE controller transaction (one revision per affected
        host, however many of its peers changed); False when it must go one write at a time: a
        single change, or the batch was refused (one pod's conflict, or a controller without the
        batch route), so the single writes skip only the refused pod."""
        put = [body for name, body in wanted.items() if self.pushed.get(name) != body]
        delete = sorted(name for name in gone if name in self.pushed)
        if len(put) + len(delete) < 2:
            return False
        try:  # deletes first (the controller applies a batch's deletes before its upserts, too)
            for start in range(0, len(put) + len(delete), BATCH_MAX):
                part_delete = delete[start : start + BATCH_MAX]
                part_put = put[max(0, start - len(delete)) : max(0, start + BATCH_MAX - len(delete))]
                await self._ctl.batch_workloads(part_put, part_delete)
                for body in part_put:
                    self.pushed[body["name"]] = body
                for name in part_delete:
                    del self.pushed[name]
        except ControllerApiError as exc:
            if exc.status not in (404, 405, 409, 422):
                raise
            log.info("k8s sync: batch refused (%s); writing one pod at a time", exc)
            return False
        return True

    # ---- skips --------------------------------------------------------------------------------

    def _skip(self, skip: Skip) -> None:
        if not skip.event:
            return
        if skip.pod is not None and self._reported.get(skip.pod) == skip.reason:
            return
        self.skips.append(skip)
        log.warning("k8s sync: skipped %s: %s", skip.pod or "an object", skip.reason)
        if skip.pod is not None:
            self._reported[skip.pod] = skip.reason
            if self._post_events:
                task = asyncio.get_running_loop().create_task(self._post_event(skip.pod, skip.reason))
                _background.add(task)
                task.add_done_callback(_background.discard)

    async def _post_event(self, pod: PodKey, reason: str) -> None:
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name=f"{pod.name[:40]}.stockade-", namespace=pod.namespace),
            involved_object=k8s.V1ObjectReference(api_version="v1", kind="Pod", namespace=pod.namespace, name=pod.name),
            reason="StockadeSkipped",
            message=f"not a Stockade workload: {reason}"[:1000],
            type="Warning",
            source=k8s.V1EventSource(component="stockade-k8s-sync"),
        )
        with contextlib.suppress(Exception):  # best effort: the skip is logged and kept in .skips anyway
            await self._core.create_namespaced_event(pod.namespace, body)


_background: set[asyncio.Task[None]] = set()
