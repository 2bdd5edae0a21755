"""``stockade import`` and ``stockade render --all``: files in, policy as code + report out."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from stockade.cli import main
from stockade.policyfile import load_policy

CORPUS = Path(__file__).parents[1] / "golden" / "import" / "input"


def test_import_writes_policy_and_report_that_check_accepts(tmp_path: Path) -> None:
    out = tmp_path / "imported"
    files = [str(CORPUS / "every-construct.iptables"), str(CORPUS / "every-construct.ipset")]
    r = CliRunner().invoke(main, ["import", "iptables", *files, "-o", str(out), "--address",
                                  "every-construct=10.40.0.1"])
    assert r.exit_code == 0, r.output
    assert "every-construct.iptables:41" in r.output  # the bad line, named with file:line
    policy = load_policy(out)
    assert policy.workload_map()["every-construct"].mode.value == "visibility"
    report = (out / "import-report.txt").read_text()
    assert "## not expressible" in report and "MARK" in report
    assert (out / "import-report.json").exists()
    again = CliRunner().invoke(main, ["import", "iptables", *files, "-o", str(out)])
    assert again.exit_code != 0 and "--force" in again.output
    assert CliRunner().invoke(main, ["check", str(out)]).exit_code == 0


def test_import_refuses_a_bad_address_and_an_unknown_kind(tmp_path: Path) -> None:
    f = str(CORPUS / "docker-host.iptables")
    r = CliRunner().invoke(main, ["import", "iptables", f, "-o", str(tmp_path / "a"), "--address", "h=10.0.0.999"])
    assert r.exit_code == 2 and "10.0.0.999" in r.output
    r = CliRunner().invoke(main, ["import", "pf", f, "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "pf" in r.output


def test_render_all_writes_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "imported"
    r = CliRunner().invoke(main, ["import", "nftables", str(CORPUS / "nft-host.nft.json"), "-o", str(out),
                                  "--host", "db1"])
    assert r.exit_code == 0, r.output
    native = tmp_path / "native"
    r = CliRunner().invoke(main, ["render", str(out), "--all", "-o", str(native), "--backend", "iptables"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in native.iterdir())
    assert names == ["db1.iptables.rules", "peer-10.2.0.11.iptables.rules", "peer-10.2.0.12.iptables.rules"]
    assert "*filter" in (native / "db1.iptables.rules").read_text()
    r = CliRunner().invoke(main, ["render", str(out), "--all"])
    assert r.exit_code == 2
