"""``stockade lab demo``: the example estate enforced by nftables agrees with the evaluator."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from stockade.cli import main
from stockade.lab.demo import format_table, load_example_policy, run_demo
from stockade.lab.probes import ProbeKind

pytestmark = pytest.mark.kernel


def test_example_estate_in_the_lab_matches_the_evaluator() -> None:
    policy = load_example_policy()
    report = run_demo(policy)
    run = report.run
    assert not run.disagreements, "\n".join(c.describe() for c in run.disagreements)
    hosts = {w.name for w in policy.workloads} | {"office-client", "controller"}
    n = len(hosts)
    kinds = len(report.plan.tcp) + len(report.plan.udp) + 1
    assert len(run.checks) == n * (n - 1) * kinds * 2

    def outcome(src: str, dst: str, port: int | None, family: int = 4) -> bool:
        for c in run.checks:
            p = c.probe
            if (p.src_host, p.dst_host, p.port, p.family.value) == (src, dst, port, family):
                return c.result.succeeded
        raise AssertionError(f"no probe {src} -> {dst} {port}")

    # staff reach the prod storefront from the office, but not its database
    assert outcome("office-client", "web-prod-1", 443)
    assert outcome("office-client", "web-prod-1", 443, 6)
    assert not outcome("office-client", "db-prod-1", 5432)
    # the shop's tiers: web -> app -> db in prod
    assert outcome("web-prod-1", "app-prod-1", 8080)
    assert outcome("app-prod-1", "db-prod-1", 5432, 6)
    assert not outcome("web-prod-1", "db-prod-1", 5432)
    # the override-deny on SMB wins even where the dev hosts default to allow
    assert not outcome("web-dev-1", "app-dev-1", 445)
    # non-prod may not reach prod except the allowed smoke test on https
    assert not outcome("app-dev-1", "app-prod-1", 8080)
    assert outcome("web-dev-1", "web-prod-1", 443)
    # management and controller failsafes
    assert outcome("office-client", "db-prod-1", 22)
    assert outcome("db-prod-1", "controller", 8443, 6)
    # every kind of probe both succeeded and failed somewhere
    for kind in ProbeKind:
        if kind is ProbeKind.SCTP:
            continue  # the estate has no SCTP service: the plan sends none (tests/k8s and test_lab probe SCTP)
        results = {c.result.succeeded for c in run.checks if c.probe.kind is kind}
        if kind is not ProbeKind.UDP or report.plan.udp:
            assert results == {True, False}, kind
    assert not any(c.probe.kind is ProbeKind.SCTP for c in run.checks)

    table = format_table(report)
    assert table.splitlines()[0].split()[:3] == ["from", "to", "service"]
    assert table.endswith(f"{len(run.checks)} probes, 0 disagreements")


def test_lab_demo_command_prints_the_table_and_the_count() -> None:
    result = CliRunner().invoke(main, ["lab", "demo"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\d+ probes, 0 disagreements$", result.output, re.M)
    assert "office-client" in result.output and "blocked" in result.output and "connected" in result.output
