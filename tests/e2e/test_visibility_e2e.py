"""End to end: real agents in visibility mode report real traffic; a host switched to full blocks it.

A controller process (HTTPS, its own CA) holds the example estate; three of its workloads get a
namespace host running ``stockade agent`` in visibility mode, plus an unmanaged office desktop.
Real TCP and ICMP connections are made between them, IPv4 and IPv6; every one must show up in
the flow API within 10 s (stretched by the machine's load, printed) with the right workloads,
labels, reporting side, verdict and deciding rule - the expectations come from the reference
evaluator over the controller's active policy, not from this file. Then ``db-prod-1`` is switched
to full mode: the connection that was "potentially blocked" now really fails, and the flow API
shows it as blocked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stockade.evaluator import Evaluator, SideDecision
from stockade.lab import HostSpec, Lab, Probe, ProbeKind
from stockade.lab.estate import evaluate_probe
from stockade.policyfile import load_documents, load_policy
from tests.e2e.harness import ESTATE, AgentProcess, Api, ControllerLink, ControllerProcess, wait_for

pytestmark = pytest.mark.kernel

AGENTS = ("web-prod-1", "app-prod-1", "db-prod-1")
A = ipaddress.ip_address
OFFICE = ("office", (A("10.70.0.200"), A("fd70::c8")))
PORTS = (443, 5432, 8080)
CONTROLLER = "https://10.70.0.1:8443"
ACTION_VERDICT = {"allow": "allowed", "would-block": "potentially-blocked", "block": "blocked"}


def bound(seconds: float) -> float:
    """An acceptance bound stretched by how oversubscribed the shared machine is right now."""
    return seconds * max(2.0, os.getloadavg()[0] / (os.cpu_count() or 1))  # see tests/e2e/harness.bound


@dataclass
class World:
    lab: Lab
    api: Api
    controller: ControllerProcess
    agents: dict[str, AgentProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{a.log_tail(2000)}" for n, a in self.agents.items()) + \
            f"\n--- controller\n{self.controller.log_tail(3000)}"


@contextlib.contextmanager
def running_world(tmp: Path, agent_args: tuple[str, ...] = (),
                  after_stop: Callable[[Lab, str], None] | None = None) -> Iterator[World]:
    """The controller and the agents (``stockade agent ... *agent_args``), converged in visibility mode.

    ``after_stop(lab, host)`` runs for each agent host once the agents have stopped (rules they
    leave in force that outlive a namespace, such as eBPF pins, are removed there).
    """
    estate = load_policy(ESTATE).workload_map()
    hosts = [HostSpec(n, estate[n].addresses, PORTS) for n in AGENTS] + [HostSpec(*OFFICE, PORTS)]
    with Lab(hosts) as lab:
        link = ControllerLink(lab)
        controller = ControllerProcess(tmp / "controller", "10.70.0.1", 8443, tmp / "controller.log")
        agents: dict[str, AgentProcess] = {}
        try:
            controller.start()
            api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                      controller.ca_cert)
            api.import_estate()
            for name in AGENTS:
                api.ok("PUT", f"/workloads/{name}/mode", json={"mode": "visibility"})
            for name in AGENTS:  # the estate declares these workloads: adopted, keeping their labels
                code = api.adoption_code("vis", name)
                agents[name] = AgentProcess(name, lab.netns(name), tmp / "state" / name, CONTROLLER, code,
                                            tmp / f"agent-{name}.log", ca_cert=controller.ca_cert, extra=agent_args)
                agents[name].start()
            w = World(lab, api, controller, agents)
            assert wait_for(lambda: api.converged(list(AGENTS)), 60.0, 0.1) is not None, w.logs()
            yield w
        finally:
            for a in agents.values():
                a.stop()
            if after_stop is not None:
                for name in agents:
                    after_stop(lab, name)
            controller.kill()
            link.remove()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("visibility")) as w:
        yield w


def probes(src: str, dst: str, kind: ProbeKind, port: int | None, lab: Lab) -> list[Probe]:
    s, d = lab.hosts[src].addresses, lab.hosts[dst].addresses
    return [Probe(src, dst, kind, a, b, port) for a in s for b in d if a.version == b.version]


@dataclass(frozen=True)
class Want:
    """One report the flow API must show: who reported it, the verdict and the deciding rule."""

    probe: Probe
    side: str
    reporter: str
    verdict: str
    rule: str


def wanted(evaluator: Evaluator, ps: Sequence[Probe]) -> list[Want]:
    out = []
    for p in ps:
        ev = evaluate_probe(evaluator, p)
        for side, d in (("out", ev.outbound), ("in", ev.inbound)):
            if isinstance(d, SideDecision):
                out.append(Want(p, side, d.workload, ACTION_VERDICT[d.action], d.rule_id))
    return out


def flows_of(api: Api, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.ok("GET", "/flows", params={"limit": 1000, **params})["items"]
    return items


def matches(f: dict[str, Any], w: Want) -> bool:
    p = w.probe
    port = p.evaluator_port
    return (f["src"]["ip"] == str(p.src) and f["dst"]["ip"] == str(p.dst) and f["proto"] == p.proto.value
            and f["port"] == port and f["side"] == w.side and f["reporter"] == w.reporter
            and f["verdict"] == w.verdict and f["rule_id"] == w.rule)


def missing(api: Api, wants: Sequence[Want], since: float) -> list[Want]:
    got = flows_of(api, since=since)
    return [w for w in wants if not any(matches(f, w) for f in got)]


def test_visibility_traffic_appears_with_workloads_labels_and_verdicts(world: World) -> None:
    lab, api = world.lab, world.api
    policy = load_documents(api.active_policy_yaml(), "controller")
    ps = (probes("web-prod-1", "app-prod-1", ProbeKind.TCP, 8080, lab)
          + probes("web-prod-1", "db-prod-1", ProbeKind.TCP, 5432, lab)
          + probes("office", "web-prod-1", ProbeKind.TCP, 443, lab)
          + probes("office", "db-prod-1", ProbeKind.TCP, 5432, lab)
          + probes("web-prod-1", "app-prod-1", ProbeKind.ICMP_ECHO, None, lab))
    wants = wanted(Evaluator(policy), ps)
    assert {w.verdict for w in wants} == {"allowed", "potentially-blocked"}  # both kinds are exercised
    assert {w.probe.src.version for w in wants} == {4, 6}
    since = time.time() - 1
    start = time.monotonic()
    results = lab.probe(ps, timeout=1.0)
    assert all(r.succeeded for r in results), [str(r.probe) for r in results if not r.succeeded]  # nothing dropped
    took = wait_for(lambda: not missing(api, wants, since), bound(10.0), 0.2)
    assert took is not None, f"not reported: {missing(api, wants, since)}\n{world.logs()}"
    print(f"\n{len(wants)} reports of {len(ps)} connections in the flow API {time.monotonic() - start:.2f}s after "
          f"the probes started (load {os.getloadavg()[0]:.1f})")
    # workloads and labels as the controller resolved them
    web = flows_of(api, src_workload="web-prod-1", dst_workload="db-prod-1", port=5432, side="in")
    assert web and web[0]["src"]["labels"] == {"app": "shop", "env": "prod", "loc": "lab", "role": "web"}
    assert web[0]["dst"]["labels"]["role"] == "db" and web[0]["verdict"] == "potentially-blocked"
    office = flows_of(api, src_ip="10.70.0.200", port=443)
    assert office and office[0]["src"]["ip_list"] == "office" and office[0]["dst"]["workload"] == "web-prod-1"
    v6 = flows_of(api, src_ip="fd70::11", dst_ip="fd70::21", port=8080)
    assert {f["side"] for f in v6} == {"in", "out"} and {f["verdict"] for f in v6} == {"allowed"}
    stats = {s["workload"]: s for s in api.ok("GET", "/flows/stats")}
    assert set(AGENTS) <= set(stats) and all(stats[a]["dropped"] == 0 for a in AGENTS)
    m = api.ok("GET", "/flows/map")
    edges = {(e["src"], e["dst"]): e for e in m["edges"]}
    prod = edges[("group:app=shop,env=prod", "group:app=shop,env=prod")]
    assert prod["allowed"] >= 1 and prod["potentially_blocked"] >= 2  # links: endpoint pair + service


def test_switching_to_full_turns_potentially_blocked_into_blocked(world: World) -> None:
    lab, api = world.lab, world.api
    ps = probes("web-prod-1", "db-prod-1", ProbeKind.TCP, 5432, lab)
    api.ok("PUT", "/workloads/db-prod-1/mode", json={"mode": "full"})
    rev = api.ok("GET", "/workloads/db-prod-1/host-policy")["revision"]
    assert wait_for(lambda: api.agents()["db-prod-1"]["applied_revision"] >= rev, 30.0, 0.1) is not None
    policy = load_documents(api.active_policy_yaml(), "controller")
    wants = [w for w in wanted(Evaluator(policy), ps) if w.side == "in"]
    assert {w.verdict for w in wants} == {"blocked"}
    since = time.time() - 1
    start = time.monotonic()
    results = lab.probe(ps, timeout=1.0)
    assert not any(r.succeeded for r in results)  # the real connections fail now, v4 and v6
    took = wait_for(lambda: not missing(api, wants, since), bound(10.0), 0.2)
    assert took is not None, f"not reported: {missing(api, wants, since)}\n{world.logs()}"
    print(f"\nblocked connections in the flow API {time.monotonic() - start:.2f}s after the probes started")
    blocked = flows_of(api, dst_workload="db-prod-1", port=5432, verdict="blocked", since=since)
    assert {f["dst"]["ip"] for f in blocked} == {"10.70.0.31", "fd70::31"}
    assert all(f["rule_id"] == "default" and f["reporter"] == "db-prod-1" for f in blocked)
