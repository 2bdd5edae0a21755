"""The iptables+ipset backend against the real kernel, both variants, each test in its own netns.

Apply + read back + verify for every golden case; tamper detection; atomicity (a refused
ipset load, a refused IPv4 restore, a refused IPv6 restore after IPv4 succeeded: the
kernel's ``iptables-save`` of every table and ``ipset save`` are byte-identical to
before); coexistence with Docker-like rules (the foreign part of the ruleset is
byte-identical after apply, update, delta, failed apply and remove, and a DROP policy on
a built-in chain stays); set deltas; jumps kept exactly once; idle removing everything.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.render import IpSet, IptablesArtifact, IptablesVariant, IptChain
from stockade.compiler.ir import AddressSet, HostPolicy, SetDelta
from stockade.errors import ApplyError
from stockade.model.addresses import Family, IPNetwork
from stockade.model.workloads import EnforcementMode
from tests.golden.nft_cases import CASES
from tests.golden.test_iptables_golden import ALL_CASES, backend_for
from tests.golden.test_iptables_golden import Case as GoldenCase

pytestmark = pytest.mark.kernel

CASE = {c.name: c for c in ALL_CASES}
VARIANTS = tuple(IptablesVariant)
IDS = [v.value for v in VARIANTS]


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request: pytest.FixtureRequest) -> IptablesVariant:
    v: IptablesVariant = request.param
    for tool in (v.tool(Family.V4, "restore"), v.tool(Family.V6, "restore"), "ipset", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    return v


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stk-ipt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run(ns: str, *argv: str, stdin: str | None = None) -> str:
    if "tables" in argv[0] and not argv[0].endswith("-save"):
        argv = (argv[0], "-w", *argv[1:])  # legacy: wait for the xtables lock other tests may hold
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def save_all(ns: str, variant: IptablesVariant) -> str:
    """Every table of both families plus every ipset, without timestamps."""
    parts = [run(ns, variant.tool(f, "save")) for f in Family] + [run(ns, "ipset", "save")]
    return "\n".join(line for part in parts for line in part.splitlines() if not line.startswith("#"))


OURS = re.compile(r"STOCKADE-")
DEFAULT_FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT"


def without_default_tables(text: str) -> str:
    """Drop filter tables in the kernel's default state (no rules, ACCEPT policies).

    The kernel instantiates a legacy table on first use, and iptables-nft creates its
    ``filter`` table and base chains on first use: neither filters anything.
    """
    return text.replace(DEFAULT_FILTER, "").strip("\n")


def foreign_part(ns: str, variant: IptablesVariant) -> str:
    """The ruleset without any line naming our chains or sets (chain counters zeroed)."""
    text = save_all(ns, variant)
    lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines() if not OURS.search(line)]
    return "\n".join(lines)


def n(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def with_members(hp: HostPolicy, name: str, family: Family, members: tuple[IPNetwork, ...]) -> HostPolicy:
    sets = tuple(
        AddressSet(s.name, s.family, tuple(sorted(members)), s.selector) if (s.name, s.family) == (name, family) else s
        for s in hp.sets
    )
    return dataclasses.replace(hp, sets=sets)


def inject(artifact: IptablesArtifact, family: Family, chain: str, spec: str) -> IptablesArtifact:
    def fix(c: IptChain) -> IptChain:
        return dataclasses.replace(c, rules=(*c.rules, spec)) if c.name == chain else c

    rulesets = tuple(
        dataclasses.replace(r, chains=tuple(fix(c) for c in r.chains)) if r.family is family else r
        for r in artifact.rulesets
    )
    return dataclasses.replace(artifact, rulesets=rulesets)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_apply_read_back_and_verify(case: GoldenCase, variant: IptablesVariant, netns: str) -> None:
    backend = backend_for(case, variant, netns)
    artifact = backend.render(case.policy)
    backend.apply(artifact)
    report = backend.verify(artifact)
    assert report.ok, report.problems
    listing = backend.read_back()
    if case.policy.mode is EnforcementMode.IDLE:
        assert listing == ""
        return
    for family in Family:
        for chain in artifact.ruleset(family).chains:
            assert f":{chain.name}\n" in listing
    for s in artifact.sets:
        assert f"create {s.name} hash:net family {s.ipset_family}\n" in listing
    assert "-t " not in listing.replace("-t hash", "")  # no temporary set left behind
    # the same artifact again is a clean replace; the listing is stable
    backend.apply(artifact)
    assert backend.verify(artifact).ok
    assert backend.read_back() == listing
    backend.remove()
    assert backend.read_back() == ""


def test_verify_detects_tampering(variant: IptablesVariant, netns: str) -> None:
    case = CASE["full_basic"]
    backend = backend_for(case, variant, netns)
    artifact = backend.render(case.policy)
    backend.apply(artifact)
    v4, v6 = f"iptables-{variant.value}", f"ip6tables-{variant.value}"
    live = f"STOCKADE-{case.policy.rules[0].peer}-v4"

    run(netns, "ipset", "add", live, "203.0.113.9")
    assert any("unexpected 203.0.113.9" in p for p in backend.verify(artifact).problems)
    baseline_changed = backend.read_back()
    backend.apply(artifact)
    assert backend.verify(artifact).ok and backend.read_back() != baseline_changed

    run(netns, v4, "-I", "STOCKADE-IN", "1", "-j", "RETURN")
    assert any("IPv4 chain STOCKADE-IN: rule 0" in p for p in backend.verify(artifact).problems)
    backend.apply(artifact)

    run(netns, v6, "-D", "INPUT", "-j", "STOCKADE-INPUT")
    assert "IPv6 INPUT has 0 jumps to STOCKADE-INPUT, expected 1" in backend.verify(artifact).problems
    backend.apply(artifact)

    run(netns, v4, "-A", "OUTPUT", "-j", "STOCKADE-OUTPUT")
    run(netns, v4, "-A", "INPUT", "-p", "udp", "-j", "STOCKADE-INPUT")
    problems = backend.verify(artifact).problems
    assert "IPv4 OUTPUT has 2 jumps to STOCKADE-OUTPUT, expected 1" in problems
    assert any("unexpected rule '-p udp -j STOCKADE-INPUT'" in p for p in problems), problems
    backend.apply(artifact)  # the duplicate and the odd jump are gone, one exact jump stays
    assert backend.verify(artifact).ok
    assert run(netns, v4 + "-save", "-t", "filter").count("-j STOCKADE-OUTPUT") == 1

    run(netns, v4, "-N", "STOCKADE-FORWARD")
    assert "IPv4 unexpected chain STOCKADE-FORWARD" in backend.verify(artifact).problems
    backend.apply(artifact)
    assert backend.verify(artifact).ok


@pytest.mark.parametrize("where", ["ipset", "ipv4", "ipv6"])
def test_failed_apply_leaves_previous_ruleset(variant: IptablesVariant, netns: str, where: str) -> None:
    """A refused step anywhere: every table of both families and every set as before, byte for byte."""
    good = CASE["visibility"]
    backend = backend_for(good, variant, netns)
    backend.apply(backend.render(good.policy))
    run(netns, "ipset", "create", "foreign", "hash:ip")
    for family in Family:  # our jump is no longer first, and a second one exists: both must come back
        cli = f"{'iptables' if family is Family.V4 else 'ip6tables'}-{variant.value}"
        run(netns, cli, "-I", "INPUT", "1", "-p", "tcp", "--dport", "7", "-j", "ACCEPT")
        run(netns, cli, "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "DROP")
        run(netns, cli, "-A", "INPUT", "-j", "STOCKADE-INPUT")
    before = save_all(netns, variant)

    newer = backend.render(CASE["full_basic"].policy)  # other rules, other sets, other members
    if where == "ipset":
        wrong = IpSet(newer.sets[0].name, Family.V4, (n("fd00::1/128"),))  # a v6 member in a v4 set
        bad = dataclasses.replace(newer, sets=(*newer.sets[1:], wrong))
    else:
        family = Family.V4 if where == "ipv4" else Family.V6
        bad = inject(newer, family, "STOCKADE-IN", "-j NO-SUCH-CHAIN")
    with pytest.raises(ApplyError):
        backend.apply(bad)
    assert save_all(netns, variant) == before
    assert backend.verify(backend.render(good.policy)).problems == (  # only the duplicate we added
        "IPv4 INPUT has 2 jumps to STOCKADE-INPUT, expected 1",
        "IPv6 INPUT has 2 jumps to STOCKADE-INPUT, expected 1",
    )


def test_failed_apply_on_empty_host_installs_nothing(variant: IptablesVariant, netns: str) -> None:
    backend = IptablesBackend(variant, netns=netns)
    before = save_all(netns, variant)
    bad = inject(backend.render(CASE["full_basic"].policy), Family.V6, "STOCKADE-OUT", "-m nosuchmatch -j DROP")
    with pytest.raises(ApplyError):
        backend.apply(bad)
    assert backend.read_back() == ""
    assert without_default_tables(save_all(netns, variant)) == without_default_tables(before)


DOCKER_LIKE = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-USER - [0:0]
:STOCKADE-LOOKALIKE - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -m set --match-set foreign-admins src -j ACCEPT
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-USER -j RETURN
-A STOCKADE-LOOKALIKE -j RETURN
COMMIT
"""
DOCKER_LIKE_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""


def test_coexistence_with_docker_like_rules(variant: IptablesVariant, netns: str) -> None:
    run(netns, "ipset", "create", "foreign-admins", "hash:net")
    run(netns, "ipset", "add", "foreign-admins", "192.0.2.0/24")
    run(netns, variant.tool(Family.V4, "restore"), stdin=DOCKER_LIKE)
    run(netns, variant.tool(Family.V6, "restore"), stdin=DOCKER_LIKE_V6)
    before = foreign_part(netns, variant)
    assert ":INPUT DROP" in before and "-A FORWARD -j DOCKER-USER" in before and "STOCKADE-LOOKALIKE" not in before
    lookalike = run(netns, variant.tool(Family.V4, "save"), "-t", "filter")
    assert "-A STOCKADE-LOOKALIKE -j RETURN" in lookalike

    case, updated = CASE["full_basic"], CASE["visibility"]
    backend = backend_for(case, variant, netns)
    backend.apply(backend.render(case.policy))
    assert foreign_part(netns, variant) == before
    v4_filter = run(netns, variant.tool(Family.V4, "save"), "-t", "filter").splitlines()
    input_rules = [line for line in v4_filter if line.startswith("-A INPUT ")]
    assert input_rules[0] == "-A INPUT -j STOCKADE-INPUT"  # our jump first, then theirs in order
    assert input_rules[1:] == [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A INPUT -m set --match-set foreign-admins src -j ACCEPT",
    ]

    backend.apply(backend.render(updated.policy))
    assert foreign_part(netns, variant) == before
    peer = updated.policy.rules[1].peer
    backend.apply_delta((SetDelta(peer, Family.V4, (n("10.5.5.5/32"), n("10.6.0.0/16")), ()),))
    backend.apply_delta((SetDelta(peer, Family.V4, (), (n("10.5.5.5/32"),)),))
    assert foreign_part(netns, variant) == before

    with pytest.raises(ApplyError):
        backend.apply(inject(backend.render(case.policy), Family.V6, "STOCKADE-IN", "-j NOWHERE"))
    assert foreign_part(netns, variant) == before

    forwarding = IptablesBackend(variant, netns=netns, forward=True)
    forwarding.apply(forwarding.render(case.policy))
    assert foreign_part(netns, variant) == before
    assert "-A FORWARD -j STOCKADE-FORWARD" in run(netns, variant.tool(Family.V4, "save"), "-t", "filter")
    backend.apply(backend.render(case.policy))  # forward off again: chain and jump go
    assert "STOCKADE-FORWARD" not in run(netns, variant.tool(Family.V4, "save"), "-t", "filter")

    backend.remove()
    assert backend.read_back() == ""
    assert foreign_part(netns, variant) == before
    assert run(netns, variant.tool(Family.V4, "save"), "-t", "filter").count("STOCKADE-LOOKALIKE") == 2
    backend.remove()  # idempotent
    assert foreign_part(netns, variant) == before


def test_set_delta_changes_members_not_rules(variant: IptablesVariant, netns: str) -> None:
    case = CASE["visibility"]
    backend = backend_for(case, variant, netns)
    hp = case.policy
    backend.apply(backend.render(hp))
    rules_before = [run(netns, variant.tool(f, "save"), "-t", "filter") for f in Family]
    peer = hp.rules[1].peer
    v4 = hp.set(peer, Family.V4).members
    v6 = hp.set(peer, Family.V6).members

    added4 = (n("10.0.9.9/32"), n("10.8.0.0/16"))
    added6 = (n("fd00:9::9/128"), n("fd00:8::/64"))
    backend.apply_delta((SetDelta(peer, Family.V4, added4, ()), SetDelta(peer, Family.V6, added6, ())))
    hp2 = with_members(with_members(hp, peer, Family.V4, v4 + added4), peer, Family.V6, v6 + added6)
    assert backend.verify(backend.render(hp2)).ok, backend.verify(backend.render(hp2)).problems

    merged = (n("10.0.9.8/31"),)
    backend.apply_delta((SetDelta(peer, Family.V4, merged, (n("10.0.9.9/32"),)),))
    hp3 = with_members(hp2, peer, Family.V4, (*v4, n("10.8.0.0/16"), *merged))
    assert backend.verify(backend.render(hp3)).ok, backend.verify(backend.render(hp3)).problems

    # idempotent (-exist): adding a present member, deleting an absent one
    backend.apply_delta((SetDelta(peer, Family.V4, merged, (n("10.1.2.3/32"),)),))
    assert backend.verify(backend.render(hp3)).ok

    everything = (n("0.0.0.0/0"),)  # hash:net cannot hold /0: two /1 halves
    backend.apply_delta((SetDelta(peer, Family.V4, everything, ()),))
    assert "0.0.0.0/1" in run(netns, "ipset", "list", f"STOCKADE-{peer}-v4")
    backend.apply_delta((SetDelta(peer, Family.V4, (), everything),))

    backend.apply_delta(
        (SetDelta(peer, Family.V4, (), (n("10.8.0.0/16"), *merged)), SetDelta(peer, Family.V6, (), added6))
    )
    assert backend.verify(backend.render(hp)).ok
    after = [run(netns, variant.tool(f, "save"), "-t", "filter") for f in Family]
    strip = re.compile(r"^#.*$", re.M)
    assert [strip.sub("", t) for t in after] == [strip.sub("", t) for t in rules_before]

    # a one-peer delta is one ipset exec: measure it (the benchmark has the <= 10 ms target)
    one = (n("198.51.100.7/32"),)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        backend.apply_delta((SetDelta(peer, Family.V4, one, ()),))
        times.append(time.perf_counter() - start)
        backend.apply_delta((SetDelta(peer, Family.V4, (), one),))
    assert statistics.median(times) < 0.1, times


def test_delta_to_missing_set_fails_without_changes(variant: IptablesVariant, netns: str) -> None:
    case = CASE["full_basic"]
    backend = backend_for(case, variant, netns)
    with pytest.raises(ApplyError):
        backend.apply_delta((SetDelta("pweb00000001", Family.V4, (n("10.0.0.1/32"),), ()),))
    assert backend.read_back() == ""
    backend.apply(backend.render(case.policy))
    before = backend.read_back()
    with pytest.raises(ApplyError):  # the first set exists, the second does not: nothing changes
        backend.apply_delta(
            (
                SetDelta(case.policy.rules[0].peer, Family.V4, (n("10.9.9.9/32"),), ()),
                SetDelta("pnosuch00009", Family.V4, (n("10.0.0.1/32"),), ()),
            )
        )
    assert backend.read_back() == before


def test_idle_removes_chains_jumps_and_sets(variant: IptablesVariant, netns: str) -> None:
    full, idle = CASE["full_basic"], CASE["idle"]
    backend = backend_for(full, variant, netns)
    empty = save_all(netns, variant)
    backend.apply(backend.render(full.policy))
    assert backend.read_back() != ""
    idle_artifact = backend.render(idle.policy)
    backend.apply(idle_artifact)
    assert backend.read_back() == ""
    assert backend.verify(idle_artifact).ok
    assert run(netns, "ipset", "list", "-n") == ""
    for family in Family:
        assert "STOCKADE" not in run(netns, variant.tool(family, "save"))
    assert without_default_tables(save_all(netns, variant)) == without_default_tables(empty)
    backend.apply(idle_artifact)  # idle on an idle host is a no-op, not an error
    assert backend.read_back() == ""


def test_two_prefixes_live_side_by_side(variant: IptablesVariant, netns: str) -> None:
    """Two backends with different chain prefixes in one netns never touch each other's chains or sets."""
    a = IptablesBackend(variant, "STKA", netns)
    b = IptablesBackend(variant, "STKB", netns)
    art_a, art_b = a.render(CASE["full_basic"].policy), b.render(CASE["visibility"].policy)
    a.apply(art_a)
    b.apply(art_b)
    a.apply(a.render(CASE["selective"].policy))
    assert b.verify(art_b).ok
    a.remove()
    assert b.verify(art_b).ok and a.read_back() == ""
    b.remove()
    assert run(netns, "ipset", "list", "-n") == ""


def test_nftables_cases_all_have_iptables_goldens() -> None:
    assert {c.name for c in CASES} <= set(CASE)
