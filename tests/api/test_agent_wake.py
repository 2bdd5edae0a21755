"""An agent's long-poll woken by a change answers on the next turn of the event loop.

A global change wakes every held poll at once (25,000 in issue 18's bench); each poll used to
wait on an ``asyncio.Event`` under ``wait_for``: a task per poll and three turns of the loop,
each turn behind every other woken poll. Counted in turns, not timed, together with what must
not change: a poll not woken times out with the current revision, two polls of one host are both
woken, and a timed-out or cancelled poll leaves no waiter behind (``wants`` is exact).
"""

from __future__ import annotations

import asyncio

import pytest
from tests.api.conftest import Api
from tests.api.test_agents import POLICY
from tests.asyncutil import run_async


def _host(api: Api) -> tuple[str, int]:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    api.ok("POST", "/workloads", 201, json={"name": "db-1", "labels": {"app": "shop", "role": "db"},
                                            "interfaces": [{"name": "eth0", "addresses": ["10.0.0.2"]}]})
    return "db-1", api.ctl.dist.revisions["db-1"]


def test_a_woken_agent_poll_answers_on_the_next_turn_and_leaves_no_waiter(api: Api) -> None:
    name, rev = _host(api)
    dist = api.ctl.dist

    async def main() -> tuple[int, int, int]:
        first = asyncio.ensure_future(dist.wait(name, rev, 30))
        second = asyncio.ensure_future(dist.wait(name, rev, 30))
        await asyncio.sleep(0.02)
        assert not first.done() and not second.done() and dist.holds(name)
        dist.revisions[name] = rev + 1  # as publish does, then it wakes the loop
        dist._wake((name,))
        turns = 0
        while not first.done():
            turns += 1
            assert turns < 50, "the woken poll never answered"
            await asyncio.sleep(0)
        return turns, first.result(), await asyncio.wait_for(second, 5)

    try:
        turns, got, other = run_async(main())
    finally:
        dist.revisions[name] = rev
    assert got == other == rev + 1
    assert turns == 1  # an Event under wait_for took 3 on Python 3.11
    assert not dist.holds(name)


def test_an_agent_poll_not_woken_times_out_and_a_cancelled_one_leaves_no_waiter(api: Api) -> None:
    name, rev = _host(api)
    dist = api.ctl.dist

    async def main() -> int:
        got = await dist.wait(name, rev, 0.05)
        assert not dist.holds(name)  # the Event of a timed-out poll stayed until the next change
        poll = asyncio.ensure_future(dist.wait(name, rev, 30))
        await asyncio.sleep(0.02)
        assert dist.holds(name)
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
        assert not dist.holds(name)
        dist._wake((name,))  # nobody waiting: nothing happens
        return got

    assert run_async(main()) == rev
