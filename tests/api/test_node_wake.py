"""A node long-poll woken by a commit answers on the next turn of the event loop (issue 15's fan-out).

During pod churn every batch wakes most nodes' long-polls, and the acks and next polls of those
nodes then fill each turn of the controller's event loop; a woken poll that needs several turns
before it answers queues behind them each time. Proved by counting turns, not by timing, together
with what must not change: a poll not woken times out with nothing, a cancelled one leaves no
waiter behind, and every poll of a node is woken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from tests.api.conftest import Api
from tests.asyncutil import run_async
from tests.security.test_node_poll import _estate

from stockade.controller.services import node_distribution
from stockade.controller.services.node_distribution import HeldPod, NodeDistribution

POD = "k8s.shop.db-1"  # on node-a (tests/security/test_node_poll.py's estate)


@pytest.fixture
def nodes(api: Api) -> Iterator[tuple[NodeDistribution, int]]:
    _estate(api)
    dist = api.ctl.dist
    rev = dist.revisions[POD]
    yield node_distribution.for_dist(dist), rev
    dist.revisions[POD] = rev


async def _turns_until(task: asyncio.Future[list[HeldPod]]) -> int:
    turns = 0
    while not task.done():
        turns += 1
        assert turns < 50, "the woken poll never answered"
        await asyncio.sleep(0)  # one turn of the loop
    return turns


def test_a_woken_poll_answers_on_the_next_turn(nodes: tuple[NodeDistribution, int]) -> None:
    nd, rev = nodes
    held = (HeldPod("a" * 16, POD, rev),)

    async def main() -> tuple[int, list[HeldPod], list[HeldPod]]:
        first = asyncio.ensure_future(nd.wait("node-a", held, 30))
        second = asyncio.ensure_future(nd.wait("node-a", held, 30))  # a node's overlapping polls
        await asyncio.sleep(0.02)
        assert not first.done() and not second.done()
        nd.dist.revisions[POD] = rev + 1  # as PolicyDistributor.publish does, then it wakes the loop
        nd.on_wake((POD,))
        turns = await _turns_until(first)
        await asyncio.wait_for(second, 5)
        return turns, first.result(), second.result()

    turns, first, second = run_async(main())
    assert first == second == list(held)
    assert turns == 1  # an Event under wait_for took 3 on Python 3.11
    assert "node-a" not in nd._waiters


def test_a_poll_not_woken_times_out_empty_and_a_cancelled_one_leaves_no_waiter(
        nodes: tuple[NodeDistribution, int]) -> None:
    nd, rev = nodes
    held = (HeldPod("a" * 16, POD, rev),)

    async def main() -> list[HeldPod]:
        got = await nd.wait("node-a", held, 0.05)
        assert "node-a" not in nd._waiters
        poll = asyncio.ensure_future(nd.wait("node-a", held, 30))
        await asyncio.sleep(0.02)
        assert nd._waiters.held("node-a") == 1
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
        assert "node-a" not in nd._waiters
        nd.on_wake((POD,))  # nobody waiting: nothing happens
        # a wake for another node's pod does not answer this one
        other = asyncio.ensure_future(nd.wait("node-a", held, 0.1))
        await asyncio.sleep(0.02)
        nd.on_wake(("k8s.shop.db-3",))  # on node-b
        await asyncio.sleep(0)
        assert not other.done()
        assert await other == []
        return got

    assert run_async(main()) == []
