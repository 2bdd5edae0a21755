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


# Every kernel e2e test puts the estate's controller address (10.70.0.1, fd70::1) on a link in the root
# namespace or probes it: two at once would steal each other's packets. With ``--dist loadgroup``
# (pyproject's addopts) xdist runs them all in one worker, one module after another, in file order
# (several modules keep state across their tests); ``harness.address_lock`` also serialises other
# runs on the machine.
ESTATE_ADDRESS_GROUP = "estate-controller-address"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath) and item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.xdist_group(ESTATE_ADDRESS_GROUP))
    reason = kernel_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("kernel") is not None and "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))
