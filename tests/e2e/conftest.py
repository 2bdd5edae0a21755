"""End-to-end setup: kernel tests skip cleanly unless root with ``ip`` and ``nft``.

Tests here that do not need the kernel (the agent against an in-process controller with the
in-memory firewall) run everywhere.
"""

from __future__ import annotations

import os
import shutil

import pytest


def kernel_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end kernel tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"end-to-end kernel tests need {tool!r} on PATH"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("kernel") is not None and "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))
