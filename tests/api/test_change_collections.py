"""A large change keeps the garbage collector out of its critical path (issue 18, session 13).

Through the API, on SQLite and PostgreSQL, and through a follower's catch-up on PostgreSQL:

* a transaction (the writer) and a catch-up (a follower) run with the collector paused;
* a change that bumps ``large`` hosts opens the window: the young threshold is raised at once,
  and one young collection runs ``quiet`` seconds after the last large change, when the threshold
  goes back; a small change opens none.

The collector is a fake that records the calls (the real one's effect is measured by
bench/controller.py); the app, its event loop, the database and the follower are real.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.orm import Session
from tests.api.conftest import Api
from tests.api.test_follower_fanout import HOSTS, _estate, _put
from tests.api.test_replicas_follow import pair  # noqa: F401 (fixture)
from tests.unit.test_fanout_collector import FakeGc

from stockade.controller.services import replicas
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.fanout_collector import FanoutCollector


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


def _fake_window(dist: PolicyDistributor, large: int) -> tuple[FakeGc, FanoutCollector]:
    assert dist.loop is not None
    fake = FakeGc()
    dist.fanouts = FanoutCollector(dist.loop, large=large, quiet=0.1, during=1_000_000, collector=fake)
    return fake, dist.fanouts


def test_a_large_change_puts_the_young_collections_off_and_runs_one_after_it(api: Api) -> None:
    _estate(api)
    dist = api.ctl.dist
    saved = dist.fanouts
    fake, window = _fake_window(dist, HOSTS)
    seen: list[bool] = []
    dist.fault_hook = lambda where: seen.append(gc.isenabled()) if where == "before-commit" else None
    try:
        api.ok("POST", "/workloads", 201, json={"name": "lone", "labels": {"app": "other", "role": "x"},
                                                "interfaces": [{"name": "eth0", "addresses": ["10.9.0.1"]}]})
        assert fake.calls == [] and not window.open  # one host: small
        _put(api, 3, "monitor")  # every host's monitor set changes: HOSTS hosts
        assert window.open and fake.threshold == (1_000_000, 10, 100)
        _until(lambda: window.windows == 1)
    finally:
        dist.fault_hook = None
        dist.fanouts = saved
    assert seen == [False, False]  # both transactions ran with the collector paused
    assert gc.isenabled()
    assert fake.calls == [("set", (1_000_000, 10, 100)), ("collect", 0), ("set", (20_000, 10, 100))]


def test_changes_in_a_row_keep_one_window_open_until_the_last_is_quiet(api: Api) -> None:
    _estate(api)
    dist = api.ctl.dist
    saved = dist.fanouts
    fake, window = _fake_window(dist, HOSTS)
    try:
        for role in ("monitor", "web", "monitor"):
            _put(api, 3, role)
            assert window.open
        _until(lambda: window.windows == 1)
    finally:
        dist.fanouts = saved
    assert [c for c in fake.calls if c[0] == "collect"] == [("collect", 0)]
    assert fake.threshold == (20_000, 10, 100)


def test_a_follower_catches_up_with_the_collector_paused_and_opens_the_window(
        pair: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 (fixture)
    a, b = pair
    _estate(a)
    b.ctl.dist.follow_changes()
    saved = b.ctl.dist.fanouts
    fake, window = _fake_window(b.ctl.dist, HOSTS)
    seen: list[bool] = []
    follow = replicas.follow

    def watched(dist: PolicyDistributor, db: Session) -> Any:
        seen.append(gc.isenabled())
        return follow(dist, db)

    monkeypatch.setattr(replicas, "follow", watched)
    try:
        _put(a, 3, "monitor")
        assert b.ctl.dist.follow_changes() == 1
        # every catch-up ran paused (B's; A's own transaction may catch up too), and B's publish
        # opened the window
        assert seen and not any(seen) and window.open
        _until(lambda: window.windows == 1)
    finally:
        b.ctl.dist.fanouts = saved
    assert gc.isenabled()
    assert b.ctl.dist.revisions == a.ctl.dist.revisions
    assert fake.calls == [("set", (1_000_000, 10, 100)), ("collect", 0), ("set", (20_000, 10, 100))]
