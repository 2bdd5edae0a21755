"""Golden files for the Windows Firewall renderer: tests/golden/windows/<case>.ps1.

The host policies are the nftables cases (every rule shape and mode), rendered with dynamic
keywords, and a few again with address lists (``<case>.lists.ps1``). On a mismatch the
rendering is written to ``<file>.actual`` beside the golden file; ``STOCKADE_UPDATE_GOLDEN=1``
rewrites the golden files. Every golden file must also parse with tree-sitter-powershell.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.backends.windows.backend import WindowsFirewallBackend
from stockade.backends.windows.model import PeerMode
from tests.golden.nft_cases import CASES, Case

GOLDEN_DIR = Path(__file__).parent / "windows"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"
NFT_ONLY = {"forward", "custom_table_log_group"}  # options of the nftables backend only
LIST_CASES = {"full_basic", "deny_crossed_by_allow", "empty_sets", "controller_failsafe", "v6_only"}

VARIANTS: list[tuple[str, Case, PeerMode]] = [
    (c.name, c, PeerMode.DYNAMIC_KEYWORDS) for c in CASES if c.name not in NFT_ONLY
] + [(f"{c.name}.lists", c, PeerMode.ADDRESS_LISTS) for c in CASES if c.name in LIST_CASES]


def render(case: Case, mode: PeerMode) -> str:
    return WindowsFirewallBackend(mode).render(case.policy).to_text()


def check_golden(golden: Path, text: str) -> None:
    actual = golden.with_name(golden.name + ".actual")
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    if not golden.exists():
        actual.write_text(text)
        pytest.fail(f"no golden file {golden}; wrote {actual} (set STOCKADE_UPDATE_GOLDEN=1 to accept)")
    if golden.read_text() != text:
        actual.write_text(text)
        pytest.fail(f"rendering differs from {golden}; see {actual} (STOCKADE_UPDATE_GOLDEN=1 to accept)")
    actual.unlink(missing_ok=True)


@pytest.mark.parametrize(("name", "case", "mode"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_golden(name: str, case: Case, mode: PeerMode) -> None:
    check_golden(GOLDEN_DIR / f"{name}.ps1", render(case, mode))


def test_rendering_is_deterministic() -> None:
    for _, case, mode in VARIANTS:
        assert render(case, mode) == render(case, mode)


def test_every_golden_file_has_a_case() -> None:
    names = {v[0] for v in VARIANTS}
    orphans = [p.name for p in GOLDEN_DIR.glob("*.ps1") if p.name[: -len(".ps1")] not in names]
    assert orphans == []


@pytest.mark.parametrize(("name", "case", "mode"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_golden_parses_as_powershell(name: str, case: Case, mode: PeerMode) -> None:
    ts = pytest.importorskip("tree_sitter")
    tsp = pytest.importorskip("tree_sitter_powershell")
    golden = GOLDEN_DIR / f"{name}.ps1"
    if not golden.exists():
        pytest.skip("golden file not written yet")
    tree = ts.Parser(ts.Language(tsp.language())).parse(golden.read_bytes())
    assert not tree.root_node.has_error
