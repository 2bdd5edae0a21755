"""The cluster sync's batched writes (issue 15, pod churn): a pass's pod changes go as ONE batch call.

With an in-memory controller client: many changes -> one ``batch_workloads`` (chunked at
BATCH_MAX, deletes first) and ``pushed`` updated; a single change -> the single write; a refused batch (409, or
405 from a controller without the route) -> False, so the caller writes one pod at a time and
skips only the refused pod; any other error propagates (the worker retries the whole pass).
"""

from __future__ import annotations

from typing import Any

import pytest

from stockade.k8s import sync as sync_mod
from stockade.k8s.controller_client import ControllerApiError
from stockade.k8s.sync import ClusterSync
from tests.asyncutil import run_async


class FakeCtl:
    def __init__(self, fail: int = 0) -> None:
        self.batches: list[tuple[list[str], list[str]]] = []
        self.singles: list[str] = []
        self.fail = fail

    async def put_workload(self, body: dict[str, Any]) -> None:
        self.singles.append(f"put {body['name']}")

    async def delete_workload(self, name: str) -> None:
        self.singles.append(f"delete {name}")

    async def batch_workloads(self, upsert: list[dict[str, Any]], delete: list[str]) -> None:
        if self.fail:
            raise ControllerApiError("refused", self.fail)
        self.batches.append(([b["name"] for b in upsert], delete))


class Stub:
    """Just what ``ClusterSync._apply_batch`` reads and writes."""

    def __init__(self, ctl: FakeCtl, pushed: dict[str, dict[str, Any]]) -> None:
        self._ctl = ctl
        self.pushed = pushed


def _run(stub: Stub, wanted: dict[str, dict[str, Any]], gone: set[str]) -> bool:
    # in a thread of its own: a browser test earlier in this worker may leave a loop running here (tests/asyncutil)
    return run_async(ClusterSync._apply_batch(stub, wanted, gone))  # type: ignore[arg-type]


def test_a_pass_of_changes_is_one_batch_and_unchanged_pods_are_left_out() -> None:
    ctl = FakeCtl()
    stub = Stub(ctl, {"same": {"name": "same", "v": 1}, "old": {"name": "old"}, "gone2": {"name": "gone2"}})
    wanted: dict[str, dict[str, Any]] = {
        "same": {"name": "same", "v": 1}, "new": {"name": "new"}, "changed": {"name": "changed", "v": 2}}
    assert _run(stub, wanted, {"old", "never-pushed"})
    assert ctl.batches == [(["new", "changed"], ["old"])]
    assert set(stub.pushed) == {"same", "new", "changed", "gone2"}


def test_batches_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_mod, "BATCH_MAX", 3)
    ctl = FakeCtl()
    stub = Stub(ctl, {f"d{i}": {"name": f"d{i}"} for i in range(2)})
    wanted = {f"p{i}": {"name": f"p{i}"} for i in range(5)}
    assert _run(stub, wanted, {"d0", "d1"})
    assert ctl.batches == [(["p0"], ["d0", "d1"]), (["p1", "p2", "p3"], []), (["p4"], [])]  # deletes first
    assert set(stub.pushed) == set(wanted)


def test_one_change_or_a_refused_batch_goes_one_write_at_a_time() -> None:
    ctl = FakeCtl()
    assert not _run(Stub(ctl, {}), {"a": {"name": "a"}}, set())
    assert ctl.batches == []
    for status in (404, 405, 409, 422):
        stub = Stub(FakeCtl(fail=status), {})
        assert not _run(stub, {"a": {"name": "a"}, "b": {"name": "b"}}, set())
        assert stub.pushed == {}
    with pytest.raises(ControllerApiError):
        _run(Stub(FakeCtl(fail=500), {}), {"a": {"name": "a"}, "b": {"name": "b"}}, set())


def test_single_writes_delete_before_they_put() -> None:
    """A new pod may have recycled a deleted pod's IP: written first, the controller refused it (409)
    and the sync skipped it until the pod changed again."""
    ctl = FakeCtl()
    stub = Stub(ctl, {"old": {"name": "old", "ip": "10.0.0.9"}})
    wanted = {"new": {"name": "new", "ip": "10.0.0.9"}}
    run_async(ClusterSync._apply_singly(stub, wanted, {"old"}, {}))  # type: ignore[arg-type]
    assert ctl.singles == ["delete old", "put new"]
    assert stub.pushed == wanted
