"""Golden files for the iptables+ipset renderer: tests/golden/iptables/<variant>/<case>.rules.

Every nftables golden case (``nft_cases.CASES``: every rule shape and mode) plus the
shapes only iptables has (multiport chunks of 15 slots, ``/0`` split for ``hash:net``,
peer names hashed to fit ipset's 31 characters, NFLOG prefixes cut to 63 characters, log
group 0), rendered for both variants. On a mismatch the rendering is written to
``<case>.rules.actual`` beside the golden file; ``STOCKADE_UPDATE_GOLDEN=1`` rewrites them.
The kernel test ``tests/kernel/test_iptables_backend.py`` loads every case for real.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.render import (
    IPSET_NAME_MAX,
    NFLOG_PREFIX_MAX,
    IptablesVariant,
    ipset_name,
    log_prefix,
    save_string,
)
from stockade.errors import RenderError, UnsupportedFeatureError
from stockade.model.addresses import Family
from tests.golden.nft_cases import (
    ALLOW,
    ANY,
    CASES,
    DENY,
    FULL,
    IN,
    OUT,
    OVERRIDE,
    SCTP_CASES,
    SELECTIVE,
    VISIBILITY,
    Case,
    HostRule,
    host,
    icmp,
    peer,
    tcp,
    udp,
)

GOLDEN_DIR = Path(__file__).parent / "iptables"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"

LONG_PEER = peer("selector_with_a_rather_long_name_0001", "10.1.0.1", "fd01::1")
EVERYTHING = peer("pall00000007", "0.0.0.0/0", "::/0")
WEB = peer("pweb00000001", "10.0.0.11", "10.0.0.12/31", "fd00::11")
LONG_ID = "ruleset/" + "a-very-long-ruleset-name-that-goes-on-and-on-and-on" + "/12"

IPTABLES_CASES: tuple[Case, ...] = (
    Case(
        "multiport_chunks",
        host(
            FULL,
            [
                HostRule(
                    ALLOW,
                    IN,
                    "ruleset/many/0",
                    WEB[0].name,
                    (*(tcp(p) for p in range(1000, 1024, 2)), tcp(2000, 2010), tcp(3000, 3010), udp(53)),
                ),
            ],
            [WEB],
        ),
    ),
    Case(
        "zero_prefix_and_long_peer",
        host(
            SELECTIVE,
            [
                HostRule(OVERRIDE, OUT, "deny/no-internet", EVERYTHING[0].name, (tcp(25),)),
                HostRule(ALLOW, IN, "ruleset/long/0", LONG_PEER[0].name, (ANY,)),
            ],
            [EVERYTHING, LONG_PEER],
        ),
    ),
    Case(
        "long_rule_id_log_group_zero",
        host(
            VISIBILITY,
            [
                HostRule(DENY, IN, LONG_ID, WEB[0].name, (tcp(8443),)),
                HostRule(ALLOW, IN, "ruleset/x/0", WEB[0].name, (icmp(8),)),
            ],
            [WEB],
        ),
        log_group=0,
    ),
)
ALL_CASES = CASES + IPTABLES_CASES + SCTP_CASES
VARIANTS = tuple(IptablesVariant)


def prefix_of(case: Case) -> str:
    """The nftables cases name a table; the iptables backend's counterpart is the chain prefix."""
    return "STOCKADE" if case.table == "stockade" else case.table


def backend_for(case: Case, variant: IptablesVariant, netns: str | None = None) -> IptablesBackend:
    return IptablesBackend(variant, prefix_of(case), netns, case.log_group, forward=case.forward)


def render(case: Case, variant: IptablesVariant) -> str:
    return backend_for(case, variant).render(case.policy).to_text()


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.value for v in VARIANTS])
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_golden(case: Case, variant: IptablesVariant) -> None:
    text = render(case, variant)
    folder = GOLDEN_DIR / variant.value
    golden = folder / f"{case.name}.rules"
    actual = folder / f"{case.name}.rules.actual"
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    if not golden.exists():
        folder.mkdir(parents=True, exist_ok=True)
        actual.write_text(text)
        pytest.fail(f"no golden file {golden}; wrote {actual} (set STOCKADE_UPDATE_GOLDEN=1 to accept)")
    if golden.read_text() != text:
        actual.write_text(text)
        pytest.fail(f"rendering differs from {golden}; see {actual} (STOCKADE_UPDATE_GOLDEN=1 to accept)")
    actual.unlink(missing_ok=True)


def test_rendering_is_deterministic() -> None:
    for case in ALL_CASES:
        for variant in VARIANTS:
            assert render(case, variant) == render(case, variant)


def test_every_golden_file_has_a_case() -> None:
    names = {c.name for c in ALL_CASES}
    orphans = [str(p) for p in GOLDEN_DIR.glob("*/*.rules") if p.stem not in names]
    assert orphans == []


def test_variants_differ_only_in_the_binaries_named() -> None:
    for case in ALL_CASES:
        legacy, nft = (render(case, v) for v in VARIANTS)
        assert legacy.replace("-legacy", "-nft").replace("iptables-legacy", "iptables-nft") == nft


def test_idle_renders_nothing_to_install() -> None:
    idle = next(c for c in CASES if c.name == "idle")
    artifact = backend_for(idle, IptablesVariant.NFT).render(idle.policy)
    assert not artifact.present and artifact.sets == () and artifact.rulesets == ()


def test_ipset_names_fit_and_stay_distinct() -> None:
    long_a = "selector_with_a_rather_long_name_0001"
    long_b = "selector_with_a_rather_long_name_0002"
    names = {ipset_name("STOCKADE_LAB", p, f) for p in (long_a, long_b, "p0123456789ab") for f in Family}
    assert len(names) == 6
    assert all(len(n) + 2 <= IPSET_NAME_MAX for n in names)
    assert ipset_name("STOCKADE", "p0123456789ab", Family.V6) == "STOCKADE-p0123456789ab-v6"
    for bad in ("local", "has space", "semi;colon", "quote\"", ""):
        with pytest.raises(RenderError):
            ipset_name("STOCKADE", bad, Family.V4)


@pytest.mark.parametrize("prefix", ["", "1ABC", "TOO_LONG_PREFIX", "A-B", "A B", 'A"'])
def test_bad_chain_prefix_is_refused(prefix: str) -> None:
    from stockade.errors import ApplyError

    with pytest.raises(ApplyError):
        IptablesBackend(chain_prefix=prefix)


def test_log_prefix_fits_nflog_and_keeps_rules_apart() -> None:
    a = log_prefix(LONG_ID)
    b = log_prefix(LONG_ID.replace("/12", "/13"))
    assert len(a) <= NFLOG_PREFIX_MAX and len(b) <= NFLOG_PREFIX_MAX
    assert a != b and a.startswith("stk:pb:ruleset/a-very-long")
    assert log_prefix("deny/x") == "stk:pb:deny/x"


def test_save_string_quotes_like_iptables_save() -> None:
    assert save_string("default") == "default"
    assert save_string("deny/x") == '"deny/x"'
    assert save_string('a"b') == '"a\\"b"'


def test_hostile_rule_id_is_refused() -> None:
    case = next(c for c in CASES if c.name == "full_basic")
    rule = replace(case.policy.rules[0], rule_id='x" -j ACCEPT')
    with pytest.raises(RenderError):
        backend_for(case, IptablesVariant.NFT).render(replace(case.policy, rules=(rule,)))


def test_icmp_type_255_fails_closed_naming_the_rule() -> None:
    case = next(c for c in CASES if c.name == "icmp_types")
    rule = replace(case.policy.rules[0], services=(icmp(255),))
    with pytest.raises(RenderError, match=r"ruleset/ping/0.*255"):
        backend_for(case, IptablesVariant.NFT).render(replace(case.policy, rules=(rule,)))


def test_capability_check_runs_before_rendering() -> None:
    case = next(c for c in CASES if c.name == "full_basic")
    backend = backend_for(case, IptablesVariant.NFT)
    backend.capabilities = frozenset(c for c in backend.capabilities if c.value != "outbound rules")
    with pytest.raises(UnsupportedFeatureError, match=r"outbound rules.*ruleset/shop/1"):
        backend.render(case.policy)
