"""End to end: a workload's firewall backend changed through the REST API, with no gap.

The user's path (docs/migration.md, "from the controller"): a real ``stockade agent --backend
nftables`` enforces ``db-prod-1`` of the example estate (full mode) in a lab namespace; ``app-prod-1``
is a plain namespace that keeps a continuous probe stream going against it
(``tests/kernel/switch_stream.py``): a persistent connection per family on the echo port the
policy allows, new connections to postgres (allowed) and to port 81 (blocked) every round. Then
the owner sets the workload's ``backend`` to ``iptables`` with ``PUT /workloads/db-prod-1``, and
(when the eBPF toolchain is here) to ``ebpf``. Each time the agent switches make-before-break:
the stream never sees an allowed connection fail or a blocked one pass, the API shows the new
backend in force, and the old backend's rules are gone afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from stockade.backends.common import in_netns
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.registry import get_backend
from stockade.lab import HostSpec, Lab
from stockade.lab import netns as labnetns
from stockade.policyfile import load_policy
from tests.e2e.harness import ESTATE, AgentProcess, Api, ControllerLink, ControllerProcess, bound, nft_table, wait_for
from tests.kernel.test_backend_switch import ECHO, ECHO_SERVER, STREAM
from tests.kernel.test_ebpf_backend import ebpf_skip_reason

pytestmark = pytest.mark.kernel

SERVER, CLIENT = "db-prod-1", "app-prod-1"
ALLOWED, BLOCKED = 5432, 81  # postgres from the app tier; nothing allows 81
CONTROLLER = "https://10.70.0.1:8443"
ECHO_RULES = f"""
apiVersion: stockade.io/v1
kind: Service
name: switch-echo
ports: [{ECHO}/tcp]
---
apiVersion: stockade.io/v1
kind: Ruleset
name: switch-echo
scope:
  - labels: {{app: shop, env: prod}}
rules:
  - consumers: [{{labels: {{role: app}}}}]
    providers: [{{labels: {{role: db}}}}]
    services: [switch-echo]
"""


class Stream:
    """The probe stream in the client namespace: started, ticking, and its final counts."""

    def __init__(self, lab: Lab, server: tuple[Any, ...]) -> None:
        argv = [sys.executable, "-I", str(STREAM), str(server[0]), str(server[1]), str(ECHO), str(ALLOWED),
                str(BLOCKED)]
        self.proc = subprocess.Popen(labnetns.ns_exec_argv(lab.netns(CLIENT), argv), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out: IO[str] = self.proc.stdout
        assert self.out.readline().strip() == "ready", self.proc.stderr.read() if self.proc.stderr else ""
        self.rounds(1)

    def rounds(self, n: int) -> None:
        for _ in range(n):
            assert self.out.readline().startswith("tick")

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        stats: dict[str, Any] = json.loads(self.out.read().strip().splitlines()[-1])
        return stats


def _backend_in_force(api: Api) -> str | None:
    agent = api.agents().get(SERVER)
    return agent["backend"] if agent is not None and agent["converged"] else None


def _switch_events(api: Api) -> list[dict[str, Any]]:
    return [e for e in api.events(kind="agent", action="agent.backend-switched") if e["name"] == SERVER]


def _set_backend(api: Api, backend: str | None) -> None:
    body = api.workload(SERVER)
    body["backend"] = backend
    api.put_workload(SERVER, body)


@pytest.fixture
def lab() -> Iterator[Lab]:
    estate = load_policy(ESTATE).workload_map()
    hosts = [HostSpec(SERVER, estate[SERVER].addresses, (ALLOWED, BLOCKED)), HostSpec(CLIENT, estate[CLIENT].addresses)]
    with Lab(hosts) as lab:
        try:
            yield lab
        finally:
            in_netns(lab.netns(SERVER), lambda: EbpfBackend().remove())  # pins outlive the namespace


def test_backend_set_through_the_api_switches_without_a_gap(lab: Lab, tmp_path: Path,
                                                            record_property: pytest.RecordProperty) -> None:
    ebpf_reason = ebpf_skip_reason()
    link = ControllerLink(lab)
    controller = ControllerProcess(tmp_path / "controller", "10.70.0.1", 8443, tmp_path / "controller.log")
    agent: AgentProcess | None = None
    echo = stream = None
    try:
        controller.start()
        api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                  controller.ca_cert)
        text = "\n---\n".join(p.read_text() for p in sorted(ESTATE.glob("*.yaml"))) + "\n---\n" + ECHO_RULES
        api.ok("PUT", "/policy/draft", content=text, headers={"Content-Type": "application/yaml"})
        api.ok("POST", "/policy/provision", 201, json={"message": "e2e: estate + echo rule"})
        agent = AgentProcess(SERVER, lab.netns(SERVER), tmp_path / "state", CONTROLLER,
                             api.adoption_code("switch", SERVER), tmp_path / "agent.log",
                             ca_cert=controller.ca_cert, extra=("--backend", "nftables", "--long-poll", "5"))
        agent.start()
        logs = lambda: f"{agent.log_tail(4000)}\n--- controller\n{controller.log_tail(2000)}"  # noqa: E731
        assert wait_for(lambda: _backend_in_force(api) == "nftables", bound(30.0), 0.1) is not None, logs()
        assert api.workload(SERVER)["backend"] is None  # the agent's own choice so far
        assert nft_table(lab, SERVER).strip()

        echo = subprocess.Popen(labnetns.ns_exec_argv(lab.netns(SERVER), [sys.executable, "-I", "-c", ECHO_SERVER]),
                                stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
        stream = Stream(lab, lab.hosts[SERVER].addresses)

        legs = [("nftables", "iptables")] + ([("iptables", "ebpf")] if ebpf_reason is None else [])
        for old, new in legs:
            _set_backend(api, new)
            assert wait_for(lambda new=new: _backend_in_force(api) == new, bound(20.0), 0.1) is not None, logs()
            stream.rounds(2)  # the stream kept going across the switch; two more full rounds on the new one
            gone = nft_table(lab, SERVER) if old == "nftables" else \
                in_netns(lab.netns(SERVER), lambda old=old: get_backend(old).read_back())
            assert gone.strip() == "", f"{old}'s rules are still there after switching to {new}:\n{gone}"
            now = in_netns(lab.netns(SERVER), lambda new=new: get_backend(new).read_back())
            assert now.strip(), f"{new}'s rules are not in force"
        stats = stream.finish()
        # each switch is audited (the agent's event), naming the workload
        assert wait_for(lambda: len(_switch_events(api)) == len(legs), bound(10.0), 0.1) is not None, \
            _switch_events(api)
    finally:
        for proc in (stream.proc if stream else None, echo):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if agent is not None:
            agent.stop()
        controller.kill()
        link.remove()
    assert stats["persistent_fail"] == [], stats
    assert stats["allowed_fail"] == [], stats
    assert stats["blocked_got_through"] == [], stats
    assert stats["blocked_refused"] >= 2 * stats["rounds"] - 2, stats
    if ebpf_reason is not None:
        record_property("skipped_leg", f"iptables -> ebpf: {ebpf_reason}")
    record_property("lab_summary", f"API backend switch {' -> '.join(['nftables'] + [n for _, n in legs])}: "
                                   f"{stats['rounds']} rounds, {stats['persistent_ok']} persistent echoes, "
                                   f"{stats['allowed_ok']} new allowed, {stats['blocked_refused']} blocked")
