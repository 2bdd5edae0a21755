"""Kernel-layer setup: skip cleanly unless root with ``ip`` and ``nft`` available.

Every test here is marked ``kernel``; when the machine cannot run them they are
skipped with the reason, never failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from stockade.lab.estate import EstateLab
from tests import strategies


def kernel_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"kernel tests need {tool!r} on PATH"
    if not os.path.isdir("/proc/sys/net/ipv6"):
        return "kernel tests need IPv6"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the lab's counts (``N probes, M disagreements``), also from xdist workers."""
    lines: list[str] = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if key == "lab_summary":
                    lines.append(str(value))
    if lines:
        terminalreporter.write_sep("-", "kernel lab")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def slot_lab() -> Iterator[EstateLab]:
    """One long-lived lab with every workload slot of ``tests.strategies`` and the office client."""
    with EstateLab(strategies.LAB_HOSTS) as estate:
        yield estate


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace for one test (a module may define its own ``netns``)."""
    name = f"stk-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
