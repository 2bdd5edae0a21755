"""The policy CLI through the same entry point a user runs (``stockade ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from stockade.cli import main
from stockade.paths import example_estate

ESTATE = example_estate()


def _run(*args: str, seed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", *args], capture_output=True, text=True, env=env, check=False
    )


def test_compile_every_workload_is_byte_identical_across_hash_seeds() -> None:
    from stockade.policyfile import load_policy

    names = [w.name for w in load_policy(ESTATE).workloads]
    assert len(names) >= 5
    script = (
        "import sys; from stockade.policyfile import load_policy; "
        "from stockade.compiler import compile_policy, host_policy_to_json; "
        "p = load_policy(sys.argv[1]); c = compile_policy(p); "
        "sys.stdout.write(''.join(host_policy_to_json(c[n]) for n in sorted(c)))"
    )
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(
            [sys.executable, "-c", script, str(ESTATE)], capture_output=True, text=True, env=env, check=True
        )
        outputs.add(res.stdout)
    assert len(outputs) == 1
    (text,) = outputs
    assert text.count('"workload"') == len(names)


def test_check_reports_every_error_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: stockade.io/v1\nkind: Service\nname: web\nports: ['70000/tcp']\n---\n"
        "apiVersion: stockade.io/v1\nkind: IPList\nname: office\ninclude: ['10.0.0.300/24']\n"
    )
    result = CliRunner().invoke(main, ["check", str(bad)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if "bad.yaml:" in ln]
    assert any("bad.yaml:4:" in ln and "70000" in ln for ln in lines), result.output
    assert any("bad.yaml:9:" in ln and "10.0.0.300" in ln for ln in lines), result.output


def test_check_and_explain_on_the_example() -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["check", str(ESTATE)])
    assert ok.exit_code == 0 and ok.output.startswith("ok: ")
    res = runner.invoke(
        main, ["explain", str(ESTATE), "--from", "app-prod-1", "--to", "db-prod-1", "--port", "5432/tcp"]
    )
    assert res.exit_code == 0, res.output
    assert "verdict: allowed" in res.output
    res = runner.invoke(
        main, ["explain", str(ESTATE), "--from", "web-prod-1", "--to", "db-prod-1", "--port", "5432/tcp"]
    )
    assert "verdict: blocked" in res.output and "by default" in res.output
    bad_port = runner.invoke(main, ["explain", str(ESTATE), "--from", "a", "--to", "b", "--port", "99999/tcp"])
    assert bad_port.exit_code == 2 and "expected PORT/tcp" in bad_port.output


def test_compile_text_and_unknown_workload() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(ESTATE), "-w", "db-prod-1", "--format", "text"])
    assert res.exit_code == 0 and "first match wins" in res.output
    missing = runner.invoke(main, ["compile", str(ESTATE), "-w", "nope"])
    assert missing.exit_code == 1 and "no workload named 'nope'" in missing.output


def test_demo_runs_on_the_bundled_estate() -> None:
    """The README's first command, minus serving forever and the (root-only) lab."""
    res = _run("demo", "--no-serve", "--no-lab", "--port", "0")
    assert res.returncode == 0, res.stderr
    assert "db-prod-1" in res.stdout and "verdict: blocked" in res.stdout and "verdict: allowed" in res.stdout
    assert "provisioned version 1; 8 workloads" in res.stdout
    assert "Console:  https://127.0.0.1:" in res.stdout


def test_explain_icmp_picks_the_family_of_the_endpoints() -> None:
    """Issue 13: ``--port icmp --ipv6`` asked about ICMPv4 echo between IPv6 addresses."""
    runner = CliRunner()
    base = ["explain", str(ESTATE), "--from", "mon-1", "--to", "db-prod-1"]
    v6 = runner.invoke(main, [*base, "--port", "icmp", "--ipv6"])
    assert v6.exit_code == 0, v6.output
    assert "fd70::" in v6.output and "(icmpv6 type 128)" in v6.output
    v4 = runner.invoke(main, [*base, "--port", "icmp"])
    assert v4.exit_code == 0 and "(icmp type 8)" in v4.output
    named = runner.invoke(main, [*base, "--port", "icmpv6:echo-request"])
    assert named.exit_code == 0 and "(icmpv6 type 128)" in named.output
    mismatch = runner.invoke(main, [*base, "--port", "icmp:echo-request", "--ipv6"])
    assert mismatch.exit_code == 1 and "icmp is IPv4 only" in mismatch.output
    unknown = runner.invoke(main, [*base, "--port", "icmp:echo-requets"])
    assert unknown.exit_code == 2 and "unknown icmp type" in unknown.output
