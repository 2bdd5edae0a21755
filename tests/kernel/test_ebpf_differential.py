"""Differential test of the eBPF backend: random policies in real namespaces vs the evaluator.

The same generator, lab hosts, probe plan and reporting as ``test_differential.py`` (the
nftables run); here every estate is enforced by the ``ebpf`` backend (tc programs and
maps) in one long-lived lab of its own. Every real outcome must equal the reference
evaluator's verdict. Between examples the lab flushes conntrack, which the eBPF flow map
does not use: stale flows are harmless because each apply bumps the flow epoch and a flow
of an older epoch is re-checked against the new policy (that path is exercised here).

A disagreement is shrunk and saved to ``tests/kernel/regressions/`` like the nftables
one; the saved files are replayed through eBPF too, and the compiler's incremental
deltas (reload or map delta) are checked on churn sequences.

``STOCKADE_EBPF_DIFFERENTIAL_EXAMPLES`` (default 200) sets the number of policies.
"""

from __future__ import annotations

import os
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
from tests.kernel.test_ebpf_backend import SKIP

EXAMPLES = int(os.environ.get("STOCKADE_EBPF_DIFFERENTIAL_EXAMPLES", "200"))
INCREMENTAL_EXAMPLES = int(os.environ.get("STOCKADE_EBPF_INCREMENTAL_EXAMPLES", "20"))

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


@pytest.fixture(scope="module")
def ebpf_lab() -> Iterator[EstateLab]:
    """Every workload slot and the office client, enforced by the eBPF backend."""
    with EstateLab(strategies.LAB_HOSTS, backend=registry_backend("ebpf")) as estate:
        try:
            yield estate
        finally:
            estate.clear()


@pytest.mark.slow
def test_random_policies_agree_with_the_evaluator(
    ebpf_lab: EstateLab, record_property: Callable[[str, object], None]
) -> None:
    tally = Tally()
    last_failure: list[tuple[Policy, str]] = []

    @settings(max_examples=EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
    @given(policy=strategies.policy())
    def check(policy: Policy) -> None:
        probes = plan_probes(strategies.LAB_HOSTS, strategies.PROBE_PLAN)
        try:
            run = ebpf_lab.run(policy, probes, timeout=TIMEOUT)
        except Exception as exc:  # a crash in compile/render/apply is a finding too
            last_failure[:] = [(policy, f"ebpf: enforcing raised {type(exc).__name__}: {exc}")]
            raise
        tally.add(run)
        if run.disagreements:
            report = "ebpf: " + disagreement_report(policy, run)
            last_failure[:] = [(policy, report)]
            raise AssertionError(report)

    try:
        check()
    except Exception:
        if last_failure:
            print(f"shrunk failing policy saved to {save_regression(*last_failure[-1])}")
        raise
    summary = (
        f"ebpf differential: {tally.policies} policies, {tally.probes} probes, 0 disagreements "
        f"({tally.retried} slow probes confirmed by a retry; "
        + ", ".join(f"{k} {v}" for k, v in sorted(tally.verdicts.items()))
        + ")"
    )
    print(summary)
    record_property("lab_summary", summary)
    assert tally.policies >= EXAMPLES
    assert tally.probes > 0


@pytest.mark.slow
def test_incremental_deltas_agree(ebpf_lab: EstateLab, record_property: Callable[[str, object], None]) -> None:
    """Churn applied as compiler deltas (reload or map delta): kernel == fresh render, probes == evaluator."""
    counted: list[int] = []

    @settings(max_examples=INCREMENTAL_EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
    @given(steps=strategies.policy_steps())
    def check(steps: Sequence[Policy]) -> None:
        try:
            run, how = run_steps(ebpf_lab, steps)
        except StepFailure as exc:
            raise AssertionError(f"ebpf: {exc}") from exc
        counted.append(sum(1 for h in how if h.endswith(":delta")))
        if run.disagreements:
            raise AssertionError("ebpf: " + disagreement_report(steps[-1], run))

    check()
    summary = f"ebpf incremental: {len(counted)} churn sequences, {sum(counted)} map deltas applied"
    print(summary)
    record_property("lab_summary", summary)
    assert len(counted) >= INCREMENTAL_EXAMPLES


def _regression_files() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.yaml"))


@pytest.mark.parametrize("path", _regression_files(), ids=lambda p: p.name)
def test_saved_regressions_agree(path: Path) -> None:
    """Each saved policy, in a lab of its own, with its services' ports probed too."""
    policy = load_policy(path)
    extra = service_ports(policy)
    plan = PortPlan(
        tuple(sorted({*strategies.PROBE_PLAN.tcp, *extra.tcp})),
        tuple(sorted({*strategies.PROBE_PLAN.udp, *extra.udp})),
        icmp_echo=True,
    )
    unmanaged = [strategies.OFFICE] if not any(w.name == strategies.OFFICE[0] for w in policy.workloads) else []
    hosts = hosts_for_policy(policy, tcp_ports=plan.tcp, udp_ports=plan.udp, unmanaged=unmanaged)
    with EstateLab(hosts, backend=registry_backend("ebpf")) as estate:
        try:
            run = estate.run(policy, plan_probes(hosts, plan), timeout=TIMEOUT)
        finally:
            estate.clear()
    assert not run.disagreements, "ebpf: " + disagreement_report(policy, run)
