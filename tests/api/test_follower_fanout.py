"""A follower does not rebuild a fan-out the writer computed for hosts no poll on it holds.

Two controller apps on one PostgreSQL database, in one process (the ``pair`` fixture of
``test_replicas_follow``). A global relabel changes one address set that every host's rules
reference: the writer (A) builds a HostDelta and a history per host; the follower (B) used to
do exactly the same for all of them (issue 18: 77 % of a follower's catch-up at 10,000 hosts).
Now B keeps the label set's shared set deltas as pending steps for hosts none of its polls holds,
and builds a host's history when someone asks for it. Proved here:

* B's catch-up builds no HostPolicy per host (counted; the old code built one per host);
* every answer B gives, for every revision an agent may hold, equals A's (deltas and full
  policies), through set-only steps, a re-address and a relabel of pending hosts, a host a poll
  on B waits for (built at once), and a write made through B itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from tests.api.conftest import Api
from tests.api.test_replicas_follow import pair  # noqa: F401 (fixture)

from stockade.compiler import Compiler
from stockade.compiler.delta import PolicyUpdate, UpdateKind
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.storage.db import ChangeRow

HOSTS = 24


def _estate(a: Api) -> None:
    a.ok("POST", "/services", 201, json={"name": "ssh", "ports": ["22/tcp"]})
    a.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    a.ok("POST", "/rulesets", 201, json={"name": "monitoring", "scope": "all", "rules": [
        {"consumers": [{"labels": {"role": "monitor"}}], "providers": "all", "services": ["ssh"],
         "consumers_scope": "global"}]})
    a.ok("POST", "/rulesets", 201, json={"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["pg"]}]})
    a.ok("POST", "/policy/provision", 201, json={"message": "t"})
    a.ok("POST", "/workload-batches", 200, json={"upsert": [_body(i, "web" if i % 2 else "db") for i in range(HOSTS)]})


def _body(i: int, role: str, addr: str | None = None) -> dict[str, Any]:
    return {"name": f"h{i:02d}", "labels": {"app": "shop", "role": role},
            "interfaces": [{"name": "eth0", "addresses": [addr or f"10.6.0.{i + 1}"]}]}


def _put(api: Api, i: int, role: str, addr: str | None = None) -> None:
    api.ok("PUT", f"/workloads/h{i:02d}", json=_body(i, role, addr))


def _answers(dist: PolicyDistributor) -> dict[tuple[str, int | None], PolicyUpdate]:
    out: dict[tuple[str, int | None], PolicyUpdate] = {}
    for name in sorted(dist.revisions):
        for since in (None, *range(1, dist.revisions[name] + 1)):
            out[name, since] = dist.fetch(name, since)
    return out


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    built: list[str] = []
    real = Compiler.host_policy

    def host_policy(self: Compiler, name: str) -> Any:
        built.append(name)
        return real(self, name)

    monkeypatch.setattr(Compiler, "host_policy", host_policy)
    yield built


def test_a_follower_builds_no_host_policy_for_a_fanout_nobody_polls_on_it(
        pair: tuple[Api, Api], counted: list[str]) -> None:  # noqa: F811 (fixture)
    a, b = pair
    _estate(a)
    b.ctl.dist.follow_changes()
    counted.clear()
    _put(a, 3, "monitor")  # every host's monitor set gains h03's address; h03's own rules change
    writer = set(counted)
    counted.clear()
    assert b.ctl.dist.follow_changes() == 1
    assert b.ctl.dist.revisions == a.ctl.dist.revisions
    # the writer too builds only h03 (session 12; session 11's built every host: its agents may be anywhere)
    assert writer <= {"h03"}, writer
    assert len(a.ctl.dist.pending) == HOSTS - 1
    assert set(counted) <= {"h03"}, counted  # B: only h03 (a rules change); the old code built all 24
    assert len(b.ctl.dist.pending) == HOSTS - 1
    assert _answers(b.ctl.dist) == _answers(a.ctl.dist)  # built when asked: the same deltas
    assert not b.ctl.dist.pending


def test_every_answer_of_the_follower_equals_the_writers(pair: tuple[Api, Api]) -> None:  # noqa: F811 (fixture)
    a, b = pair
    _estate(a)
    b.ctl.dist.follow_changes()
    b.ctl.dist.wanted.append(lambda name: name == "h05")  # as if a poll on B waited for h05
    monitor = False
    for step in range(12):
        if step == 4:
            _put(a, 7, "db", "10.6.1.7")  # a pending host re-addressed: its own policy changes
        elif step == 7:
            _put(a, 9, "monitor")  # a pending host relabelled: rules change
        elif step == 9:
            _put(b, 11, "monitor")  # a write through B: its own bumps on top of pending steps
            a.ctl.dist.follow_changes()
        else:
            monitor = not monitor
            _put(a, 3, "monitor" if monitor else "web")  # set-only for everyone else
        b.ctl.dist.follow_changes()
        assert b.ctl.dist.revisions == a.ctl.dist.revisions
        assert "h05" not in b.ctl.dist.pending
        if step in (5, 10):  # hosts whose pending steps were never built, then several steps more
            assert b.ctl.dist.pending
            continue
        assert _answers(b.ctl.dist) == _answers(a.ctl.dist), step
    deltas = [u for (_n, since), u in _answers(b.ctl.dist).items() if since and u.set_deltas]
    assert deltas  # agents several revisions behind still get deltas, not only full policies


def test_a_follower_rebuilding_from_a_pruned_log_drops_its_pending_steps(
        pair: tuple[Api, Api]) -> None:  # noqa: F811 (fixture)
    a, b = pair
    _estate(a)
    b.ctl.dist.follow_changes()
    _put(a, 3, "monitor")
    b.ctl.dist.follow_changes()
    assert b.ctl.dist.pending  # steps nobody asked for yet
    _put(a, 3, "web")
    _put(a, 4, "db", "10.6.2.4")
    with a.ctl.sessions.begin() as s:  # the log forgot everything up to the newest row
        newest = s.scalar(select(func.max(ChangeRow.id)))
        s.execute(delete(ChangeRow).where(ChangeRow.id < newest))
    assert b.ctl.dist.follow_changes() == 1  # resync: from the stored state, not from memory
    assert not b.ctl.dist.pending
    assert b.ctl.dist.revisions == a.ctl.dist.revisions
    for name in a.ctl.dist.revisions:
        assert b.ctl.dist.fetch(name, None) == a.ctl.dist.fetch(name, None)
        assert b.ctl.dist.fetch(name, b.ctl.dist.revisions[name]).kind is UpdateKind.UNCHANGED
