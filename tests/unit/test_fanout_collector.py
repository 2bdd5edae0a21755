"""FanoutCollector: young collections put off while a large fan-out is answered, run once after it.

The collector is a fake (it records the calls); the loop and the held polls are real."""

from __future__ import annotations

import asyncio
import gc

from stockade.controller.services.fanout_collector import FanoutCollector
from stockade.controller.services.waiters import Waiters
from tests.asyncutil import run_async


class FakeGc:
    def __init__(self, threshold: tuple[int, int, int] = (20_000, 10, 100)) -> None:
        self.threshold = threshold
        self.calls: list[tuple[str, object]] = []

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, young: int, middle: int, old: int, /) -> None:
        self.threshold = (young, middle, old)
        self.calls.append(("set", self.threshold))

    def collect(self, generation: int, /) -> int:
        self.calls.append(("collect", generation))
        return 0


def test_a_large_wake_puts_young_collections_off_then_runs_one_after_the_quiet_time() -> None:
    fake = FakeGc()

    async def scenario() -> list[tuple[str, object]]:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=100, quiet=0.05, during=1_000_000, collector=fake)
        pacer.woke(60)
        assert not pacer.open and fake.calls == []  # not large yet
        pacer.woke(60)  # 120 within a second: large
        assert pacer.open and fake.threshold == (1_000_000, 10, 100)
        await asyncio.sleep(0.2)
        assert not pacer.open and pacer.windows == 1
        return fake.calls

    calls = run_async(scenario())
    assert calls == [("set", (1_000_000, 10, 100)), ("set", (20_000, 10, 100)), ("collect", 0)]


def test_each_large_wake_moves_the_end_and_only_one_collection_runs() -> None:
    fake = FakeGc()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pacer = FanoutCollector(loop, large=10, quiet=0.15, collector=fake)
        start = loop.time()
        pacer.woke(10)
        await asyncio.sleep(0.1)
        pacer.woke(10)  # a second large wake (another replica's change) before the first window ended
        while pacer.open:
            await asyncio.sleep(0.01)
        assert loop.time() - start >= 0.25 - 0.02  # 0.1 + 0.15: the end moved with the second wake
        assert pacer.windows == 1

    run_async(scenario())
    assert [c for c in fake.calls if c[0] == "collect"] == [("collect", 0)]


def test_small_wakes_spread_out_never_open_a_window() -> None:
    fake = FakeGc()

    async def scenario() -> None:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=10, quiet=0.05, collector=fake)
        pacer._recent_since = -10.0  # a quiet past
        for _ in range(3):
            pacer.woke(9)
            pacer._recent_since -= 2.0  # the next wake is over a second later
        assert not pacer.open

    run_async(scenario())
    assert fake.calls == []


def test_a_threshold_already_above_the_window_is_kept_and_close_restores_without_collecting() -> None:
    fake = FakeGc((5_000_000, 10, 100))

    async def scenario() -> None:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=1, quiet=10.0, during=1_000_000, collector=fake)
        pacer.woke(1)
        assert fake.threshold == (5_000_000, 10, 100)
        pacer.close()
        assert not pacer.open

    run_async(scenario())
    assert fake.threshold == (5_000_000, 10, 100)
    assert all(c[0] == "set" for c in fake.calls)


def test_the_real_collector_gets_its_threshold_back() -> None:
    before = gc.get_threshold()

    async def scenario() -> None:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=1, quiet=0.01, during=before[0] + 12_345)
        pacer.woke(1)
        assert gc.get_threshold()[0] == before[0] + 12_345
        await asyncio.sleep(0.1)
        assert pacer.windows == 1

    try:
        run_async(scenario())
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)


def test_waiters_report_how_many_polls_a_wake_answered() -> None:
    async def scenario() -> tuple[int, int, list[bool]]:
        w = Waiters()
        polls = [asyncio.ensure_future(w.wait("web-1", 5.0)) for _ in range(3)]
        other = asyncio.ensure_future(w.wait("db-1", 5.0))
        await asyncio.sleep(0)
        woken, none = w.wake("web-1"), w.wake("nobody")
        results = list(await asyncio.gather(*polls))
        other.cancel()
        return woken, none, results

    woken, none, results = run_async(scenario())
    assert (woken, none, results) == (3, 0, [True, True, True])
