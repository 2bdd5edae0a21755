"""The nftables backend against the real kernel, each test in its own throwaway netns.

Apply + read back + verify for every golden case, tamper detection, atomicity of a
failing apply, coexistence with foreign tables (Docker-like), set deltas through both
paths, and idle removing the table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.backends.nftables.backend import DeltaPath, NftablesBackend
from stockade.backends.nftables.render import NftablesArtifact
from stockade.compiler.ir import AddressSet, HostPolicy, SetDelta
from stockade.errors import ApplyError
from stockade.model.addresses import Family, IPNetwork
from stockade.model.workloads import EnforcementMode

# tests/kernel has no __init__.py (pytest puts only this directory on sys.path): make the
# repository root importable for the shared golden cases.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden.nft_cases import CASES as BASE_CASES
from tests.golden.nft_cases import SCTP_CASES, Case

pytestmark = pytest.mark.kernel
CASES = BASE_CASES + SCTP_CASES

CASE = {c.name: c for c in CASES}


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stk-nft-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], input=stdin, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def backend_for(case: Case, ns: str, **kw: object) -> NftablesBackend:
    return NftablesBackend(case.table, ns, case.log_group, forward=case.forward, **kw)  # type: ignore[arg-type]


def n(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def with_members(hp: HostPolicy, name: str, family: Family, members: tuple[IPNetwork, ...]) -> HostPolicy:
    sets = tuple(
        AddressSet(s.name, s.family, tuple(sorted(members)), s.selector) if (s.name, s.family) == (name, family) else s
        for s in hp.sets
    )
    return dataclasses.replace(hp, sets=sets)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_apply_read_back_and_verify(case: Case, netns: str) -> None:
    backend = backend_for(case, netns)
    artifact = backend.render(case.policy)
    backend.apply(artifact)
    assert backend.verify(artifact).ok, backend.verify(artifact).problems
    listing = backend.read_back()
    if case.policy.mode is EnforcementMode.IDLE:
        assert listing == ""
        return
    assert listing.startswith(f"table inet {case.table} {{")
    for chain in artifact.chains:
        assert f"chain {chain.name} {{" in listing
    # applying the same artifact again is a clean replace
    backend.apply(artifact)
    assert backend.verify(artifact).ok


def test_verify_detects_tampering(netns: str) -> None:
    case = CASE["full_basic"]
    backend = backend_for(case, netns)
    artifact = backend.render(case.policy)
    backend.apply(artifact)
    host_set = f"{case.policy.rules[0].peer}_v4_host"

    nft(netns, "add", "element", "inet", "stockade", host_set, "{ 203.0.113.9 }")
    problems = backend.verify(artifact).problems
    assert any("unexpected 203.0.113.9" in p for p in problems), problems

    backend.apply(artifact)
    nft(netns, "insert", "rule", "inet", "stockade", "inbound", "accept")
    problems = backend.verify(artifact).problems
    assert any("chain inbound" in p for p in problems), problems

    backend.apply(artifact)
    nft(netns, "add", "chain", "inet", "stockade", "input", "{ policy accept ; }")
    problems = backend.verify(artifact).problems
    assert any("chain input: header" in p for p in problems), problems

    backend.apply(artifact)
    nft(netns, "delete", "table", "inet", "stockade")
    assert backend.verify(artifact).problems == ("table inet stockade is missing",)

    backend.apply(artifact)
    assert backend.verify(artifact).ok


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verify_and_read_back_from_one_listing_equal_the_two_calls(case: Case, netns: str) -> None:
    """The enforcer's check after a full apply (``verify_read_back``: one text listing fewer) says
    exactly what ``verify`` and ``read_back`` say, for every golden case, intact and tampered."""
    backend = backend_for(case, netns)
    artifact = backend.render(case.policy)
    backend.apply(artifact)
    assert backend.verify_read_back(artifact) == (backend.verify(artifact), backend.read_back())
    if case.policy.mode is EnforcementMode.IDLE:
        return
    nft(netns, "insert", "rule", "inet", case.table, artifact.chains[0].name, "accept")
    report, listing = backend.verify_read_back(artifact)
    assert not report.ok and (report, listing) == (backend.verify(artifact), backend.read_back())
    nft(netns, "delete", "table", "inet", case.table)
    assert backend.verify_read_back(artifact) == (backend.verify(artifact), "")


def _inject(artifact: NftablesArtifact, chain: str, line: str) -> NftablesArtifact:
    chains = tuple(dataclasses.replace(c, rules=(*c.rules, line)) if c.name == chain else c for c in artifact.chains)
    return dataclasses.replace(artifact, chains=chains)


@pytest.mark.parametrize(
    "bad_line",
    [
        "tcp dport 80 acceptt",  # refused by the parser
        "ip saddr @no_such_set accept",  # refused by evaluation
        "ip saddr 10.0.0.0/33 accept",  # refused: bad prefix
    ],
)
def test_failed_apply_leaves_previous_ruleset(netns: str, bad_line: str) -> None:
    good = CASE["visibility"]
    backend = backend_for(good, netns)
    backend.apply(backend.render(good.policy))
    nft(netns, "add", "table", "ip", "foreign")
    before = nft(netns, "list", "ruleset")

    newer = backend.render(CASE["full_basic"].policy)
    with pytest.raises(ApplyError):
        backend.apply(_inject(newer, "inbound", bad_line))
    assert nft(netns, "list", "ruleset") == before


def test_failed_apply_on_empty_host_installs_nothing(netns: str) -> None:
    backend = NftablesBackend(netns=netns)
    bad = _inject(backend.render(CASE["full_basic"].policy), "outbound", "bogus statement")
    with pytest.raises(ApplyError):
        backend.apply(bad)
    assert nft(netns, "list", "ruleset") == ""
    assert backend.read_back() == ""


FOREIGN = """\
table ip nat {
	chain DOCKER {
		iifname "docker0" counter return
	}
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local counter jump DOCKER
	}
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 172.17.0.0/16 oifname != "docker0" counter masquerade
	}
}
table ip filter {
	chain DOCKER-USER {
		counter return
	}
	chain FORWARD {
		type filter hook forward priority filter; policy drop;
		counter jump DOCKER-USER
		oifname "docker0" ct state established,related counter accept
		iifname "docker0" oifname != "docker0" counter accept
	}
}
table ip stockade {
	set lookalike {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @lookalike counter accept
	}
}
table inet other {
	chain input {
		type filter hook input priority 10; policy accept;
		tcp dport 9999 counter accept
	}
}
"""
FOREIGN_TABLES = (("ip", "nat"), ("ip", "filter"), ("ip", "stockade"), ("inet", "other"))


def test_coexistence_with_foreign_tables(netns: str) -> None:
    nft(netns, "-f", "-", stdin=FOREIGN)

    def snapshot() -> dict[tuple[str, str], str]:
        return {t: nft(netns, "list", "table", *t) for t in FOREIGN_TABLES}

    before = snapshot()
    assert all(before.values())
    case = CASE["full_basic"]
    backend = backend_for(case, netns)
    backend.apply(backend.render(case.policy))
    assert snapshot() == before

    updated = CASE["visibility"]
    backend.apply(backend.render(updated.policy))
    assert snapshot() == before

    peer = updated.policy.rules[1].peer
    backend.apply_delta((SetDelta(peer, Family.V4, (n("10.5.5.5/32"), n("10.6.0.0/16")), ()),))
    assert snapshot() == before
    backend.apply_delta((SetDelta(peer, Family.V4, (), (n("10.5.5.5/32"),)),))
    assert snapshot() == before

    with pytest.raises(ApplyError):
        backend.apply(_inject(backend.render(case.policy), "inbound", "nonsense"))
    assert snapshot() == before

    backend.remove()
    assert backend.read_back() == ""
    assert snapshot() == before
    backend.remove()  # idempotent
    assert snapshot() == before


@pytest.mark.parametrize("path", list(DeltaPath), ids=[p.value for p in DeltaPath])
def test_set_delta_changes_members_not_rules(netns: str, path: DeltaPath) -> None:
    case = CASE["visibility"]
    backend = backend_for(case, netns, delta_path=path)
    hp = case.policy
    backend.apply(backend.render(hp))
    chains_before = [line for line in nft(netns, "-t", "list", "table", "inet", "stockade").splitlines()]
    peer = hp.rules[1].peer  # the allow rule's peer
    v4 = hp.set(peer, Family.V4).members
    v6 = hp.set(peer, Family.V6).members

    added4 = (n("10.0.9.9/32"), n("10.8.0.0/16"))
    added6 = (n("fd00:9::9/128"), n("fd00:8::/64"))
    backend.apply_delta((SetDelta(peer, Family.V4, added4, ()), SetDelta(peer, Family.V6, added6, ())))
    hp2 = with_members(with_members(hp, peer, Family.V4, v4 + added4), peer, Family.V6, v6 + added6)
    assert backend.verify(backend.render(hp2)).ok, backend.verify(backend.render(hp2)).problems
    assert "10.0.9.9" in nft(netns, "list", "set", "inet", "stockade", f"{peer}_v4_host")
    assert "10.8.0.0/16" in nft(netns, "list", "set", "inet", "stockade", f"{peer}_v4_net")
    assert "fd00:9::9" in nft(netns, "list", "set", "inet", "stockade", f"{peer}_v6_host")

    # a merge: two single addresses out, their /31 in, in one transaction
    merged = (n("10.0.9.8/31"),)
    backend.apply_delta((SetDelta(peer, Family.V4, merged, (n("10.0.9.9/32"),)),))
    hp3 = with_members(hp2, peer, Family.V4, (*v4, n("10.8.0.0/16"), *merged))
    assert backend.verify(backend.render(hp3)).ok, backend.verify(backend.render(hp3)).problems

    # removing a member the kernel does not hold changes nothing
    listing = backend.read_back()
    with pytest.raises(ApplyError):
        backend.apply_delta((SetDelta(peer, Family.V4, (n("10.7.7.7/32"),), (n("10.1.2.3/32"),)),))
    assert backend.read_back() == listing

    backend.apply_delta(
        (SetDelta(peer, Family.V4, (), (n("10.8.0.0/16"), *merged)), SetDelta(peer, Family.V6, (), added6))
    )
    assert backend.verify(backend.render(hp)).ok
    assert [line for line in nft(netns, "-t", "list", "table", "inet", "stockade").splitlines()] == chains_before
    backend.close()


def test_delta_to_missing_table_fails_cleanly(netns: str) -> None:
    backend = NftablesBackend(netns=netns)
    with pytest.raises(ApplyError):
        backend.apply_delta((SetDelta("pweb00000001", Family.V4, (n("10.0.0.1/32"),), ()),))
    assert nft(netns, "list", "ruleset") == ""


def test_idle_removes_the_table(netns: str) -> None:
    full, idle = CASE["full_basic"], CASE["idle"]
    backend = backend_for(full, netns)
    backend.apply(backend.render(full.policy))
    assert backend.read_back() != ""
    idle_artifact = backend.render(idle.policy)
    assert not idle_artifact.present
    backend.apply(idle_artifact)
    assert backend.read_back() == ""
    assert nft(netns, "list", "tables") == ""
    assert backend.verify(idle_artifact).ok
    backend.apply(idle_artifact)  # idle on an idle host is a no-op, not an error
    assert backend.read_back() == ""
