"""Differential matrix: random policies enforced by every Linux backend in real namespaces vs the evaluator.

One scenario set, parametrised over :data:`TARGETS` (every Linux backend of the registry,
iptables once per variant), as firewalld runs its scenarios for every backend:

* **random policies** - hypothesis generates estates and policies (``tests.strategies``); each
  is compiled, rendered and applied by the target inside the namespaces of ONE long-lived lab
  per target (re-applied per example, conntrack flushed), then every ordered pair of hosts
  (workloads, slots left empty as unmanaged hosts, an office client) is probed on a fixed port
  vocabulary (TCP 80, 443, 8080; UDP 53; ICMP echo) over IPv4 and IPv6. Every real outcome
  must equal the reference evaluator's verdict: ALLOWED and POTENTIALLY_BLOCKED connect,
  BLOCKED does not;
* **incremental churn** - a policy followed by 1-3 one-workload changes
  (``tests.strategies.policy_steps``); each change goes through ``Compiler.upsert_workload`` /
  ``remove_workload`` and the resulting ``HostDelta``s are applied the way an agent applies
  them (a reload where rules changed, ``apply_delta`` where only set members did). After every
  change the kernel must hold what a fresh render holds (the backend's ``verify``); after the
  last one every probe must agree with the evaluator;
* **saved regressions** - a disagreement is shrunk to a minimal policy and written as YAML to
  ``tests/kernel/regressions/`` (``differential-<digest>.yaml``; churn as
  ``incremental-<digest>/stepN.yaml``) and replayed through every target from then on;
* **teeth** - the real backend fed a deliberately corrupted host policy must be caught.

Each target keeps its own example counts (and the environment variables that set them).
A Linux backend added to the registry must be added here: a test says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from stockade.backends.registry import BACKEND_CLASSES
from stockade.compiler import Compiler, HostDelta, HostPolicy, SetDelta
from stockade.lab.estate import (
    BackendFactory,
    EstateLab,
    EstateRun,
    PortPlan,
    hosts_for_policy,
    plan_probes,
    registry_backend,
    service_ports,
)
from stockade.model import (
    ALL_WORKLOADS,
    Action,
    AllowRule,
    DenyRule,
    EnforcementMode,
    Interface,
    IPListSelector,
    Label,
    LabelSelector,
    Policy,
    Ruleset,
    Workload,
)
from stockade.policyfile import dump_policy, load_documents, load_policy
from tests import strategies
from tests.kernel.test_ebpf_backend import SKIP as EBPF_SKIP

pytestmark = pytest.mark.kernel

REGRESSIONS = Path(__file__).parent / "regressions"
TIMEOUT = 0.3
PLAN = strategies.PROBE_PLAN
LAB_HOSTS = strategies.LAB_HOSTS
NOT_LINUX = frozenset({"windows", "ipfilter", "f5"})  # registered, but not enforced in a Linux kernel
_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


@dataclass(frozen=True)
class Target:
    """One Linux backend (with options: a variant) the matrix runs, and how many examples it gets."""

    id: str
    backend: str  # registry name
    options: tuple[tuple[str, str], ...]
    examples_env: str
    examples: int
    incremental_env: str
    incremental: int
    tools: tuple[str, ...] = ()

    def skip_reason(self) -> str | None:
        if self.backend == "ebpf" and EBPF_SKIP:
            return EBPF_SKIP
        missing = [t for t in self.tools if shutil.which(t) is None]
        return f"{self.id} needs {missing[0]!r} on PATH" if missing else None

    def factory(self) -> BackendFactory:
        return registry_backend(self.backend, **dict(self.options))

    @property
    def random_examples(self) -> int:
        return int(os.environ.get(self.examples_env, str(self.examples)))

    @property
    def churn_examples(self) -> int:
        return int(os.environ.get(self.incremental_env, str(self.incremental)))


def _iptables(variant: str) -> Target:
    tools = (f"iptables-{variant}-restore", f"ip6tables-{variant}-restore", "ipset", "nsenter")
    return Target(f"iptables-{variant}", "iptables", (("variant", variant),),
                  "STOCKADE_IPTABLES_DIFFERENTIAL_EXAMPLES", 200, "STOCKADE_IPTABLES_INCREMENTAL_EXAMPLES", 15, tools)


TARGETS: tuple[Target, ...] = (
    Target("nftables", "nftables", (("table", "stockade"),),
           "STOCKADE_DIFFERENTIAL_EXAMPLES", 200, "STOCKADE_INCREMENTAL_EXAMPLES", 60, ("nft",)),
    _iptables("legacy"),
    _iptables("nft"),
    Target("ebpf", "ebpf", (), "STOCKADE_EBPF_DIFFERENTIAL_EXAMPLES", 200, "STOCKADE_EBPF_INCREMENTAL_EXAMPLES", 20),
)
_TARGET_PARAMS = [pytest.param(t, id=t.id) for t in TARGETS]


def test_every_registered_linux_backend_is_in_the_matrix() -> None:
    assert {t.backend for t in TARGETS} == set(BACKEND_CLASSES) - NOT_LINUX



@contextlib.contextmanager
def target_lab(target: Target, hosts: Sequence[Any] = LAB_HOSTS,
               factory: BackendFactory | None = None) -> Iterator[EstateLab]:
    """A lab enforced by ``target``; what the backend installed is removed before the namespaces go
    (eBPF pins outlive a namespace)."""
    reason = target.skip_reason()
    if reason:
        pytest.skip(reason)
    with EstateLab(hosts, backend=factory or target.factory()) as estate:
        try:
            yield estate
        finally:
            estate.clear()


@pytest.fixture(scope="module", params=_TARGET_PARAMS)
def lab(request: pytest.FixtureRequest) -> Iterator[tuple[Target, EstateLab]]:
    """One long-lived lab per target with every workload slot and the office client."""
    target: Target = request.param
    with target_lab(target) as estate:
        yield target, estate


# ---- reporting and saving ------------------------------------------------------------------


@dataclass
class Tally:
    policies: int = 0
    probes: int = 0
    retried: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)

    def add(self, run: EstateRun) -> None:
        self.policies += 1
        self.probes += len(run.checks)
        self.retried += run.retried
        for c in run.checks:
            key = f"{c.evaluation.verdict.value}/{'ok' if c.result.succeeded else 'fail'}"
            self.verdicts[key] = self.verdicts.get(key, 0) + 1


def disagreement_report(policy: Policy, run: EstateRun) -> str:
    lines = [f"{len(run.disagreements)} of {len(run.checks)} probes disagree with the evaluator:"]
    lines += [f"  {c.describe()}" for c in run.disagreements[:40]]
    return "\n".join(lines)


def prune_unused(policy: Policy) -> Policy:
    """``policy`` without the services, IP lists and label groups no rule mentions (same meaning)."""
    services = {n for rs in policy.rulesets for r in rs.rules for n in r.services}
    services |= {n for d in policy.deny_rules for n in d.services}
    services.add(strategies.ANY_SERVICE.name)  # built in: the loader always adds it
    selectors = list(policy.iter_selectors())
    ip_lists = {s.ip_list for s in selectors if isinstance(s, IPListSelector)}
    groups = {g for s in selectors if isinstance(s, LabelSelector) for g in s.groups}
    return replace(
        policy,
        services=tuple(s for s in policy.services if s.name in services),
        ip_lists=tuple(i for i in policy.ip_lists if i.name in ip_lists),
        label_groups=tuple(g for g in policy.label_groups if g.name in groups),
    )


def _round_trip(policy: Policy) -> str:
    text = dump_policy(prune_unused(policy))
    if load_documents(text, "regression.yaml") != prune_unused(policy):
        raise AssertionError("dump_policy does not round-trip this policy; cannot save it")
    return text


def _comment(report: str) -> str:
    return "".join(f"# {line}\n" for line in report.splitlines())


def save_regression(policy: Policy, report: str) -> Path:
    """Write ``policy`` (pruned) as policy YAML, the disagreement report as a leading comment."""
    text = _round_trip(policy)
    path = REGRESSIONS / f"differential-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    path.write_text("# Shrunk by tests/kernel/test_differential.py; replayed by test_saved_regressions_agree.\n"
                    + _comment(report) + text)
    return path


def save_steps(steps: Sequence[Policy], report: str) -> Path:
    texts = [_round_trip(p) for p in steps]
    folder = REGRESSIONS / f"incremental-{hashlib.sha256(''.join(texts).encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        header = "# Shrunk by tests/kernel/test_differential.py (step 0 enforced in full,\n"
        header += "# each later step applied as compiler deltas).\n"
        (folder / f"step{i}.yaml").write_text(header + (_comment(report) if i == 0 else "") + text)
    return folder


def _agree(run: EstateRun, policy: Policy, label: str, example: Any, last_failure: list[tuple[Any, str]]) -> None:
    """Fail (remembering ``example`` for saving) when a probe disagrees with the evaluator."""
    if run.disagreements:
        report = label + disagreement_report(policy, run)
        last_failure[:] = [(example, report)]
        raise AssertionError(report)


def _shrunk(check: Callable[[], None], last_failure: list[tuple[Any, str]], save: Callable[..., Path]) -> None:
    """Run a hypothesis ``check``; on failure save the shrunk example (hypothesis replays it last)."""
    try:
        check()
    except Exception:
        if last_failure:
            print(f"shrunk failing example saved to {save(*last_failure[-1])}")
        raise


# ---- random policies -------------------------------------------------------------------------


@pytest.mark.slow
def test_random_policies_agree_with_the_evaluator(
    lab: tuple[Target, EstateLab], record_property: Callable[[str, object], None]
) -> None:
    target, estate = lab
    tally = Tally()
    last_failure: list[tuple[Any, str]] = []

    @settings(max_examples=target.random_examples, **_SETTINGS)
    @given(policy=strategies.policy())
    def check(policy: Policy) -> None:
        # every lab host: slots that are not workloads this time are unmanaged hosts
        probes = plan_probes(LAB_HOSTS, PLAN)
        try:
            run = estate.run(policy, probes, timeout=TIMEOUT)
        except Exception as exc:  # a crash in compile/render/apply is a finding too
            last_failure[:] = [(policy, f"{target.id}: enforcing raised {type(exc).__name__}: {exc}")]
            raise
        tally.add(run)
        _agree(run, policy, f"{target.id}: ", policy, last_failure)

    _shrunk(check, last_failure, save_regression)
    summary = (
        f"{target.id} differential: {tally.policies} policies, {tally.probes} probes, 0 disagreements "
        f"({tally.retried} slow probes confirmed by a retry; "
        + ", ".join(f"{k} {v}" for k, v in sorted(tally.verdicts.items()))
        + ")"
    )
    print(summary)
    record_property("lab_summary", summary)
    assert tally.policies >= target.random_examples
    assert tally.probes > 0


# ---- incremental churn -----------------------------------------------------------------------


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
    run = estate.check(steps[-1], plan_probes(LAB_HOSTS, PLAN), timeout=TIMEOUT)
    return run, how


@pytest.mark.slow
def test_workload_churn_applied_as_deltas_agrees_with_the_evaluator(
    lab: tuple[Target, EstateLab], record_property: Callable[[str, object], None]
) -> None:
    target, estate = lab
    counts = {"examples": 0, "probes": 0}
    how_counts: dict[str, int] = {}
    last_failure: list[tuple[Any, str]] = []

    @settings(max_examples=target.churn_examples, **_SETTINGS)
    @given(steps=strategies.policy_steps())
    def check(steps: tuple[Policy, ...]) -> None:
        try:
            run, how = run_steps(estate, steps)
        except Exception as exc:
            last_failure[:] = [(steps, f"{target.id}: {type(exc).__name__}: {exc}")]
            raise
        counts["examples"] += 1
        counts["probes"] += len(run.checks)
        for h in how:
            kind = h.rsplit(":", 1)[1]
            how_counts[kind] = how_counts.get(kind, 0) + 1
        _agree(run, steps[-1], f"{target.id} after " + ", ".join(how) + ":\n", steps, last_failure)

    _shrunk(check, last_failure, save_steps)
    summary = (
        f"{target.id} incremental: {counts['examples']} policies with churn, {counts['probes']} probes, "
        f"0 disagreements, kernel == fresh render after every step (host updates: "
        + ", ".join(f"{k} {v}" for k, v in sorted(how_counts.items()))
        + ")"
    )
    print(summary)
    record_property("lab_summary", summary)
    assert counts["examples"] >= target.churn_examples
    assert how_counts.get("delta", 0) > 0, "no example exercised a set-only delta"


# ---- saved regressions -----------------------------------------------------------------------


def _regression_files() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.yaml"))


def _step_folders() -> list[Path]:
    return sorted(p for p in REGRESSIONS.glob("incremental-*") if p.is_dir())


@pytest.mark.parametrize("target", _TARGET_PARAMS)
@pytest.mark.parametrize("path", _regression_files(), ids=lambda p: p.name)
def test_saved_regressions_agree(path: Path, target: Target, record_property: Callable[[str, object], None]) -> None:
    """Each saved policy, in a lab of its own, with its services' ports probed too."""
    policy = load_policy(path)
    extra = service_ports(policy)
    plan = PortPlan(tuple(sorted({*PLAN.tcp, *extra.tcp})), tuple(sorted({*PLAN.udp, *extra.udp})), icmp_echo=True)
    unmanaged = [strategies.OFFICE] if not any(w.name == strategies.OFFICE[0] for w in policy.workloads) else []
    hosts = hosts_for_policy(policy, tcp_ports=plan.tcp, udp_ports=plan.udp, unmanaged=unmanaged)
    with target_lab(target, hosts) as estate:
        run = estate.run(policy, plan_probes(hosts, plan), timeout=TIMEOUT)
    record_property("lab_summary", f"{target.id} regression {path.name}: {run.summary()}")
    assert not run.disagreements, f"{target.id}: " + disagreement_report(policy, run)


@pytest.mark.parametrize("folder", _step_folders(), ids=lambda p: p.name)
def test_saved_incremental_regressions_agree(folder: Path, lab: tuple[Target, EstateLab]) -> None:
    target, estate = lab
    steps = [load_policy(p) for p in sorted(folder.glob("step*.yaml"), key=lambda p: int(p.stem[4:]))]
    run, how = run_steps(estate, steps)
    assert not run.disagreements, f"{target.id} after " + ", ".join(how) + ":\n" + disagreement_report(steps[-1], run)


# ---- the matrix has teeth: a broken backend is caught ----------------------------------------


class _MutantBackend:
    """The target's real backend, fed a deliberately corrupted host policy."""

    def __init__(self, inner: Any, mutate: Callable[[HostPolicy], HostPolicy]) -> None:
        self.inner = inner
        self.mutate = mutate

    def render(self, host_policy: HostPolicy) -> Any:
        return self.inner.render(self.mutate(host_policy))

    def apply(self, artifact: Any) -> None:
        self.inner.apply(artifact)

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        self.inner.apply_delta(deltas)

    def remove(self) -> None:
        self.inner.remove()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


def _drop_override_denies(hp: HostPolicy) -> HostPolicy:
    return replace(hp, rules=tuple(r for r in hp.rules if r.action is not Action.OVERRIDE_DENY))


def _visibility_as_full(hp: HostPolicy) -> HostPolicy:
    return replace(hp, mode=EnforcementMode.FULL) if hp.mode is EnforcementMode.VISIBILITY else hp


def _teeth_policy() -> Policy:
    w0, w1, w2 = (
        Workload(name, frozenset({Label("role", role)}), (Interface("eth0", strategies.slot_addresses(name)),), mode)
        for name, role, mode in (
            ("w0", "web", EnforcementMode.FULL),
            ("w1", "app", EnforcementMode.FULL),
            ("w2", "db", EnforcementMode.VISIBILITY),
        )
    )
    web, app = LabelSelector((Label("role", "web"),)), LabelSelector((Label("role", "app"),))
    return Policy(
        workloads=(w0, w1, w2),
        services=strategies.SERVICES,
        ip_lists=strategies.IP_LISTS,
        rulesets=(Ruleset("rs0", (), (AllowRule((ALL_WORKLOADS,), (ALL_WORKLOADS,), ("tcp-all",)),)),),
        deny_rules=(DenyRule("d0", (web,), (app,), ("http",), override=True),),
    )


@pytest.mark.parametrize("target", _TARGET_PARAMS)
@pytest.mark.parametrize(
    ("mutate", "culprit"),
    [(_drop_override_denies, "deny/d0"), (_visibility_as_full, "default")],
    ids=["override-deny-dropped", "visibility-enforced"],
)
def test_the_differential_catches_a_broken_backend(
    mutate: Callable[[HostPolicy], HostPolicy], culprit: str, target: Target
) -> None:
    policy = _teeth_policy()
    real = target.factory()
    with target_lab(target, factory=lambda ns: _MutantBackend(real(ns), mutate)) as estate:
        run = estate.run(policy, plan_probes(LAB_HOSTS, PLAN), timeout=TIMEOUT)
    assert run.disagreements, f"{target.id}: a corrupted ruleset went unnoticed"
    assert any(culprit in c.deciding_rule or c.evaluation.verdict.value == "potentially-blocked"
               for c in run.disagreements), disagreement_report(policy, run)
