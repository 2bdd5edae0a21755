"""Golden files for the eBPF renderer: tests/golden/ebpf/<case>.maps (map contents as tables).

The host policies are the nftables golden cases (every rule shape and mode) plus a few
that matter to eBPF only: peers in nested CIDRs of several sets (identities inherit the
enclosing prefixes' sets), port ranges that need many trie prefixes, and a port range
crossed by narrower rules of higher precedence.

On a mismatch the rendering is written to ``<case>.maps.actual`` beside the golden file;
``STOCKADE_UPDATE_GOLDEN=1`` rewrites the golden files. When root with clang and tc,
every case is also applied in a throwaway network namespace: ``verify`` must report
nothing and the kernel's maps, read back, must print the same tables.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ebpf.identity import PeerTable
from stockade.backends.ebpf.render import render_ebpf
from stockade.bpf.build import BuildError, find_clang
from stockade.compiler.ir import AddressSet, HostPolicy, HostRule
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from tests.golden.nft_cases import (
    ALLOW,
    ANY,
    CORP,
    DENY,
    FULL,
    IN,
    OUT,
    OVERRIDE,
    SELECTIVE,
    WEB,
    Case,
    host,
    icmp6,
    peer,
    tcp,
    udp,
)
from tests.golden.nft_cases import CASES as NFT_CASES

GOLDEN_DIR = Path(__file__).parent / "ebpf"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"

OPS = peer("pops00000007", "10.0.0.0/24", "10.0.0.11", "fd00::/64")
LAB = peer("plab00000008", "10.0.0.8/29", "10.0.0.12", "fd00::10/124")

EBPF_CASES: tuple[Case, ...] = (
    Case(
        "ebpf_nested_cidrs",
        host(
            FULL,
            [
                HostRule(ALLOW, IN, "ruleset/web/0", WEB[0].name, (tcp(80),)),
                HostRule(ALLOW, IN, "ruleset/ops/0", OPS[0].name, (tcp(22), icmp6(128))),
                HostRule(DENY, IN, "deny/lab", LAB[0].name, (tcp(22), tcp(80))),
                HostRule(ALLOW, OUT, "ruleset/corp/0", CORP[0].name, (udp(53),)),
            ],
            [WEB, OPS, LAB, CORP],
            Failsafe(management=()),
        ),
    ),
    Case(
        "ebpf_range_prefixes",
        host(
            SELECTIVE,
            [
                HostRule(OVERRIDE, IN, "deny/odd", WEB[0].name, (tcp(1001, 1001), udp(1, 1023))),
                HostRule(ALLOW, IN, "ruleset/apps/0", WEB[0].name, (tcp(1000, 2999), udp(3, 65533))),
                HostRule(DENY, IN, "deny/apps", WEB[0].name, (tcp(),)),
                HostRule(DENY, OUT, "deny/any-out", WEB[0].name, (ANY,)),
            ],
            [WEB],
        ),
    ),
)
CASES = tuple(sorted(NFT_CASES + EBPF_CASES, key=lambda c: c.name))


def render(case: Case) -> str:
    return EbpfBackend(netns=None).render(case.policy).to_text()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Case) -> None:
    text = render(case)
    golden = GOLDEN_DIR / f"{case.name}.maps"
    actual = GOLDEN_DIR / f"{case.name}.maps.actual"
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
    assert [p.name for p in GOLDEN_DIR.glob("*.maps") if p.stem not in names] == []


def test_nested_cidr_identities_inherit_enclosing_sets() -> None:
    art = render_ebpf(next(c for c in CASES if c.name == "ebpf_nested_cidrs").policy)
    sets_of = {p.network_text: art.identity_sets[p.identity] for p in art.peers}
    assert sets_of["10.0.0.11/32"] == {WEB[0].name, OPS[0].name, LAB[0].name, CORP[0].name}
    assert sets_of["10.0.0.12/31"] == {WEB[0].name, OPS[0].name, LAB[0].name, CORP[0].name}
    assert sets_of["10.0.0.8/29"] == {OPS[0].name, LAB[0].name, CORP[0].name}
    assert sets_of["10.0.0.0/24"] == {OPS[0].name, CORP[0].name}
    assert sets_of["10.0.0.0/8"] == {CORP[0].name}


# ---- the kernel holds exactly the rendered maps ----------------------------------------


def _kernel_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    try:
        find_clang()
    except BuildError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    reason = _kernel_reason()
    if reason:
        pytest.skip(reason)
    name = f"stk-ebpfgold-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
        yield name
    finally:
        EbpfBackend(netns=name).remove()
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_holds_the_rendered_maps(case: Case, netns: str) -> None:
    backend = EbpfBackend(netns=netns)
    try:
        artifact = backend.render(case.policy)
        backend.apply(artifact)
        report = backend.verify(artifact)
        assert report.ok, report.problems
        if artifact.present:
            back = backend.read_back()
            tables = back[back.index("\nconfig\n") + 1 :]
            assert tables == replace(artifact.tables, sets=()).text()
            assert [a.interface for a in backend.attachments()] == ["eth0", "eth0", "eth1", "eth1"]
        else:
            assert backend.read_back() == ""
    finally:
        backend.close()


# ---- set deltas: the planned trie updates equal a fresh render (pure, hypothesis) -------------

_PREFIXES = st.builds(
    lambda plen, host: ipaddress.IPv4Network((0x0A000000 + (host & ~((1 << (32 - plen)) - 1)), plen)),
    st.sampled_from((8, 16, 24, 28, 30, 32)),
    st.integers(0, (1 << 24) - 1).map(lambda x: x & 0x0000FF0F),  # few distinct, often nested
)
_SETS = ("pa", "pb", "pc")


def _policy(members: dict[str, set[ipaddress.IPv4Network]]) -> HostPolicy:
    sets = []
    for name in _SETS:
        sets.append(AddressSet(name, Family.V4, tuple(sorted(members[name]))))
        sets.append(AddressSet(name, Family.V6, ()))
    rules = tuple(sorted(HostRule(ALLOW, IN, f"ruleset/r/{i}", n, (tcp(80 + i),)) for i, n in enumerate(_SETS)))
    return replace(host(FULL, [], []), rules=rules, sets=tuple(sorted(sets)))


@settings(max_examples=150, deadline=None)
@given(
    start=st.fixed_dictionaries({n: st.sets(_PREFIXES, max_size=6) for n in _SETS}),
    steps=st.lists(st.tuples(st.sampled_from(_SETS), st.booleans(), _PREFIXES), min_size=1, max_size=12),
)
def test_set_delta_plans_match_a_fresh_render(
    start: dict[str, set[ipaddress.IPv4Network]], steps: list[tuple[str, bool, ipaddress.IPv4Network]]
) -> None:
    first = render_ebpf(_policy(start))
    table = PeerTable(first.context, first.memberships, first.effective, first.identity_sets)
    names = dict(enumerate(first.identity_sets))
    trie = {(p.start, p.prefixlen): p.identity for p in first.peers if p.family is Family.V4}
    members = {n: set(m) for n, m in start.items()}
    for name, add, net in steps:
        if not add and net not in members[name]:
            continue
        plan = table.plan(Family.V4, name, (net,) if add else (), () if add else (net,))
        assert {i for i, _ in plan.new_identities}.isdisjoint(names)
        assert {r.identity for r in plan.new_intervals} <= {i for i, _ in plan.new_identities}
        names.update(plan.new_identities)
        trie.update(plan.updates)
        for p in plan.deletes:
            del trie[p]
        table.commit()
        (members[name].add if add else members[name].discard)(net)
    fresh = render_ebpf(_policy(members))
    assert {p: names[i] for p, i in trie.items()} == fresh.effective[Family.V4]
