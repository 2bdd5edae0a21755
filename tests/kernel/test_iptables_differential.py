"""Differential test of the iptables+ipset backend: random policies in real namespaces vs the evaluator.

The same generator, lab hosts, probe plan and reporting as ``test_differential.py`` (the
nftables run); here each estate is enforced by the ``iptables`` backend, once with the
``legacy`` variant and once with the ``nft`` variant, each in one long-lived lab of its
own. Every real outcome must equal the reference evaluator's verdict. A disagreement is
shrunk and saved to ``tests/kernel/regressions/`` like the nftables one; the saved files
are replayed here through iptables too, and the compiler's incremental deltas (reload or
``ipset`` delta) are checked on a few churn sequences per variant.

``STOCKADE_IPTABLES_DIFFERENTIAL_EXAMPLES`` (default 200) sets the policies per variant.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from stockade.lab.estate import EstateLab, PortPlan, hosts_for_policy, plan_probes, registry_backend, service_ports
from stockade.model import Policy
from stockade.policyfile import load_policy
from tests import strategies
from tests.kernel.test_differential import REGRESSIONS, TIMEOUT, Tally, disagreement_report, save_regression
from tests.kernel.test_differential_incremental import StepFailure, run_steps

EXAMPLES = int(os.environ.get("STOCKADE_IPTABLES_DIFFERENTIAL_EXAMPLES", "200"))
INCREMENTAL_EXAMPLES = int(os.environ.get("STOCKADE_IPTABLES_INCREMENTAL_EXAMPLES", "15"))
VARIANTS = ("legacy", "nft")

pytestmark = pytest.mark.kernel


def _missing_tools(variant: str) -> str | None:
    for tool in (f"iptables-{variant}-restore", f"ip6tables-{variant}-restore", "ipset", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} on PATH"
    return None


@pytest.fixture(scope="module", params=VARIANTS)
def iptables_lab(request: pytest.FixtureRequest) -> Iterator[tuple[str, EstateLab]]:
    """One lab per variant with every workload slot and the office client, enforced by iptables."""
    variant: str = request.param
    reason = _missing_tools(variant)
    if reason:
        pytest.skip(reason)
    with EstateLab(strategies.LAB_HOSTS, backend=registry_backend("iptables", variant=variant)) as estate:
        yield variant, estate


@pytest.mark.slow
def test_random_policies_agree_with_the_evaluator(
    iptables_lab: tuple[str, EstateLab], record_property: Callable[[str, object], None]
) -> None:
    variant, lab = iptables_lab
    tally = Tally()
    last_failure: list[tuple[Policy, str]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(policy=strategies.policy())
    def check(policy: Policy) -> None:
        probes = plan_probes(strategies.LAB_HOSTS, strategies.PROBE_PLAN)
        try:
            run = lab.run(policy, probes, timeout=TIMEOUT)
        except Exception as exc:  # a crash in compile/render/apply is a finding too
            last_failure[:] = [(policy, f"iptables-{variant}: enforcing raised {type(exc).__name__}: {exc}")]
            raise
        tally.add(run)
        if run.disagreements:
            report = f"iptables-{variant}: " + disagreement_report(policy, run)
            last_failure[:] = [(policy, report)]
            raise AssertionError(report)

    try:
        check()
    except Exception:
        if last_failure:
            print(f"shrunk failing policy saved to {save_regression(*last_failure[-1])}")
        raise
    summary = (
        f"iptables-{variant} differential: {tally.policies} policies, {tally.probes} probes, 0 disagreements "
        f"({tally.retried} slow probes confirmed by a retry; "
        + ", ".join(f"{k} {v}" for k, v in sorted(tally.verdicts.items()))
        + ")"
    )
    print(summary)
    record_property("lab_summary", summary)
    assert tally.policies >= EXAMPLES
    assert tally.probes > 0


@pytest.mark.slow
def test_incremental_deltas_agree(
    iptables_lab: tuple[str, EstateLab], record_property: Callable[[str, object], None]
) -> None:
    """Churn applied as compiler deltas (reload or ipset add/del): kernel == fresh render, probes == evaluator."""
    variant, lab = iptables_lab
    counted: list[int] = []

    @settings(
        max_examples=INCREMENTAL_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(steps=strategies.policy_steps())
    def check(steps: Sequence[Policy]) -> None:
        try:
            run, how = run_steps(lab, steps)
        except StepFailure as exc:
            raise AssertionError(f"iptables-{variant}: {exc}") from exc
        counted.append(sum(1 for h in how if h.endswith(":delta")))
        if run.disagreements:
            raise AssertionError(f"iptables-{variant}: " + disagreement_report(steps[-1], run))

    check()
    summary = f"iptables-{variant} incremental: {len(counted)} churn sequences, {sum(counted)} ipset deltas applied"
    print(summary)
    record_property("lab_summary", summary)
    assert len(counted) >= INCREMENTAL_EXAMPLES


def _regression_files() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", _regression_files(), ids=lambda p: p.name)
def test_saved_regressions_agree(path: Path, variant: str) -> None:
    """Each saved policy, in a lab of its own, with its services' ports probed too."""
    reason = _missing_tools(variant)
    if reason:
        pytest.skip(reason)
    policy = load_policy(path)
    extra = service_ports(policy)
    plan = PortPlan(
        tuple(sorted({*strategies.PROBE_PLAN.tcp, *extra.tcp})),
        tuple(sorted({*strategies.PROBE_PLAN.udp, *extra.udp})),
        icmp_echo=True,
    )
    unmanaged = [strategies.OFFICE] if not any(w.name == strategies.OFFICE[0] for w in policy.workloads) else []
    hosts = hosts_for_policy(policy, tcp_ports=plan.tcp, udp_ports=plan.udp, unmanaged=unmanaged)
    with EstateLab(hosts, backend=registry_backend("iptables", variant=variant)) as estate:
        run = estate.run(policy, plan_probes(hosts, plan), timeout=TIMEOUT)
    assert not run.disagreements, f"iptables-{variant}: " + disagreement_report(policy, run)
