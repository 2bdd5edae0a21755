"""Run asyncio code and Playwright's sync API from tests in a thread of their own.

``python -m pytest -n 2`` (``--dist loadgroup``) puts browser tests and other tests in the same
xdist worker. The browser layer's session-scoped sync Playwright (tests/browser/conftest.py) leaves
an asyncio event loop running in the worker's main thread, so a later ``asyncio.run`` or
``sync_playwright()`` there fails ("cannot be called from a running event loop", "Playwright Sync API
inside the asyncio loop"). A fresh thread has no running loop: every test outside tests/browser
that runs a coroutine or a sync Playwright goes through these helpers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def in_thread(fn: Callable[[], T], timeout: float = 300.0, name: str = "test-thread") -> T:
    """``fn()`` run in a new thread; its result is returned and its exception re-raised here."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{name} did not finish in {timeout:.0f} s"
    if errors:
        raise errors[0]
    return result[0]


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
    """``asyncio.run(coro)`` in a new thread (none of the caller's event loop leaks in)."""
    return in_thread(lambda: asyncio.run(coro), timeout, name="asyncio")
