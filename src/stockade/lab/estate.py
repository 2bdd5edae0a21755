"""A whole Policy in the kernel lab: enforce it for real, probe it, compare with the evaluator.

``EstateLab`` keeps one lab alive for a fixed set of hosts (the workloads' namespaces
plus any unmanaged hosts, e.g. an office client) and enforces policy after policy on
it: each workload's compiled HostPolicy is rendered and applied by the chosen backend
inside the workload's namespace; hosts that are not workloads of the policy get
nothing. ``check`` probes and pairs every real outcome with the reference
evaluator's verdict: ALLOWED and POTENTIALLY_BLOCKED must connect, BLOCKED must not.

A probe that failed where the evaluator expects success is tried once more with a
longer timeout before it counts as a disagreement, so a loaded machine cannot fake
one; a probe that got through can never be a timing artefact, so it is never retried.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from stockade.backends.base import Verifying
from stockade.backends.registry import get_backend
from stockade.compiler import HostDelta, HostPolicy, SetDelta, compile_policy
from stockade.evaluator import Evaluation, Evaluator, SideDecision, Verdict
from stockade.lab.lab import DEFAULT_TIMEOUT, HostSpec, Lab
from stockade.lab.netns import LabError
from stockade.lab.probes import Probe, ProbeResult, probe_matrix
from stockade.model.addresses import Family, IPAddress
from stockade.model.policy import Policy
from stockade.model.services import Proto
from stockade.model.workloads import EnforcementMode

CONFIRM_TIMEOUT = 1.5


@dataclass(frozen=True)
class Check:
    """One probe's real outcome next to the evaluator's verdict."""

    result: ProbeResult
    evaluation: Evaluation
    retried: bool = False

    @property
    def probe(self) -> Probe:
        return self.result.probe

    @property
    def expected_success(self) -> bool:
        return self.evaluation.verdict is not Verdict.BLOCKED

    @property
    def agrees(self) -> bool:
        return self.result.succeeded == self.expected_success

    @property
    def deciding_rule(self) -> str:
        """The rule that decided: the blocking side's when blocked, else both sides'."""
        sides = [("out", self.evaluation.outbound), ("in", self.evaluation.inbound)]
        present = [(tag, d) for tag, d in sides if d is not None]
        if not present:
            return "unmanaged"
        blocking = [(tag, d) for tag, d in present if d.action != "allow"]
        return " ".join(f"{tag}:{d.rule_id}" for tag, d in (blocking or present))

    def describe(self) -> str:
        outcome = self.result.outcome.value
        verdict = self.evaluation.verdict.value
        sides = "; ".join(
            f"{tag} {_side_text(d)}" for tag, d in (("out", self.evaluation.outbound), ("in", self.evaluation.inbound))
        )
        note = " (confirmed by a retry)" if self.retried else ""
        return f"{self.probe}: real {outcome}{note} ({self.result.detail}), evaluator {verdict} [{sides}]"


def _side_text(d: SideDecision | None) -> str:
    if d is None:
        return "unmanaged/idle"
    return f"{d.workload}({d.mode.value}) {d.action} by {d.rule_id}"


@dataclass(frozen=True)
class EstateRun:
    """Every check of one policy."""

    checks: tuple[Check, ...]

    @property
    def disagreements(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.agrees)

    @property
    def retried(self) -> int:
        return sum(1 for c in self.checks if c.retried)

    def summary(self) -> str:
        return f"{len(self.checks)} probes, {len(self.disagreements)} disagreements"


def hosts_for_policy(
    policy: Policy,
    *,
    tcp_ports: Iterable[int],
    udp_ports: Iterable[int],
    unmanaged: Sequence[tuple[str, Sequence[IPAddress]]] = (),
) -> tuple[HostSpec, ...]:
    """One lab host per workload (same name and addresses) plus the unmanaged hosts."""
    tcp = tuple(sorted(set(tcp_ports)))
    udp = tuple(sorted(set(udp_ports)))
    hosts = [HostSpec(w.name, w.addresses, tcp, udp) for w in policy.workloads]
    hosts += [HostSpec(name, tuple(addrs), tcp, udp) for name, addrs in unmanaged]
    return tuple(hosts)


class Enforcer(Protocol):
    """What the lab needs of a backend (``stockade.backends.base.Backend`` has it)."""

    def render(self, host_policy: HostPolicy) -> Any: ...

    def apply(self, artifact: Any) -> None: ...

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None: ...

    def remove(self) -> None: ...


BackendFactory = Callable[[str], Enforcer]  # namespace name -> backend bound to it


def registry_backend(name: str = "nftables", **options: Any) -> BackendFactory:
    """A factory making ``get_backend(name, netns=<namespace>, **options)`` per host."""

    def make(netns: str) -> Enforcer:
        backend: Enforcer = get_backend(name, netns=netns, **options)
        return backend

    return make


class EstateLab:
    """A long-lived lab on which policies are enforced one after another.

    ``backend`` makes one backend per host namespace; the default is the registry's
    nftables backend with Stockade's own table.
    """

    def __init__(self, hosts: Sequence[HostSpec], *, backend: BackendFactory | None = None) -> None:
        self.lab = Lab(hosts)
        self._factory = backend or registry_backend("nftables", table="stockade")
        self._backends: dict[str, Enforcer] = {}
        self._enforced: set[str] = set()

    def __enter__(self) -> EstateLab:
        self.lab.start()
        try:
            self._backends = {name: self._factory(self.lab.netns(name)) for name in self.lab.hosts}
        except BaseException:
            self.lab.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for backend in self._backends.values():
            close = getattr(backend, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        self.lab.close()

    @property
    def hosts(self) -> dict[str, HostSpec]:
        return self.lab.hosts

    def enforce(self, policy: Policy) -> None:
        """Make the lab enforce ``policy``: apply each workload's host policy, clear the rest.

        Conntrack is flushed everywhere afterwards, so no earlier flow survives as
        "established" into the new policy.
        """
        for w in policy.workloads:
            spec = self.lab.hosts.get(w.name)
            if spec is None:
                raise LabError(f"workload {w.name!r} has no lab host")
            missing = set(w.addresses) - set(spec.addresses)
            if missing:
                raise LabError(f"workload {w.name!r}: lab host lacks {sorted(map(str, missing))}")
        compiled = compile_policy(policy)
        for name, backend in self._backends.items():
            host_policy = compiled.get(name)
            if host_policy is None:
                if name in self._enforced:
                    backend.remove()
                    self._enforced.discard(name)
                continue
            backend.apply(backend.render(host_policy))
            self._enforced.add(name)
        self.lab.flush_conntrack()

    def apply_deltas(self, deltas: Iterable[HostDelta]) -> tuple[str, ...]:
        """Apply the compiler's incremental output as an agent would; returns how, per host.

        A host whose rules changed is reloaded; one whose rules did not gets only its
        set members changed (``apply_delta``); a vanished workload loses its ruleset;
        an idle host has nothing installed, so its set deltas are moot.
        """
        done: list[str] = []
        for d in deltas:
            backend = self._backends.get(d.workload)
            if backend is None:
                raise LabError(f"workload {d.workload!r} has no lab host")
            if d.policy is None:
                backend.remove()
                self._enforced.discard(d.workload)
                done.append(f"{d.workload}:remove")
            elif d.rules_changed:
                backend.apply(backend.render(d.policy))
                self._enforced.add(d.workload)
                done.append(f"{d.workload}:reload")
            elif d.policy.mode is EnforcementMode.IDLE or not d.set_deltas:
                done.append(f"{d.workload}:nothing")
            else:
                backend.apply_delta(d.set_deltas)
                done.append(f"{d.workload}:delta")
        self.lab.flush_conntrack()
        return tuple(done)

    def verify(self, policy: Policy) -> dict[str, tuple[str, ...]]:
        """Problems the backends find comparing the kernel with a fresh render, per host.

        Only for backends that are :class:`~stockade.backends.base.Verifying`; empty when all is as rendered.
        """
        compiled = compile_policy(policy)
        problems: dict[str, tuple[str, ...]] = {}
        for name, backend in self._backends.items():
            host_policy = compiled.get(name)
            if host_policy is None or not isinstance(backend, Verifying):
                continue
            found = tuple(backend.verify(backend.render(host_policy)).problems)
            if found:
                problems[name] = found
        return problems

    def clear(self) -> None:
        """Remove every ruleset the backends installed."""
        for name, backend in self._backends.items():
            backend.remove()
            self._enforced.discard(name)
        self.lab.flush_conntrack()

    def check(
        self,
        policy: Policy,
        probes: Sequence[Probe],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> EstateRun:
        """Probe (the policy must be enforced already) and pair each result with its verdict."""
        evaluator = Evaluator(policy)
        evaluations = [evaluate_probe(evaluator, p) for p in probes]
        results = list(self.lab.probe(probes, timeout=timeout))
        suspects = [
            i
            for i, (r, e) in enumerate(zip(results, evaluations, strict=True))
            if not r.succeeded and e.verdict is not Verdict.BLOCKED
        ]
        retried: set[int] = set()
        if suspects:
            again = self.lab.probe([probes[i] for i in suspects], timeout=confirm_timeout)
            for i, r in zip(suspects, again, strict=True):
                results[i] = r
                retried.add(i)
        return EstateRun(
            tuple(
                Check(r, e, i in retried) for i, (r, e) in enumerate(zip(results, evaluations, strict=True))
            )
        )

    def run(self, policy: Policy, probes: Sequence[Probe], *, timeout: float = DEFAULT_TIMEOUT) -> EstateRun:
        self.enforce(policy)
        return self.check(policy, probes, timeout=timeout)


def evaluate_probe(evaluator: Evaluator, probe: Probe) -> Evaluation:
    return evaluator.evaluate(probe.src, probe.dst, probe.proto, probe.evaluator_port)


# ---- probe plans -----------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PortPlan:
    """The ports a policy's probes use: TCP and UDP ports, and whether ICMP echo is probed."""

    tcp: tuple[int, ...]
    udp: tuple[int, ...]
    icmp_echo: bool = True


def service_ports(policy: Policy) -> PortPlan:
    """One representative port per service entry the policy's rules use (first of a range).

    Entries that match every port (``tcp`` alone, ``any``) add nothing: the other
    entries' ports exercise them.
    """
    used: set[str] = set()
    for rs in policy.rulesets:
        for rule in rs.rules:
            used.update(rule.services)
    for d in policy.deny_rules:
        used.update(d.services)
    tcp: set[int] = set()
    udp: set[int] = set()
    for svc in policy.services:
        if svc.name not in used:
            continue
        for e in svc.entries:
            if e.first is None:
                continue
            if e.proto is Proto.TCP:
                tcp.add(e.first)
            elif e.proto is Proto.UDP:
                udp.add(e.first)
    return PortPlan(tuple(sorted(tcp)), tuple(sorted(udp)))


def plan_probes(
    hosts: Sequence[HostSpec],
    plan: PortPlan,
    *,
    families: Iterable[Family] = (Family.V4, Family.V6),
) -> tuple[Probe, ...]:
    """Every ordered pair of hosts on every planned port, in every family both hosts have."""
    return probe_matrix(
        [(h.name, h.addresses) for h in hosts],
        tcp_ports=plan.tcp,
        udp_ports=plan.udp,
        icmp=plan.icmp_echo,
        families=families,
    )


def service_label(policy: Policy, probe: Probe) -> str:
    """The names of the policy's services that contain the probed port (catch-alls only if alone)."""
    port = probe.evaluator_port
    matching = [s for s in policy.services if s.matches(probe.proto, port)]
    specific = [s for s in matching if any(e.proto is not Proto.ANY for e in s.entries)]
    fs = policy.failsafe
    if not specific and any(e.matches(probe.proto, port) for e in fs.management):
        return "(management)"
    if not specific and fs.controller and probe.proto is Proto.TCP and port == fs.controller_port:
        return "(controller)"
    return ",".join(sorted(s.name for s in (specific or matching))) or "-"


__all__ = [
    "CONFIRM_TIMEOUT",
    "Check",
    "EstateLab",
    "EstateRun",
    "PortPlan",
    "evaluate_probe",
    "hosts_for_policy",
    "plan_probes",
    "service_label",
    "service_ports",
]
