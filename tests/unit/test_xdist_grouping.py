"""``--dist loadgroup`` really keeps a group on one worker (see tests/conftest.py), checked by a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CASES = '''
import os
from pathlib import Path

import pytest

OUT = Path(__file__).parent / "ran"


def record(name: str) -> None:
    with OUT.open("a") as f:
        f.write(f"{name} {os.environ.get('PYTEST_XDIST_WORKER', '-')}\\n")


@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("n", range(8))
def test_grouped(n: int) -> None:
    record(f"grouped-{n}")


@pytest.mark.parametrize("n", range(8))
def test_free(n: int) -> None:
    record(f"free-{n}")


@pytest.mark.parametrize("n", range(8))
def test_late(n: int) -> None:  # grouped by a plugin's hook (as tests/browser/conftest.py does)
    record(f"late-{n}")
'''

LATE_PLUGIN = '''
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name.startswith("test_late"):
            item.add_marker(pytest.mark.xdist_group("late"))
'''


def test_a_group_runs_on_one_worker(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "late_plugin.py").write_text(LATE_PLUGIN)
    path = os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
         "-p", "late_plugin", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [line.split() for line in (tmp_path / "ran").read_text().splitlines()]
    assert len(ran) == 24
    for group in ("grouped-", "late-"):
        assert len({worker for name, worker in ran if name.startswith(group)}) == 1, ran
