"""``stockade render``: the nftables artifact of an example workload, and clean errors."""

from __future__ import annotations

from click.testing import CliRunner

from stockade.cli import main
from stockade.compiler import compile_host
from stockade.paths import example_estate
from stockade.policyfile import load_policy


def test_render_prints_the_artifact() -> None:
    estate = example_estate()
    result = CliRunner().invoke(main, ["render", str(estate), "--workload", "web-prod-1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# Stockade nftables ruleset: workload web-prod-1")
    assert "table inet stockade {" in result.output
    hp = compile_host(load_policy(estate), "web-prod-1")
    for rule in hp.rules:
        assert f'comment "{rule.rule_id}"' in result.output
    for s in hp.sets:
        assert f"set {s.name}_v{s.family.value}_host {{" in result.output


def test_render_options_and_errors() -> None:
    estate = str(example_estate())
    runner = CliRunner()
    custom = runner.invoke(main, ["render", estate, "-w", "web-prod-1", "--table", "stk_x", "--forward"])
    assert custom.exit_code == 0 and "table inet stk_x {" in custom.output and "chain forward {" in custom.output
    unknown = runner.invoke(main, ["render", estate, "-w", "no-such-host"])
    assert unknown.exit_code == 1 and "no workload named 'no-such-host'" in unknown.output
    bad = runner.invoke(main, ["render", estate, "-w", "web-prod-1", "--backend", "pf"])
    assert bad.exit_code == 2
