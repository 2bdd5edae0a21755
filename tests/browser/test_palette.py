"""The verdict palette stays distinguishable for colour-vision-deficient viewers.

The colours are read from the console's own stylesheet (``css/console.css``), for every
combination of theme (light, dark, high contrast) and colour-vision setting (standard, enhanced).
Each pair of verdict colours (allowed, potentially blocked, blocked) is simulated for
protanopia, deuteranopia and tritanopia (Machado et al. 2009, severity 1) and must keep a
CIEDE2000 difference of at least :data:`MIN_DELTA_E` (and :data:`MIN_DELTA_E_ENHANCED` with
the enhanced setting); every palette also keeps :data:`MIN_DELTA_E` under achromatopsia and in
greyscale. For scale: 1 is a just-noticeable difference, ~10 is a difference seen at a glance
between two small patches. No browser needed (``test_map_colour.py`` measures the rendered
pixels under Chromium's own emulation).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.browser.cvd import (
    Deficiency,
    contrast_ratio,
    delta_e76,
    delta_e2000,
    parse_hex,
    perceived_difference,
    perceived_difference_in_greyscale,
    simulate,
    to_lab,
)

CSS = Path(__file__).resolve().parents[2] / "src" / "stockade" / "web" / "css" / "console.css"
VERDICTS = ("allowed", "potentially-blocked", "blocked")
MIN_DELTA_E = 12.0
MIN_DELTA_E_ENHANCED = 20.0
DICHROMACIES = (Deficiency.PROTANOPIA, Deficiency.DEUTERANOPIA, Deficiency.TRITANOPIA)
SELECTORS = {
    ("light", "standard"): [':root, [data-theme="light"]'],
    ("light", "enhanced"): [':root, [data-theme="light"]', '[data-cvd="enhanced"]'],
    ("dark", "standard"): [':root, [data-theme="light"]', '[data-theme="dark"]'],
    ("dark", "enhanced"): [':root, [data-theme="light"]', '[data-cvd="enhanced"]', '[data-theme="dark"]',
                           '[data-theme="dark"][data-cvd="enhanced"]'],
    ("high-contrast", "standard"): [':root, [data-theme="light"]', '[data-theme="high-contrast"]'],
    ("high-contrast", "enhanced"): [':root, [data-theme="light"]', '[data-theme="high-contrast"]',
                                    '[data-cvd="enhanced"]', '[data-theme="high-contrast"][data-cvd="enhanced"]'],
}


def css_blocks(text: str) -> dict[str, dict[str, str]]:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out: dict[str, dict[str, str]] = {}
    for sel, body in re.findall(r"([^{}]+)\{([^{}]*)\}", text):
        props = dict(re.findall(r"(--[\w-]+)\s*:\s*([^;]+);", body))
        if props:
            out.setdefault(" ".join(sel.split()), {}).update({k: v.strip() for k, v in props.items()})
    return out


def palette(theme: str, cvd: str) -> dict[str, str]:
    """The custom properties in force for (theme, cvd), cascading the blocks in source order."""
    blocks = css_blocks(CSS.read_text())
    props: dict[str, str] = {}
    for sel in SELECTORS[(theme, cvd)]:
        props.update(blocks[sel])
    return props


# ---- the colour maths, against published reference values ------------------------------------

# Sharma, Wu & Dalal (2005), Table 1: (Lab1, Lab2, ΔE00)
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0009), 7.1792),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((50.0, 2.5, 0.0), (50.0, 3.2592, 0.335), 1.0000),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.694), (23.0331, 14.973, -42.5619), 2.0373),
    ((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514), 0.9082),
]


@pytest.mark.parametrize(("lab1", "lab2", "expected"), SHARMA)
def test_ciede2000_matches_sharma_reference_data(lab1: tuple[float, float, float],
                                                  lab2: tuple[float, float, float], expected: float) -> None:
    assert delta_e2000(lab1, lab2) == pytest.approx(expected, abs=1e-4)
    assert delta_e2000(lab2, lab1) == pytest.approx(expected, abs=1e-4)


def test_lab_of_reference_colours() -> None:
    assert to_lab(parse_hex("#ffffff")) == pytest.approx((100.0, 0.0, 0.0), abs=0.01)
    assert to_lab(parse_hex("#000000")) == pytest.approx((0.0, 0.0, 0.0), abs=0.01)
    # sRGB red in CIELAB (D65): L 53.24, a 80.09, b 67.20
    assert to_lab(parse_hex("#ff0000")) == pytest.approx((53.24, 80.09, 67.20), abs=0.05)


def test_simulation_collapses_the_confusion_axis() -> None:
    """Red and green, far apart for typical vision, come close for protan and deutan viewers."""
    red, green = parse_hex("#d62728"), parse_hex("#2ca02c")
    typical = perceived_difference(red, green, None)
    for d in (Deficiency.PROTANOPIA, Deficiency.DEUTERANOPIA):
        assert perceived_difference(red, green, d) < typical / 2.5
    # greys are left alone by every simulation
    for d in Deficiency:
        assert simulate(parse_hex("#808080"), d) == pytest.approx(parse_hex("#808080"), abs=0.01)
    # blue and yellow stay apart for protan/deutan viewers, not for tritan ones
    blue, yellow = parse_hex("#0072B2"), parse_hex("#F0E442")
    assert perceived_difference(blue, yellow, Deficiency.DEUTERANOPIA) > 40
    assert delta_e76(to_lab(simulate(blue, Deficiency.TRITANOPIA)), to_lab(simulate(yellow, Deficiency.TRITANOPIA))) \
        < delta_e76(to_lab(blue), to_lab(yellow))


# ---- the console's palettes --------------------------------------------------------------------


@pytest.mark.parametrize(("theme", "cvd"), sorted(SELECTORS))
def test_every_pair_of_verdict_colours_stays_distinguishable(theme: str, cvd: str) -> None:
    props = palette(theme, cvd)
    colours = {v: parse_hex(props[f"--verdict-{v}"]) for v in VERDICTS}
    threshold = MIN_DELTA_E_ENHANCED if cvd == "enhanced" and theme != "dark" else MIN_DELTA_E
    worst = []
    for (va, a), (vb, b) in itertools.combinations(colours.items(), 2):
        for d in (None, *DICHROMACIES):
            de = perceived_difference(a, b, d)
            worst.append((de, va, vb, d.value if d else "typical"))
            seen_by = d.value if d else "typical vision"
            assert de >= threshold, f"{theme}/{cvd}: {va} vs {vb} under {seen_by}: ΔE00 {de:.1f}"
    assert len(worst) == 3 * 4


@pytest.mark.parametrize(("theme", "cvd"), sorted(SELECTORS))
def test_verdicts_stay_apart_without_any_colour(theme: str, cvd: str) -> None:
    """Achromatopsia (Chromium's emulation) and greyscale: the verdicts differ in lightness."""
    props = palette(theme, cvd)
    colours = {v: parse_hex(props[f"--verdict-{v}"]) for v in VERDICTS}
    for (va, a), (vb, b) in itertools.combinations(colours.items(), 2):
        de = perceived_difference(a, b, Deficiency.ACHROMATOPSIA)
        assert de >= MIN_DELTA_E, f"{theme}/{cvd}: {va} vs {vb} under achromatopsia: ΔE00 {de:.1f}"
        de = perceived_difference_in_greyscale(a, b)
        assert de >= MIN_DELTA_E, f"{theme}/{cvd}: {va} vs {vb} in greyscale: ΔE00 {de:.1f}"


def test_default_palette_is_as_safe_as_the_enhanced_one() -> None:
    """The default (light, standard) keeps every pair >= the enhanced threshold under every deficiency."""
    colours = [parse_hex(palette("light", "standard")[f"--verdict-{v}"]) for v in VERDICTS]
    for a, b in itertools.combinations(colours, 2):
        for d in (None, *Deficiency):
            assert perceived_difference(a, b, d) >= MIN_DELTA_E_ENHANCED - 1.0, d
        assert perceived_difference_in_greyscale(a, b) >= MIN_DELTA_E_ENHANCED


@pytest.mark.parametrize("theme", ["high-contrast"])
def test_enhanced_setting_separates_verdicts_at_least_as_well(theme: str) -> None:
    def weakest(cvd: str, d: Deficiency) -> float:
        props = palette(theme, cvd)
        cols = [parse_hex(props[f"--verdict-{v}"]) for v in VERDICTS]
        return min(perceived_difference(a, b, d) for a, b in itertools.combinations(cols, 2))

    # the weakest pair over all three deficiencies improves, and no single deficiency loses more
    # than a just-noticeable difference
    assert min(weakest("enhanced", d) for d in DICHROMACIES) > min(weakest("standard", d) for d in DICHROMACIES)
    for d in DICHROMACIES:
        assert weakest("enhanced", d) >= weakest("standard", d) - 1.0, d


@pytest.mark.parametrize(("theme", "cvd"), sorted(SELECTORS))
def test_verdict_marks_and_lines_stand_out_from_the_background(theme: str, cvd: str) -> None:
    """The icon's inner mark on its verdict colour: WCAG non-text contrast (3:1) at least."""
    props = palette(theme, cvd)
    for v in VERDICTS:
        fill = parse_hex(props[f"--verdict-{v}"])
        mark = parse_hex(props[f"--on-{v}"])
        assert contrast_ratio(fill, mark) >= 3.0, f"{theme}/{cvd}: mark on {v}"


@pytest.mark.parametrize(("theme", "cvd"), sorted(SELECTORS))
def test_text_colours_meet_wcag_aa(theme: str, cvd: str) -> None:
    props = palette(theme, cvd)
    bg = parse_hex(props["--bg"])
    for name in ("--fg", "--muted", "--accent", "--danger", "--ok"):
        assert contrast_ratio(parse_hex(props[name]), bg) >= 4.5, f"{theme}: {name} on --bg"
    assert contrast_ratio(parse_hex(props["--fg"]), parse_hex(props["--bg-alt"])) >= 7.0
