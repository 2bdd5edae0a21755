"""FanoutCollector: young collections put off while a large change is answered, one run after it;
collections_paused: none inside.

The collector is a fake (it records the calls) except in the last tests; the loop and threads are real."""

from __future__ import annotations

import asyncio
import gc
import threading

from stockade.compiler import collections_paused
from stockade.controller.services.fanout_collector import FanoutCollector
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


def test_a_large_change_puts_young_collections_off_then_runs_one_after_the_quiet_time() -> None:
    fake = FakeGc()

    async def scenario() -> list[tuple[str, object]]:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=100, quiet=0.05, during=1_000_000, collector=fake)
        pacer.begin(99)
        assert not pacer.open and fake.calls == []  # not large
        pacer.begin(100)
        assert pacer.open and fake.threshold == (1_000_000, 10, 100)
        await asyncio.sleep(0.2)
        assert not pacer.open and pacer.windows == 1
        return fake.calls

    calls = run_async(scenario())
    assert calls == [("set", (1_000_000, 10, 100)), ("collect", 0), ("set", (20_000, 10, 100))]


def test_a_change_from_another_thread_opens_the_window_at_once_and_its_end_runs_on_the_loop() -> None:
    fake = FakeGc()
    ended_on: list[str] = []

    class Recording(FakeGc):
        def collect(self, generation: int, /) -> int:
            ended_on.append(threading.current_thread().name)
            return fake.collect(generation)

    async def scenario() -> None:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=10, quiet=0.05, collector=Recording())
        opened: list[bool] = []
        worker = threading.Thread(target=lambda: (pacer.begin(10), opened.append(pacer.open)), name="catch-up")
        worker.start()
        await asyncio.to_thread(worker.join)
        assert opened == [True]  # before the thread went on to answer anything
        while not pacer.windows:
            await asyncio.sleep(0.01)

    run_async(scenario())
    assert ended_on == ["asyncio"]  # the loop's thread (tests.asyncutil.run_async)


def test_each_large_change_moves_the_end_and_only_one_collection_runs() -> None:
    fake = FakeGc()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pacer = FanoutCollector(loop, large=10, quiet=0.15, collector=fake)
        start = loop.time()
        pacer.begin(10)
        await asyncio.sleep(0.1)
        pacer.begin(25_000)  # a second large change before the first window ended
        while pacer.open:
            await asyncio.sleep(0.01)
        assert loop.time() - start >= 0.25 - 0.02  # 0.1 + 0.15: the end moved with the second change
        assert pacer.windows == 1

    run_async(scenario())
    assert [c for c in fake.calls if c[0] == "collect"] == [("collect", 0)]


def test_a_threshold_already_above_the_window_is_kept_and_close_restores_without_collecting() -> None:
    fake = FakeGc((5_000_000, 10, 100))

    async def scenario() -> None:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=1, quiet=10.0, during=1_000_000, collector=fake)
        pacer.begin(1)
        assert fake.threshold == (5_000_000, 10, 100)
        pacer.close()
        assert not pacer.open
        pacer.begin(1)  # a change published while stopping opens nothing
        assert not pacer.open

    run_async(scenario())
    assert fake.threshold == (5_000_000, 10, 100)
    assert all(c[0] == "set" for c in fake.calls)


def test_the_real_collector_gets_its_threshold_back() -> None:
    before = gc.get_threshold()

    async def scenario() -> None:
        pacer = FanoutCollector(asyncio.get_running_loop(), large=1, quiet=0.01, during=before[0] + 12_345)
        pacer.begin(1)
        assert gc.get_threshold()[0] == before[0] + 12_345
        await asyncio.sleep(0.1)
        assert pacer.windows == 1

    try:
        run_async(scenario())
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)


def test_no_collection_runs_inside_a_pause_and_the_outer_pause_turns_the_collector_back_on() -> None:
    assert gc.isenabled()
    collected: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    gc.callbacks.append(count)
    try:
        with collections_paused():
            assert not gc.isenabled()
            with collections_paused():  # the compiler's own pause inside a transaction
                pass
            assert not gc.isenabled()
            cycles = []
            for _ in range(50_000):  # enough allocations for two young collections at CPython's 700..20,000
                a: list[object] = []
                a.append(a)
                cycles.append(a)
            del cycles
            assert collected == []
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.enable()
