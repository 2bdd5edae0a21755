"""Golden files for the nftables renderer: tests/golden/nftables/<case>.nft.

On a mismatch the rendering is written to ``<case>.nft.actual`` beside the golden file so a
reviewer can diff real nft syntax; ``STOCKADE_UPDATE_GOLDEN=1`` rewrites the golden files.
When root with ``nft`` available, every golden file is also checked by the kernel's parser
(``nft -c -f``) inside a throwaway network namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.backends.nftables.backend import NftablesBackend
from tests.golden.nft_cases import CASES as BASE_CASES
from tests.golden.nft_cases import SCTP_CASES, Case

GOLDEN_DIR = Path(__file__).parent / "nftables"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"
CASES = BASE_CASES + SCTP_CASES


def render(case: Case) -> str:
    backend = NftablesBackend(table=case.table, log_group=case.log_group, forward=case.forward)
    return backend.render(case.policy).to_text()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Case) -> None:
    text = render(case)
    golden = GOLDEN_DIR / f"{case.name}.nft"
    actual = GOLDEN_DIR / f"{case.name}.nft.actual"
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden.write_text(text)
    if not golden.exists():
        actual.write_text(text)
        pytest.fail(f"no golden file {golden}; wrote {actual} (set STOCKADE_UPDATE_GOLDEN=1 to accept)")
    if golden.read_text() != text:
        actual.write_text(text)
        pytest.fail(f"rendering differs from {golden}; see {actual} (STOCKADE_UPDATE_GOLDEN=1 to accept)")
    actual.unlink(missing_ok=True)


def test_rendering_is_deterministic() -> None:
    for case in CASES:
        assert render(case) == render(case)


def test_every_golden_file_has_a_case() -> None:
    names = {c.name for c in CASES}
    orphans = [p.name for p in GOLDEN_DIR.glob("*.nft") if p.stem not in names]
    assert orphans == []


def _can_check_in_kernel() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    reason = _can_check_in_kernel()
    if reason:
        pytest.skip(reason)
    name = f"stk-gold-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_parses(case: Case, netns: str) -> None:
    golden = GOLDEN_DIR / f"{case.name}.nft"
    if not golden.exists():
        pytest.skip("golden file not written yet")
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-c", "-f", str(golden)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
