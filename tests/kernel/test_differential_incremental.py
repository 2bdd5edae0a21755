"""Incremental differential test: inventory churn applied as the compiler's deltas, in the kernel.

Each example is a policy followed by 1-3 one-workload changes (relabel, mode change, a
workload joining or leaving; ``tests.strategies.policy_steps``). The first policy is
enforced in full; each change goes through ``Compiler.upsert_workload`` /
``remove_workload`` and the resulting ``HostDelta``s are applied the way an agent applies
them: a reload where rules changed, ``apply_delta`` (set members only) where they did
not. After every change the kernel must hold exactly what a fresh render of the new
policy holds (the backend's ``verify``), and after the last one every probe must agree
with the reference evaluator on the final policy.

A failing example is shrunk and saved as ``regressions/incremental-<digest>/stepN.yaml``
(one policy per step); ``test_saved_incremental_regressions_agree`` replays them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from stockade.compiler import Compiler, HostDelta
from stockade.lab.estate import EstateLab, EstateRun, plan_probes
from stockade.model import Policy
from stockade.policyfile import dump_policy, load_documents, load_policy
from tests import strategies
from tests.kernel.test_differential import REGRESSIONS, TIMEOUT, disagreement_report, prune_unused

EXAMPLES = int(os.environ.get("STOCKADE_INCREMENTAL_EXAMPLES", "60"))


class StepFailure(AssertionError):
    """The kernel diverged from a fresh render, or a probe from the evaluator."""


def deltas_between(compiler: Compiler, before: Policy, after: Policy) -> list[HostDelta]:
    """Feed the compiler the workload changes that turn ``before`` into ``after``."""
    old = before.workload_map()
    new = after.workload_map()
    deltas: list[HostDelta] = []
    for name in sorted(set(old) - set(new)):
        deltas += compiler.remove_workload(name)
    for name in sorted(new):
        if old.get(name) != new[name]:
            deltas += compiler.upsert_workload(new[name])
    return deltas


def run_steps(estate: EstateLab, steps: Sequence[Policy]) -> tuple[EstateRun, list[str]]:
    """Enforce ``steps[0]``, then each later step through deltas; verify and probe.

    Raises StepFailure naming the step when the kernel and a fresh render differ.
    """
    estate.enforce(steps[0])
    compiler = Compiler(steps[0])
    how: list[str] = []
    for i, (before, after) in enumerate(pairwise(steps), start=1):
        how += [f"step{i} {h}" for h in estate.apply_deltas(deltas_between(compiler, before, after))]
        problems = estate.verify(after)
        if problems:
            lines = [f"after step {i} ({', '.join(how)}) the kernel differs from a fresh render:"]
            lines += [f"  {host}: {p}" for host, found in sorted(problems.items()) for p in found]
            raise StepFailure("\n".join(lines))
    run = estate.check(steps[-1], plan_probes(strategies.LAB_HOSTS, strategies.PROBE_PLAN), timeout=TIMEOUT)
    return run, how


def save_steps(steps: Sequence[Policy], report: str) -> Path:
    texts = [dump_policy(prune_unused(p)) for p in steps]
    for text, p in zip(texts, steps, strict=True):
        if load_documents(text, "step.yaml") != prune_unused(p):
            raise AssertionError("dump_policy does not round-trip a step; cannot save it")
    digest = hashlib.sha256("".join(texts).encode()).hexdigest()[:12]
    folder = REGRESSIONS / f"incremental-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in report.splitlines())
    for i, text in enumerate(texts):
        header = "# Shrunk by tests/kernel/test_differential_incremental.py (step 0 enforced in full,\n"
        header += "# each later step applied as compiler deltas).\n"
        (folder / f"step{i}.yaml").write_text(header + (comment if i == 0 else "") + text)
    return folder


@pytest.mark.kernel
@pytest.mark.slow
def test_workload_churn_applied_as_deltas_agrees_with_the_evaluator(
    slot_lab: EstateLab, record_property: Callable[[str, object], None]
) -> None:
    counts = {"examples": 0, "probes": 0, "retried": 0}
    how_counts: dict[str, int] = {}
    last_failure: list[tuple[tuple[Policy, ...], str]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(steps=strategies.policy_steps())
    def check(steps: tuple[Policy, ...]) -> None:
        try:
            run, how = run_steps(slot_lab, steps)
        except Exception as exc:
            last_failure[:] = [(steps, f"{type(exc).__name__}: {exc}")]
            raise
        counts["examples"] += 1
        counts["probes"] += len(run.checks)
        counts["retried"] += run.retried
        for h in how:
            kind = h.rsplit(":", 1)[1]
            how_counts[kind] = how_counts.get(kind, 0) + 1
        if run.disagreements:
            report = "after " + ", ".join(how) + ":\n" + disagreement_report(steps[-1], run)
            last_failure[:] = [(steps, report)]
            raise AssertionError(report)

    try:
        check()
    except Exception:
        if last_failure:
            print(f"shrunk failing steps saved to {save_steps(*last_failure[-1])}")
        raise
    summary = (
        f"incremental differential: {counts['examples']} policies with churn, {counts['probes']} probes, "
        f"0 disagreements, kernel == fresh render after every step (host updates: "
        + ", ".join(f"{k} {v}" for k, v in sorted(how_counts.items()))
        + ")"
    )
    print(summary)
    record_property("lab_summary", summary)
    assert counts["examples"] >= EXAMPLES
    assert how_counts.get("delta", 0) > 0, "no example exercised a set-only delta"


def _step_folders() -> list[Path]:
    return sorted(p for p in REGRESSIONS.glob("incremental-*") if p.is_dir())


@pytest.mark.kernel
@pytest.mark.parametrize("folder", _step_folders(), ids=lambda p: p.name)
def test_saved_incremental_regressions_agree(folder: Path, slot_lab: EstateLab) -> None:
    steps = [load_policy(p) for p in sorted(folder.glob("step*.yaml"), key=lambda p: int(p.stem[4:]))]
    run, how = run_steps(slot_lab, steps)
    assert not run.disagreements, "after " + ", ".join(how) + ":\n" + disagreement_report(steps[-1], run)
