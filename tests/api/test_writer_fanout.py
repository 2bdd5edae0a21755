"""The replica that makes a change builds only what its own polls wait for, and hashes later.

Session 12 (issue 18): a global relabel made the writer build a HostDelta and a history for every
host before its commit (about 30 us per host: 0.3 s at 10,000 hosts, before any agent was
answered), then hash all of them in the flush thread right in the fan-out. Now the writer splits a
label set's set-only change as a follower does (:mod:`stockade.controller.services.pending`): hosts
whose long-poll it holds are built at once, the others keep the shared steps; and a host's policy
hash is written ``hash_delay`` seconds after its bump (:mod:`~stockade.controller.services.policy_hashes`),
building the pending histories then. Proved here, on SQLite and PostgreSQL:

* the change builds a HostPolicy for the relabelled host and the polled host only (the old writer
  built all 24);
* every answer, for every revision an agent may hold, is the policy the compiler gives (the full
  one) or a delta that turns the agent's policy into it;
* no hash is written before the delay, every hash is right after it, a restart keeps every revision.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from tests.api.conftest import Api
from tests.api.test_follower_fanout import HOSTS, _estate, _put, counted  # noqa: F401 (fixture)

from stockade.compiler import Compiler
from stockade.compiler.delta import UpdateKind, apply_update
from stockade.controller.services import policy_hashes
from stockade.controller.services.distribution import PolicyDistributor, policy_hash
from stockade.controller.storage.db import HostStateRow


def _hashed_estate(api: Api) -> PolicyDistributor:
    """The test estate, every host's hash written."""
    _estate(api)
    api.ctl.dist.flush()
    return api.ctl.dist


def _stored(dist: PolicyDistributor) -> dict[str, tuple[int, str]]:
    with dist.sessions.begin() as db:
        return {r.workload: (r.revision, r.policy_hash) for r in db.scalars(select(HostStateRow))}


def _all_right(dist: PolicyDistributor) -> bool:
    stored = _stored(dist)
    return all(stored[n] == (r, policy_hash(dist.compiler.host_policy(n))) for n, r in dist.revisions.items())


def test_the_writer_builds_the_polled_hosts_now_and_the_rest_when_asked(
        quiet_api: Api, counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 (fixture)
    api = quiet_api
    dist = _hashed_estate(api)
    before = {name: dist.current(name)[1] for name in dist.revisions}
    dist.wanted.append(lambda name: name == "h05")  # as if a poll here waited for h05
    counted.clear()
    _put(api, 3, "monitor")  # every host's monitor set gains h03's address; h03's own rules change
    assert set(counted) == {"h03", "h05"}, counted  # the old writer built all 24
    assert len(dist.pending) == HOSTS - 2

    reference = Compiler(dist.assemble(dist.policy_objects))  # every policy compiled afresh
    assert {n: r for n, (r, _h) in _stored(dist).items()} == dist.revisions
    for name, rev in dist.revisions.items():
        want = reference.host_policy(name)
        for since in (None, rev - 1, rev):
            update = dist.fetch(name, since)
            if since == rev:
                assert apply_update(want, rev, update) is None  # unchanged
                continue
            assert apply_update(before[name] if since else None, since or 0, update) == want, (name, since)
    assert not dist.pending  # the answers built them


def test_an_agent_one_step_behind_is_answered_from_the_shared_steps_unbuilt(
        quiet_api: Api, counted: list[str]) -> None:  # noqa: F811 (fixture)
    api = quiet_api
    dist = api.ctl.dist
    _estate(api)
    counted.clear()
    _put(api, 3, "monitor")
    sent = []
    for name, rev in dist.revisions.items():
        if name == "h03":
            continue
        got = dist.fetch_nowait(name, rev - 1)  # what a held long-poll reads on the event loop
        assert got is not None and got.kind is UpdateKind.DELTA and got.base == rev - 1, name
        sent += got.set_deltas
        assert dist.fetch_nowait(name, None) is None  # a full policy needs the host's own: built under the lock
    # each distinct set delta is one object, shared by every host of its label set: encoded once
    assert len({id(d) for d in sent}) == len(set(sent)) < len(sent)
    assert set(counted) == {"h03"}, counted  # nothing built per host for the answers
    assert len(dist.pending) == HOSTS - 1


def test_hashes_wait_for_the_delay_then_cover_pending_hosts(
        quiet_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api = quiet_api
    dist = _hashed_estate(api)
    _put(api, 3, "monitor")
    assert len(dist.pending) == HOSTS - 1  # no poll here: only h03 (a rules change) is built
    dist.flush(hash_after=60.0)
    assert {h for _rev, h in _stored(dist).values()} == {""}  # a global bump, not hashed yet
    _put(api, 4, "monitor")  # bumped again: keeps its first time, hashed at its newest revision
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 61.0)
    dist.flush(hash_after=60.0)
    assert not dist.pending and not dist.unhashed  # built for their hashes
    assert _all_right(dist)
    again = PolicyDistributor(dist.sessions)
    again.load()
    assert again.revisions == dist.revisions  # every hash right: a restart bumps nothing


def test_hashes_wait_for_a_quiet_moment_or_at_most_twelve_delays(
        quiet_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api = quiet_api
    dist = _hashed_estate(api)
    t = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: t[0])  # (the module both services read)
    _put(api, 3, "monitor")  # every host, at t
    t[0] += 30.0
    _put(api, 3, "web")  # every host again, at t + 30: each keeps its first time (t)
    t[0] += 31.0  # t + 61: due since t + 60, but a change was published 31 s ago
    dist.flush(hash_after=60.0)
    assert {h for _r, h in _stored(dist).values()} == {""}
    t[0] += 30.0  # 61 s without a change: quiet, everything is written
    dist.flush(hash_after=60.0)
    assert _all_right(dist)
    # constant churn (a global change every 30 s): hashes wait at most MAX_WAIT_FACTOR x 60 s
    start = t[0]
    flips = 0
    while True:
        t[0] += 30.0
        flips += 1
        _put(api, 3, "monitor" if flips % 2 else "web")
        dist.flush(hash_after=60.0)
        if t[0] - start <= policy_hashes.MAX_WAIT_FACTOR * 60.0:
            assert {h for _r, h in _stored(dist).values()} == {""}, flips
        else:
            assert _all_right(dist)
            break
