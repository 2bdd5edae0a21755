"""List + watch of one Kubernetes resource kind, without losing an event (a client-go reflector).

Protocol (https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes):

1. *List* in pages of :data:`PAGE`; the list's ``metadata.resourceVersion`` is where the watch starts.
   The handler gets the complete set (:meth:`Handler.replace`), so objects deleted while nobody
   was watching (a restart of the sync) disappear too.
2. *Watch* from that resourceVersion with ``allowWatchBookmarks``; every event and every BOOKMARK
   moves the resourceVersion on, so a watch closed by the server (``timeoutSeconds``), a dropped
   connection or a restarted apiserver resumes exactly where it stopped.
3. ``410 Gone`` (an HTTP answer or an in-stream ERROR event: the version was compacted away)
   means events may be missing: go back to 1 (re-list).
4. Any other failure: exponential backoff with jitter (0.2 s doubling to 10 s), then resume.

Lines are parsed here, not by the client's model deserialiser: a malformed event is reported to
the handler (:meth:`Handler.malformed`) and skipped, and the watch goes on. A line longer than
:data:`MAX_LINE` is not skipped (the event would be lost) but forces a re-list.

``kubernetes_asyncio`` (the official OpenAPI client, asyncio flavour) provides configuration
(kubeconfig or in-cluster), authentication, TLS and the typed API methods; it is chosen over
``lightkube`` because lightkube's watch offers neither bookmarks nor a re-list on 410 (it resets
to "now", which silently drops deletions in the gap) and decodes every object into its models,
so one odd object would end the stream; over the synchronous ``kubernetes`` client because the
sync is asyncio throughout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

PAGE = 500
MAX_LINE = 8 * 1024 * 1024
WATCH_SECONDS = 240  # server-side timeout of one watch request; it resumes from the last version

ListFn = Callable[..., Awaitable[Any]]  # a CoreV1Api list_* method


class Handler(Protocol):
    async def replace(self, kind: str, objects: list[dict[str, Any]]) -> None: ...

    async def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None: ...

    async def malformed(self, kind: str, reason: str) -> None: ...


class _Gone(Exception):
    """The resourceVersion is too old: re-list."""


@dataclass
class Backoff:
    first: float = 0.2
    cap: float = 10.0
    _next: float = 0.0

    def reset(self) -> None:
        self._next = 0.0

    async def wait(self) -> None:
        self._next = min(self.cap, self._next * 2 if self._next else self.first)
        await asyncio.sleep(self._next * random.uniform(0.8, 1.2))  # jitter, not security


def _rv(obj: object) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


async def _check_status(resp: Any, kind: str) -> None:
    """Unpreloaded answers are not checked by the client: 410 re-lists, any other error retries."""
    status = getattr(resp, "status", 200)
    if status == 410:
        raise _Gone
    if not 200 <= status <= 299:
        text = (await resp.read())[:300]
        raise RuntimeError(f"{kind}: HTTP {status} {text!r}")


class Reflector:
    """Keeps one handler in step with one resource kind; :meth:`run` until cancelled."""

    def __init__(self, kind: str, list_fn: ListFn, handler: Handler, *, watch_seconds: int = WATCH_SECONDS) -> None:
        self.kind, self._list, self._handler, self._watch_seconds = kind, list_fn, handler, watch_seconds
        self.resource_version: str | None = None
        self.lists = 0  # how many times it (re-)listed: tests and metrics
        self.backoff = Backoff()

    async def run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    await self._list_all()
                await self._watch()
                self.backoff.reset()  # a clean server-side close: resume at once
            except _Gone:
                log.info("%s: resourceVersion %s expired (410): re-listing", self.kind, self.resource_version)
                self.resource_version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, TLS, 5xx, timeouts: the apiserver comes back
                if isinstance(exc, ApiException) and exc.status == 410:
                    self.resource_version = None
                    continue
                log.warning("%s: watch failed (%s: %s); retrying", self.kind, type(exc).__name__, exc)
                await self.backoff.wait()

    async def _list_all(self) -> None:
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE, "_preload_content": False, "_request_timeout": 60}
            if cont:
                kwargs["_continue"] = cont
            resp = await self._list(**kwargs)
            try:
                await _check_status(resp, self.kind)
                body = json.loads(await resp.read())
            finally:
                resp.release()
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise ValueError(f"{self.kind}: list answer has no items")
            for obj in body["items"]:
                if isinstance(obj, dict):
                    items.append(obj)
                else:
                    await self._handler.malformed(self.kind, "list item is not an object")
            meta: dict[str, Any] = body["metadata"] if isinstance(body.get("metadata"), dict) else {}
            cont = meta.get("continue") or None
            if not cont:
                rv = meta.get("resourceVersion")
                if not isinstance(rv, str) or not rv:
                    raise ValueError(f"{self.kind}: list answer has no resourceVersion")
                break
        await self._handler.replace(self.kind, items)
        self.lists += 1
        self.resource_version = rv
        self.backoff.reset()

    async def _watch(self) -> None:
        resp = await self._list(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_seconds,
            _preload_content=False,
            _request_timeout=self._watch_seconds + 30,
        )
        try:
            await _check_status(resp, self.kind)
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise _Gone  # an event we can't read whole: re-list rather than lose it
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        await self._line(line)
                        self.backoff.reset()
        finally:
            resp.release()

    async def _line(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            await self._handler.malformed(self.kind, "watch line is not JSON")
            return
        type_ = ev.get("type") if isinstance(ev, dict) else None
        obj = ev.get("object") if isinstance(ev, dict) else None
        if not isinstance(type_, str) or not isinstance(obj, dict):
            await self._handler.malformed(self.kind, "watch event without type/object")
            return
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise _Gone
            raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('message')}")
        rv = _rv(obj)
        if type_ != "BOOKMARK":
            if type_ not in ("ADDED", "MODIFIED", "DELETED"):
                await self._handler.malformed(self.kind, f"unknown watch event type {type_[:40]!r}")
            else:
                await self._handler.event(self.kind, type_, obj)
        if rv is not None:
            self.resource_version = rv
