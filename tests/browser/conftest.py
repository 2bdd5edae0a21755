"""Browser tests: Playwright (sync API) driving Debian's chromium against a live controller.

Everything here is marked ``browser`` and skips cleanly, with the reason, when
``/usr/bin/chromium`` or the playwright package is missing. One controller (seeded with a small
estate) serves the whole session; each test gets a fresh browser context already logged in
(the session cookie comes from ``POST /auth/login``, as the console's own login form does).
Uncaught JavaScript errors fail the test. Screenshots go to ``out/screenshots`` (gitignored), or
``$STOCKADE_SCREENSHOTS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import REPO, Console, chromium_skip_reason, launch_chromium, running_controller, seed_estate


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless chromium against a live controller (tests/browser)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = chromium_skip_reason()
    for item in items:
        if "tests/browser" in str(item.fspath):
            # a module's tests share the worker's estate and build on each other in file order:
            # keep each module on one worker (modules still spread over the workers)
            item.add_marker(pytest.mark.xdist_group(f"browser-{Path(str(item.fspath)).stem}"))
        if "tests/browser" in str(item.fspath) and item.get_closest_marker("browser") is not None and reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def console() -> Iterator[Console]:
    with running_controller() as c:
        seed_estate(c)
        yield c


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch_chromium(pw)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def session_cookie(console: Console) -> str:
    return console.session_cookie()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    out = Path(os.environ.get("STOCKADE_SCREENSHOTS", REPO / "out" / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_context(browser: Any, console: Console, cookie: str | None, **kw: Any) -> Any:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=console.url, **kw)
    ctx.set_default_timeout(15000)
    if cookie:
        ctx.add_cookies([{"name": "stockade_session", "value": cookie, "url": console.url}])
    return ctx


class PageErrors:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def attach(self, page: Any) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"{exc}"))


def checked_page(browser: Any, console: Console, cookie: str | None) -> Iterator[Any]:
    """A page in a fresh context with ``cookie``; fails the test on any uncaught JavaScript error."""
    ctx = new_context(browser, console, cookie)
    errors = PageErrors()
    pg = ctx.new_page()
    errors.attach(pg)
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors.errors, f"uncaught JavaScript errors: {errors.errors}"


@pytest.fixture
def page(browser: Any, console: Console, session_cookie: str) -> Iterator[Any]:
    yield from checked_page(browser, console, session_cookie)


@pytest.fixture
def anonymous_page(browser: Any, console: Console) -> Iterator[Any]:
    ctx = new_context(browser, console, None)
    errors = PageErrors()
    pg = ctx.new_page()
    errors.attach(pg)
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors.errors, f"uncaught JavaScript errors: {errors.errors}"
