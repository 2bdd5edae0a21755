"""``stockade import --verify`` on the corpus: the original ruleset and Stockade's import, each in its
own lab namespace, probed alike (TCP/UDP/ICMP, v4/v6, across every rule's match space).

Never wider: no probe gets through Stockade that the original blocked. Where the import reported
nothing approximated, every probe is equal; where it did, every difference is a narrowing at a rule
the report names. The nftables case uses JSON that a real ``nft -j list ruleset`` printed.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from pathlib import Path

import pytest

from stockade.importers import ImportOptions, Outcome, Source, run_import
from stockade.lab.importverify import verify_import

pytestmark = pytest.mark.kernel

CORPUS = Path(__file__).parents[1] / "golden" / "import" / "input"
ADDRS = (ipaddress.ip_address("10.70.253.1"), ipaddress.ip_address("fd70:253::1"))
CASES = {
    "cis-server": ["cis-server.iptables", "cis-server.ip6tables"],
    "docker-host": ["docker-host.iptables"],
    "every-construct": ["every-construct.iptables", "every-construct.ipset"],
    "k8s-node": ["k8s-node.iptables"],
}
EXACT = {"cis-server", "docker-host"}
# a narrowing at a named rule shows on that rule's own samples; the k8s node's widened KUBE-FIREWALL drop
# (conditions Stockade cannot match) narrows every probe, so there only "never wider" is checked
NAMED = {"every-construct"}


def _sources(files: list[str]) -> list[Source]:
    return [Source(f, (CORPUS / f).read_text()) for f in files]


def _check(kind: str, sources: list[Source], host: str, backend: str, exact: bool, named_only: bool = False) -> int:
    options = ImportOptions(host, {host: ADDRS})
    report = verify_import(kind, sources, options, host, backend)
    assert len(report.rows) >= 10
    wider = [r for r in report.rows if r.wider]
    assert not wider, "Stockade allows what the original blocked:\n" + report.text()
    if exact:
        assert not report.different, report.text()
    elif named_only:
        result = run_import(kind, sources, options)
        named = {str(f.origin) for f in result.findings if f.outcome in (Outcome.APPROXIMATED,
                                                                           Outcome.NOT_EXPRESSIBLE)}
        unexplained = [r for r in report.different if r.rule not in named]
        assert not unexplained, report.text()
    return len(report.rows)


@pytest.mark.parametrize("case", sorted(CASES))
def test_iptables_corpus(case: str, record_property: pytest.RecordProperty) -> None:
    n = _check("iptables", _sources(CASES[case]), case, "nftables", case in EXACT, case in NAMED)
    record_property("lab_summary", f"import --verify {case}: {n} probes")


def test_stockade_side_on_iptables_backend() -> None:
    _check("iptables", _sources(CASES["cis-server"]), "cis-server", "iptables", True)


NFT_TEXT = """
table inet filter {
    set admins { type ipv4_addr; elements = { 10.71.0.5, 10.71.0.6 } }
    set web6 { type ipv6_addr; flags interval; elements = { fd71::/64 } }
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iifname "lo" accept
        ct state invalid drop
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept
        ip saddr 10.71.9.0/24 drop
        ip saddr @admins tcp dport 22 accept
        ip6 saddr @web6 tcp dport { 80, 443 } accept
        tcp dport vmap { 8080 : accept, 8081 : drop }
        ip saddr 10.71.0.0/16 udp dport 5000-5010 accept
        icmp type echo-request accept
        jump extra
    }
    chain extra {
        ip saddr 10.71.7.7 return
        ip saddr 10.71.7.0/24 tcp dport 9000 accept
    }
    chain output {
        type filter hook output priority 0; policy accept;
        ip daddr 10.71.66.0/24 drop
    }
}
"""


def _nft_json() -> str:
    ns = f"stkimp{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=NFT_TEXT, text=True, check=True)
        return subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"], text=True, check=True,
                              capture_output=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_nftables_ruleset_listed_by_nft() -> None:
    text = _nft_json()
    _check("nftables", [Source("nft-ruleset.json", text)], "nfthost", "nftables", True)


def test_cli_verify_writes_the_per_probe_report(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stockade.cli import main

    files = [str(CORPUS / f) for f in CASES["every-construct"]]
    out = tmp_path / "imported"
    r = CliRunner().invoke(main, ["import", "iptables", *files, "-o", str(out), "--verify",
                                  "--address", "every-construct=10.70.253.1,fd70:253::1"])
    assert r.exit_code == 1, r.output  # one narrowing: the rate-limited accept (line 26) is left out
    assert "0 wider" in r.output
    report = (out / "verify-report.txt").read_text()
    assert "different (narrower)" in report and "every-construct.iptables:26" in report
