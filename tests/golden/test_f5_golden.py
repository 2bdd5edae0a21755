"""Golden files for the F5 AFM renderer: tests/golden/f5/<case>.json.

The host policies are the nftables cases (every rule shape and mode) with their outbound
rules left out (a virtual server only receives connections; outbound rules fail closed, see
tests/unit/test_f5_backend.py), rendered for ``/Common/vs_web``. On a mismatch the rendering
is written to ``<file>.actual``; ``STOCKADE_UPDATE_GOLDEN=1`` rewrites the golden files.
Every golden document is also accepted by the fake iControl REST service's shape checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.f5.render import render_f5, without_controller_failsafe
from stockade.compiler.ir import Direction
from tests.fakes.f5_icontrol import Config, execute
from tests.golden.nft_cases import CASES, SCTP_CASES, Case

GOLDEN_DIR = Path(__file__).parent / "f5"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"
NFT_ONLY = {"forward", "custom_table_log_group"}
VIRTUAL = "/Common/vs_web"
F5_CASES = [c for c in CASES + SCTP_CASES if c.name not in NFT_ONLY]


def render(case: Case) -> str:
    hp = case.policy
    hp = replace(hp, rules=tuple(r for r in hp.rules if r.direction is Direction.INBOUND))
    return render_f5(without_controller_failsafe(hp), VIRTUAL).to_text()


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


@pytest.mark.parametrize("case", F5_CASES, ids=[c.name for c in F5_CASES])
def test_golden(case: Case) -> None:
    check_golden(GOLDEN_DIR / f"{case.name}.json", render(case))


def test_rendering_is_deterministic() -> None:
    for case in F5_CASES:
        assert render(case) == render(case)


def test_every_golden_file_has_a_case() -> None:
    names = {c.name for c in F5_CASES}
    assert [p.name for p in GOLDEN_DIR.glob("*.json") if p.stem not in names] == []


@pytest.mark.parametrize("case", F5_CASES, ids=[c.name for c in F5_CASES])
def test_golden_shapes_accepted_by_fake_device(case: Case) -> None:
    doc = json.loads(render(case))
    cfg = Config()
    cfg.virtuals[VIRTUAL] = {"name": "vs_web", "fullPath": VIRTUAL}
    for body in doc["addressLists"]:
        execute(cfg, "POST", "/mgmt/tm/security/firewall/address-list", body)
    for body in doc["portLists"]:
        execute(cfg, "POST", "/mgmt/tm/security/firewall/port-list", body)
    if doc["policy"] is not None:
        execute(cfg, "POST", "/mgmt/tm/security/firewall/policy", doc["policy"])
    execute(cfg, "PATCH", "/mgmt/tm/ltm/virtual/~Common~vs_web", doc["virtualServer"])
