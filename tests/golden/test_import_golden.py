"""Golden files for the importers: tests/golden/import/<case>.policy.yaml and <case>.report.txt.

The corpus is in ``input/``: a Docker host's iptables, a CIS-hardened server (v4 + v6), a
Kubernetes node's filter table, a hand-written file with every construct (+ its ipset), an nft
JSON ruleset, a Windows Firewall export and an Illumio PCE export. Every imported policy must also
load back through the policy-file loader. ``.actual`` is written on a mismatch;
``STOCKADE_UPDATE_GOLDEN=1`` rewrites the golden files.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from stockade.importers import ImportOptions, Outcome, Source, report_text, run_import
from stockade.policyfile import dump_policy, load_documents
from tests.golden.test_windows_golden import check_golden

HERE = Path(__file__).parent / "import"
INPUT = HERE / "input"
ADDRESSES = {
    "cis-server": ("10.30.0.10", "fd30::10"),
    "db1": ("10.2.0.20", "fd00::20"),
    "every-construct": ("10.40.0.1",),
    "win1": ("10.3.0.10",),
}
CASES = {
    "docker-host": ("iptables", ["docker-host.iptables"]),
    "cis-server": ("iptables", ["cis-server.iptables", "cis-server.ip6tables"]),
    "k8s-node": ("iptables", ["k8s-node.iptables"]),
    "every-construct": ("iptables", ["every-construct.iptables", "every-construct.ipset"]),
    "nft-host": ("nftables", ["nft-host.nft.json"]),
    "windows-host": ("windows", ["windows-host.json"]),
    "illumio-pce": ("illumio", ["illumio-pce.json"]),
}


def run_case(name: str) -> tuple[str, str]:
    kind, files = CASES[name]
    host = "db1" if name == "nft-host" else None
    options = ImportOptions(host, {h: tuple(ipaddress.ip_address(a) for a in addrs) for h, addrs in ADDRESSES.items()})
    result = run_import(kind, [Source(f, (INPUT / f).read_text()) for f in files], options)
    return dump_policy(result.policy), report_text(result)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    policy, report = run_case(name)
    load_documents(policy, f"{name}.policy.yaml")  # what the importer writes is valid policy as code
    check_golden(HERE / f"{name}.policy.yaml", policy)
    check_golden(HERE / f"{name}.report.txt", report)


def test_import_is_deterministic() -> None:
    for name in CASES:
        assert run_case(name) == run_case(name)


def test_every_input_is_used() -> None:
    used = {f for _, files in CASES.values() for f in files}
    assert {p.name for p in INPUT.iterdir()} == used


def test_unexpressible_constructs_leave_the_host_in_visibility() -> None:
    kind, files = CASES["every-construct"]
    result = run_import(kind, [Source(f, (INPUT / f).read_text()) for f in files], ImportOptions())
    host = result.policy.workload_map()["every-construct"]
    assert host.mode.value == "visibility"
    named = " ".join(f.construct for f in result.findings if f.outcome is Outcome.NOT_EXPRESSIBLE)
    assert "MARK" in named and "string" in named and "limit" in named
    assert any(f.outcome is Outcome.OUT_OF_SCOPE and "mangle" in f.construct for f in result.findings)


def test_a_clean_ruleset_is_enforced() -> None:
    kind, files = CASES["cis-server"]
    result = run_import(kind, [Source(f, (INPUT / f).read_text()) for f in files], ImportOptions())
    assert result.policy.workload_map()["cis-server"].mode.value == "full"
    assert result.count(Outcome.NOT_EXPRESSIBLE) == 0
