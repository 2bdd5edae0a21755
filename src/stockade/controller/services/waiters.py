"""Held long-polls by key, each awaiting a future of its own (:class:`Waiters`).

A poll woken by a change answers on the very next turn of the event loop: an ``asyncio.Event``
under ``wait_for`` cost a task and three turns per poll on Python 3.11, and a global change wakes
25,000 of them at once, each turn queueing behind all the others. A poll that times out or is cut
(its client left: the request task is cancelled) leaves no waiter behind. Event-loop only.
"""

from __future__ import annotations

import asyncio


class Waiters:
    """Futures of the polls held per key (a host, a node), resolved True when woken."""

    def __init__(self) -> None:
        self._held: dict[str, list[asyncio.Future[bool]]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._held

    def __bool__(self) -> bool:
        return bool(self._held)

    def held(self, key: str) -> int:
        """How many polls ``key`` holds now."""
        return len(self._held.get(key, ()))

    def wake(self, key: str) -> None:
        for woken in self._held.pop(key, ()):
            _resolve_once(woken, True)

    async def wait(self, key: str, timeout: float) -> bool:
        """Until :meth:`wake` of ``key`` (True) or ``timeout`` seconds (False)."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[bool] = loop.create_future()
        self._held.setdefault(key, []).append(woken)
        timer = loop.call_later(timeout, _resolve_once, woken, False)
        try:
            return await woken
        finally:
            timer.cancel()
            left = self._held.get(key)
            if left is not None and woken in left:  # timed out or cancelled: not woken
                left.remove(woken)
                if not left:
                    del self._held[key]


def _resolve_once(waiter: asyncio.Future[bool], woken: bool) -> None:
    if not waiter.done():
        waiter.set_result(woken)
