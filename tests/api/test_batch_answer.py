"""The path of a pod-churn batch's answer after its commit (issue 15's 10,000-pod fan-out), on SQLite
and PostgreSQL.

The cluster sync writes its next batch only when the controller has answered the previous one, so
the time from a batch's commit to its answer is on every pod event's critical path. That commit
wakes most nodes' long-polls, whose answers, acks and next polls then fill the event loop; each
time the batch's request waits for a worker thread and comes back to the loop, it queues behind
them (bench/k8s_fanout.py, 10,000 pods / 100 nodes: 76 % of the batch call's time was after the
commit). Proved by counting the worker-thread hops of one request, not by timing; and the
controller's collector setting, whose full collections paused every request at that size.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from tests.api.conftest import Api, make_settings

from stockade.controller import app as app_module
from stockade.controller.app import create_app


def _pod(name: str, addr: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app": "a", "role": "web"}, "mode": "full",
            "interfaces": [{"name": "eth0", "addresses": [addr]}]}


def _hops(api: Api, monkeypatch: pytest.MonkeyPatch, method: str, path: str, **kw: Any) -> tuple[Any, list[str]]:
    """``api.req(...)``'s response and the functions its request ran in worker threads, in order."""
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        inner = func.func if isinstance(func, functools.partial) else func
        hops.append(getattr(inner, "__qualname__", repr(inner)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    try:
        r = api.req(method, path, **kw)
    finally:
        monkeypatch.setattr(anyio.to_thread, "run_sync", real)
    return r, hops


def test_a_batch_answer_takes_no_worker_thread_hop_after_its_commit(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.ok("POST", "/workload-batches", json={"upsert": [_pod("p-0", "10.5.0.1")]})
    r, hops = _hops(api, monkeypatch, "POST", "/workload-batches", json={
        "upsert": [_pod(f"p-{i}", f"10.5.0.{i + 1}") for i in range(1, 4)], "delete": ["p-0"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"created": ["p-1", "p-2", "p-3"], "replaced": [], "deleted": ["p-0"]}
    # the API key's lookup, then the transaction, whose thread also encodes the answer; the old sync
    # route took a third hop after the commit (FastAPI validated its return value in the thread pool)
    assert len(hops) == 2, hops
    assert hops[-1] == "_write", hops
    assert api.req("GET", "/workloads/p-3").status_code == 200
    assert api.req("GET", "/workloads/p-0").status_code == 404


def test_a_refused_batch_is_still_refused_whole(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals as before the route went async: a conflict anywhere writes nothing."""
    api.ok("POST", "/workload-batches", json={"upsert": [_pod("q-0", "10.5.1.1")]})
    r, hops = _hops(api, monkeypatch, "POST", "/workload-batches", json={
        "upsert": [_pod("q-1", "10.5.1.2"), _pod("q-2", "10.5.1.1")]})
    assert r.status_code == 409, r.text
    assert len(hops) == 2, hops
    assert api.req("GET", "/workloads/q-1").status_code == 404
    r = api.req("POST", "/workload-batches", json={"upsert": [{"name": "q-3", "labels": {"nope": "x"}}]})
    assert r.status_code == 422 and "upsert[0]" in r.text, r.text


def test_the_controller_serves_with_rare_full_collections(tmp_path: Path) -> None:
    """A full collection walks the whole unfrozen heap (60-100 ms at 10,000 pods, about one a second of
    churn with CPython's default); while it serves, the controller runs one per 100 young collections,
    and gives the process its own setting back when it stops."""
    before = gc.get_threshold()
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'gc.db'}"))
    with TestClient(app):
        serving = gc.get_threshold()
    assert serving[0] == max(before[0], app_module.YOUNG_COLLECTION_AFTER) >= 20_000
    assert serving[1] == before[1] and serving[2] == max(before[2], app_module.FULL_COLLECTION_AFTER) >= 100
    assert gc.get_threshold() == before
