"""End to end: agents enforcing with the eBPF backend report real traffic as flows, like NFLOG hosts.

The same world as ``test_visibility_e2e.py`` (a controller process with the example estate, three
of its workloads as namespace hosts, an unmanaged office desktop), except that every agent runs
``stockade agent --backend ebpf``: tc programs and maps, no nftables table at all. The datapath
writes one event per new connection to its ring buffer; the agent reads it (the backend is a
``FlowSource`` of ``EventFlows``) and uploads the same flow summaries an NFLOG host does. Every
real connection must show up in the flow API with the workloads, reporting side, verdict and
deciding rule the reference evaluator gives; switching ``db-prod-1`` to full mode turns its
would-be drops into real, reported blocks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from stockade.backends.common import in_netns
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.evaluator import Evaluator
from stockade.lab import HostSpec, Lab, ProbeKind
from stockade.policyfile import load_documents, load_policy
from tests.e2e.harness import ESTATE, AgentProcess, Api, ControllerLink, ControllerProcess, nft_table, wait_for
from tests.e2e.test_visibility_e2e import (
    AGENTS,
    CONTROLLER,
    OFFICE,
    PORTS,
    World,
    bound,
    flows_of,
    missing,
    probes,
    wanted,
)
from tests.kernel.test_ebpf_backend import SKIP

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def _remove_ebpf(lab: Lab, host: str) -> None:
    """Detach and unpin what the agent left in force (it keeps enforcing after it stops)."""
    in_netns(lab.netns(host), lambda: EbpfBackend().remove())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("ebpf-flows")
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
            code = api.activation_code("ebpf", mode="visibility")
            for name in AGENTS:
                agents[name] = AgentProcess(name, lab.netns(name), tmp / "state" / name, CONTROLLER, code,
                                            tmp / f"agent-{name}.log", ca_cert=controller.ca_cert,
                                            extra=("--backend", "ebpf"))
                agents[name].start()
            w = World(lab, api, controller, agents)
            assert wait_for(lambda: api.converged(list(AGENTS)), 90.0, 0.1) is not None, w.logs()
            yield w
        finally:
            for a in agents.values():
                a.stop()
            for name in agents:
                _remove_ebpf(lab, name)
            controller.kill()
            link.remove()


def test_ebpf_hosts_report_flows_with_workloads_and_verdicts(world: World) -> None:
    lab, api = world.lab, world.api
    for name in AGENTS:
        assert nft_table(lab, name) == "", f"{name} has an nftables table: not an eBPF-only host"
        assert "eBPF flow-event ring buffer" in world.agents[name].log_tail(200_000), world.logs()
    policy = load_documents(api.active_policy_yaml(), "controller")
    ps = (probes("web-prod-1", "app-prod-1", ProbeKind.TCP, 8080, lab)
          + probes("web-prod-1", "db-prod-1", ProbeKind.TCP, 5432, lab)
          + probes("office", "web-prod-1", ProbeKind.TCP, 443, lab)
          + probes("office", "db-prod-1", ProbeKind.TCP, 5432, lab)
          + probes("web-prod-1", "app-prod-1", ProbeKind.ICMP_ECHO, None, lab))
    wants = wanted(Evaluator(policy), ps)
    assert {w.verdict for w in wants} == {"allowed", "potentially-blocked"}
    assert {w.probe.src.version for w in wants} == {4, 6}
    since = time.time() - 1
    start = time.monotonic()
    results = lab.probe(ps, timeout=1.0)
    assert all(r.succeeded for r in results), [str(r.probe) for r in results if not r.succeeded]
    took = wait_for(lambda: not missing(api, wants, since), bound(10.0), 0.2)
    assert took is not None, f"not reported: {missing(api, wants, since)}\n{world.logs()}"
    print(f"\n{len(wants)} eBPF flow reports of {len(ps)} connections in the flow API "
          f"{time.monotonic() - start:.2f}s after the probes started (load {os.getloadavg()[0]:.1f})")
    web = flows_of(api, src_workload="web-prod-1", dst_workload="db-prod-1", port=5432, side="in")
    assert web and web[0]["verdict"] == "potentially-blocked" and web[0]["reporter"] == "db-prod-1"
    office = flows_of(api, src_ip="10.70.0.200", port=443)
    assert office and office[0]["src"]["ip_list"] == "office" and office[0]["dst"]["workload"] == "web-prod-1"
    v6 = flows_of(api, src_ip="fd70::11", dst_ip="fd70::21", port=8080)
    assert {f["side"] for f in v6} == {"in", "out"} and {f["verdict"] for f in v6} == {"allowed"}
    stats = {s["workload"]: s for s in api.ok("GET", "/flows/stats")}
    assert set(AGENTS) <= set(stats) and all(stats[a]["dropped"] == 0 for a in AGENTS)


def test_ebpf_full_mode_blocks_are_reported(world: World) -> None:
    lab, api = world.lab, world.api
    ps = probes("web-prod-1", "db-prod-1", ProbeKind.TCP, 5432, lab)
    api.ok("PUT", "/workloads/db-prod-1/mode", json={"mode": "full"})
    rev = api.ok("GET", "/workloads/db-prod-1/host-policy")["revision"]
    assert wait_for(lambda: api.agents()["db-prod-1"]["applied_revision"] >= rev, 30.0, 0.1) is not None
    policy = load_documents(api.active_policy_yaml(), "controller")
    wants = [w for w in wanted(Evaluator(policy), ps) if w.side == "in"]
    assert {w.verdict for w in wants} == {"blocked"}
    since = time.time() - 1
    results = lab.probe(ps, timeout=1.0)
    assert not any(r.succeeded for r in results)  # the eBPF datapath really drops them, v4 and v6
    took = wait_for(lambda: not missing(api, wants, since), bound(10.0), 0.2)
    assert took is not None, f"not reported: {missing(api, wants, since)}\n{world.logs()}"
    blocked = flows_of(api, dst_workload="db-prod-1", port=5432, verdict="blocked", since=since)
    assert {f["dst"]["ip"] for f in blocked} == {"10.70.0.31", "fd70::31"}
    assert all(f["rule_id"] == "default" and f["reporter"] == "db-prod-1" for f in blocked)
