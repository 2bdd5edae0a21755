"""``pending.wanted_among``: the hosts whose history a follower builds at once, found in
one pass per kind of want, exactly those :meth:`wants` names one by one."""

from __future__ import annotations

import asyncio
from typing import Any

from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.pending import wanted_among
from tests.asyncutil import run_async


def test_wanted_among_is_wants_host_by_host() -> None:
    dist = PolicyDistributor(sessions=None)  # type: ignore[arg-type]  # (nothing here reads the database)
    names = [f"h{i}" for i in range(40)]
    dist.wanted.append(lambda n: n.endswith("7"))
    dist.wanted.append({"h3", "h30", "nowhere"}.__contains__)

    async def run() -> tuple[set[str], list[str]]:
        polls: list[Any] = [asyncio.ensure_future(dist._waiters.wait(n, 5.0)) for n in ("h1", "h3", "h11", "x")]
        await asyncio.sleep(0)  # the polls are held now
        try:
            return wanted_among(dist, names), [n for n in names if dist.wants(n)]
        finally:
            for poll in polls:
                poll.cancel()
            await asyncio.gather(*polls, return_exceptions=True)

    found, one_by_one = run_async(run())
    assert found == set(one_by_one) == {"h3", "h7", "h17", "h27", "h37", "h30"}  # a held poll alone is no want
    assert wanted_among(dist, []) == set()
