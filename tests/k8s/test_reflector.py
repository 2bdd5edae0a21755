"""The reflector's protocol without a cluster: a scripted list/watch function checks that the watch
resumes from the last event or BOOKMARK version, skips garbage lines, and re-lists on 410."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from stockade.k8s.reflector import Reflector
from tests.asyncutil import run_async


class FakeResponse:
    def __init__(self, body: bytes, chunks: list[bytes] | None = None) -> None:
        self._body, self._chunks = body, chunks or []
        self.content = self
        self.status = 200

    async def read(self) -> bytes:
        return self._body

    async def iter_any(self) -> AsyncIterator[bytes]:
        for c in self._chunks:
            yield c

    def release(self) -> None:
        pass


def line(type_: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"


def ns(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": rv}}


class Script:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, **kw: Any) -> FakeResponse:
        self.calls.append(kw)
        n = len(self.calls)
        if not kw.get("watch"):
            listing = {"metadata": {"resourceVersion": str(10 * n)}, "items": [ns("a", "5")]}
            return FakeResponse(json.dumps(listing).encode())
        if n == 2:  # first watch: an event split across chunks, a garbage line, a bookmark, then EOF
            bookmark = line("BOOKMARK", {"metadata": {"resourceVersion": "15"}})
            data = line("ADDED", ns("b", "11")) + b"{not json\n" + bookmark
            return FakeResponse(b"", [data[:7], data[7:]])
        if n == 3:
            return FakeResponse(b"", [line("ERROR", {"kind": "Status", "code": 410, "message": "too old"})])
        await asyncio.sleep(3600)
        raise AssertionError


class Recorder:
    def __init__(self) -> None:
        self.log: list[str] = []

    async def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        self.log.append(f"replace {len(objects)}")

    async def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.log.append(f"{type_} {obj['metadata']['name']}")

    async def malformed(self, kind: str, reason: str) -> None:
        self.log.append(f"malformed: {reason}")


def test_resume_from_bookmark_and_relist_on_410() -> None:
    script, rec = Script(), Recorder()

    async def run() -> None:
        r = Reflector("Namespace", script, rec)
        task = asyncio.create_task(r.run())
        for _ in range(100):
            if len(script.calls) >= 5:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    run_async(run())
    assert rec.log[:3] == ["replace 1", "ADDED b", "malformed: watch line is not JSON"]
    assert rec.log[3] == "replace 1"  # 410 -> re-list
    watch1, watch2 = script.calls[1], script.calls[2]
    assert watch1["resource_version"] == "10" and watch1["allow_watch_bookmarks"] is True
    assert watch2["resource_version"] == "15"  # resumed from the bookmark
    assert not script.calls[3].get("watch")  # the re-list
    assert script.calls[4]["resource_version"] == "40"


def test_an_http_410_on_opening_the_watch_relists_and_other_errors_retry_from_the_same_version() -> None:
    calls: list[dict[str, Any]] = []

    async def fn(**kw: Any) -> FakeResponse:
        calls.append(kw)
        if not kw.get("watch"):
            return FakeResponse(json.dumps({"metadata": {"resourceVersion": "7"}, "items": []}).encode())
        resp = FakeResponse(b"busy")
        resp.status = 500 if len(calls) == 2 else 410 if len(calls) == 3 else 200
        if resp.status == 200:
            await asyncio.sleep(3600)
        return resp

    async def run() -> None:
        r = Reflector("Pod", fn, Recorder())
        r.backoff.first = 0.01
        task = asyncio.create_task(r.run())
        for _ in range(200):
            if len(calls) >= 5:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    run_async(run())
    assert [bool(c.get("watch")) for c in calls[:5]] == [False, True, True, False, True]
    assert calls[2]["resource_version"] == "7"  # after a 500: same version
