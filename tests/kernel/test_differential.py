"""Differential test: random policies enforced by nftables in real namespaces vs the evaluator.

Hypothesis generates estates and policies (``tests.strategies``); each one is compiled,
rendered and applied by the nftables backend inside the namespaces of ONE long-lived lab
(re-applied per example, conntrack flushed), then every ordered pair of hosts (workloads,
slots left empty as unmanaged hosts, an office client) is probed on a fixed port
vocabulary (TCP 80, 443, 8080; UDP 53; ICMP echo) over IPv4 and IPv6.
Every real outcome must equal the reference evaluator's verdict: ALLOWED and
POTENTIALLY_BLOCKED connect, BLOCKED does not.

A disagreement is shrunk by hypothesis to a minimal policy, written as YAML into
``tests/kernel/regressions/`` (with the disagreeing probes in a comment), and
``test_saved_regressions_agree`` replays every saved file from then on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.render import NftablesArtifact
from stockade.compiler import HostPolicy, SetDelta
from stockade.lab.estate import EstateLab, EstateRun, PortPlan, hosts_for_policy, plan_probes, service_ports
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

REGRESSIONS = Path(__file__).parent / "regressions"
EXAMPLES = int(os.environ.get("STOCKADE_DIFFERENTIAL_EXAMPLES", "200"))
TIMEOUT = 0.3

PLAN = strategies.PROBE_PLAN
LAB_HOSTS = strategies.LAB_HOSTS


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


def save_regression(policy: Policy, report: str) -> Path:
    """Write ``policy`` (pruned) as policy YAML, the disagreement report as a leading comment."""
    policy = prune_unused(policy)
    text = dump_policy(policy)
    if load_documents(text, "regression.yaml") != policy:
        raise AssertionError("dump_policy does not round-trip this policy; cannot save it")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = REGRESSIONS / f"differential-{digest}.yaml"
    comment = "".join(f"# {line}\n" for line in report.splitlines())
    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    path.write_text("# Shrunk by tests/kernel/test_differential.py; replayed by test_saved_regressions_agree.\n"
                    + comment + text)
    return path


@pytest.mark.kernel
@pytest.mark.slow
def test_random_policies_agree_with_the_evaluator(
    slot_lab: EstateLab, record_property: Callable[[str, object], None]
) -> None:
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
        # every lab host: slots that are not workloads this time are unmanaged hosts
        probes = plan_probes(LAB_HOSTS, PLAN)
        try:
            run = slot_lab.run(policy, probes, timeout=TIMEOUT)
        except Exception as exc:  # a crash in compile/render/apply is a finding too
            last_failure[:] = [(policy, f"enforcing the policy raised {type(exc).__name__}: {exc}")]
            raise
        tally.add(run)
        if run.disagreements:
            report = disagreement_report(policy, run)
            last_failure[:] = [(policy, report)]  # hypothesis replays the shrunk example last
            raise AssertionError(report)

    try:
        check()
    except Exception:
        if last_failure:
            path = save_regression(*last_failure[-1])
            print(f"shrunk failing policy saved to {path}")
        raise
    summary = (
        f"differential: {tally.policies} policies, {tally.probes} probes, 0 disagreements "
        f"({tally.retried} slow probes confirmed by a retry; "
        + ", ".join(f"{k} {v}" for k, v in sorted(tally.verdicts.items()))
        + ")"
    )
    print(summary)
    record_property("lab_summary", summary)
    assert tally.policies >= EXAMPLES
    assert tally.probes > 0


def _regression_files() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.yaml"))


@pytest.mark.kernel
@pytest.mark.parametrize("path", _regression_files(), ids=lambda p: p.name)
def test_saved_regressions_agree(path: Path, record_property: Callable[[str, object], None]) -> None:
    """Each saved policy, in a lab of its own, with its services' ports probed too."""
    policy = load_policy(path)
    extra = service_ports(policy)
    plan = PortPlan(
        tuple(sorted({*PLAN.tcp, *extra.tcp})), tuple(sorted({*PLAN.udp, *extra.udp})), icmp_echo=True
    )
    unmanaged = [strategies.OFFICE] if not any(w.name == strategies.OFFICE[0] for w in policy.workloads) else []
    hosts = hosts_for_policy(policy, tcp_ports=plan.tcp, udp_ports=plan.udp, unmanaged=unmanaged)
    with EstateLab(hosts) as estate:
        run = estate.run(policy, plan_probes(hosts, plan), timeout=TIMEOUT)
    record_property("lab_summary", f"regression {path.name}: {run.summary()}")
    assert not run.disagreements, disagreement_report(policy, run)


# ---- the differential has teeth: a broken backend is caught ---------------------------


class _MutantBackend:
    """The real nftables backend, fed a deliberately corrupted host policy."""

    def __init__(self, netns: str, mutate: Callable[[HostPolicy], HostPolicy]) -> None:
        self.inner = NftablesBackend(table="stockade", netns=netns)
        self.mutate = mutate

    def render(self, host_policy: HostPolicy) -> NftablesArtifact:
        return self.inner.render(self.mutate(host_policy))

    def apply(self, artifact: NftablesArtifact) -> None:
        self.inner.apply(artifact)

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        self.inner.apply_delta(deltas)

    def remove(self) -> None:
        self.inner.remove()


def _drop_override_denies(hp: HostPolicy) -> HostPolicy:
    return replace(hp, rules=tuple(r for r in hp.rules if r.action is not Action.OVERRIDE_DENY))


def _visibility_as_full(hp: HostPolicy) -> HostPolicy:
    return replace(hp, mode=EnforcementMode.FULL) if hp.mode is EnforcementMode.VISIBILITY else hp


def _teeth_policy() -> Policy:
    base = strategies.SERVICES
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
        services=base,
        ip_lists=strategies.IP_LISTS,
        rulesets=(Ruleset("rs0", (), (AllowRule((ALL_WORKLOADS,), (ALL_WORKLOADS,), ("tcp-all",)),)),),
        deny_rules=(DenyRule("d0", (web,), (app,), ("http",), override=True),),
    )


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("mutate", "culprit"),
    [(_drop_override_denies, "deny/d0"), (_visibility_as_full, "default")],
    ids=["override-deny-dropped", "visibility-enforced"],
)
def test_the_differential_catches_a_broken_backend(
    mutate: Callable[[HostPolicy], HostPolicy], culprit: str
) -> None:
    policy = _teeth_policy()
    with EstateLab(strategies.LAB_HOSTS, backend=lambda ns: _MutantBackend(ns, mutate)) as estate:
        run = estate.run(policy, plan_probes(strategies.LAB_HOSTS, PLAN), timeout=TIMEOUT)
    assert run.disagreements, "a corrupted ruleset went unnoticed"
    assert any(culprit in c.deciding_rule or c.evaluation.verdict.value == "potentially-blocked"
               for c in run.disagreements), disagreement_report(policy, run)
