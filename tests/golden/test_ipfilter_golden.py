"""Golden files for the IPFilter renderer: tests/golden/ipfilter/<case>.ipf.

Each file holds the three artifacts (ippool.conf, ipf.conf, ipf6.conf) for the nftables cases
(every rule shape and mode), plus variants with IPv6 peers inlined (``.inline6``) and with
the second pool slot (``.slotb``). On a mismatch the rendering is written to
``<file>.actual``; ``STOCKADE_UPDATE_GOLDEN=1`` rewrites the golden files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.backends.ipfilter.backend import IpfilterBackend
from stockade.backends.ipfilter.render import Slot
from tests.golden.nft_cases import CASES, Case

GOLDEN_DIR = Path(__file__).parent / "ipfilter"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"
NFT_ONLY = {"forward", "custom_table_log_group"}
INLINE_CASES = {"full_basic", "v6_only", "empty_sets"}

VARIANTS: list[tuple[str, Case, bool, Slot]] = (
    [(c.name, c, False, Slot.A) for c in CASES if c.name not in NFT_ONLY]
    + [(f"{c.name}.inline6", c, True, Slot.A) for c in CASES if c.name in INLINE_CASES]
    + [(f"{c.name}.slotb", c, False, Slot.B) for c in CASES if c.name == "deny_crossed_by_allow"]
)


def render(case: Case, inline_v6: bool, slot: Slot) -> str:
    return IpfilterBackend(inline_v6=inline_v6).render(case.policy).to_text(slot)


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


@pytest.mark.parametrize(("name", "case", "inline_v6", "slot"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_golden(name: str, case: Case, inline_v6: bool, slot: Slot) -> None:
    check_golden(GOLDEN_DIR / f"{name}.ipf", render(case, inline_v6, slot))


def test_rendering_is_deterministic() -> None:
    for _, case, inline_v6, slot in VARIANTS:
        assert render(case, inline_v6, slot) == render(case, inline_v6, slot)


def test_every_golden_file_has_a_case() -> None:
    names = {v[0] for v in VARIANTS}
    orphans = [p.name for p in GOLDEN_DIR.glob("*.ipf") if p.name[: -len(".ipf")] not in names]
    assert orphans == []
