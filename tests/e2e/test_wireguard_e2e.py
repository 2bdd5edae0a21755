"""``encrypt: true`` end to end: a real controller and real ``stockade agent`` processes.

The example estate plus one encrypted ruleset (app -> db on postgres). Each agent makes its
WireGuard key on its host and registers it; the controller hands each key only to the other
end; the agents bring up wireguard-go and steer the rule's traffic into it. Real connections
match the evaluator (with the registered keys), the encrypted flow really crosses the tunnel
(its counters move, the plain flows' do not), each agent with a tunnel reports its datapath
(``agent.wireguard-datapath``: wireguard-go on this kernel), and revoking a key through the API stops the
encrypted flow within about a second while the plain ones go on. Twice: agents on nftables (the
default backend) and on eBPF (``--backend ebpf``: tc programs redirect into the tunnel).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from stockade.agent import wireguard_key
from stockade.evaluator import Evaluator, Verdict
from stockade.lab import HostSpec, Lab, Probe, ProbeKind, probe_matrix
from stockade.lab.estate import evaluate_probe
from stockade.model.policy import Policy
from stockade.model.services import Proto
from stockade.model.workloads import WireGuardIdentity
from stockade.policyfile import load_documents, load_policy
from tests.e2e.harness import ESTATE, AgentProcess, Api, ControllerLink, ControllerProcess, bound, wait_for

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
]

HOSTS = ("web-prod-1", "app-prod-1", "db-prod-1")
TCP_PORTS = (443, 5432, 8080)
CONTROLLER = "https://10.70.0.1:8443"
VAULT = {"name": "vault", "scope": [{"labels": {"env": "prod"}}], "encrypt": True, "rules": [
    {"consumers": [{"labels": {"role": "app"}}], "providers": [{"labels": {"role": "db"}}], "services": ["postgres"]}]}


@dataclass
class World:
    lab: Lab
    api: Api
    controller: ControllerProcess
    agents: dict[str, AgentProcess]
    tmp: Path

    def keyed_policy(self) -> Policy:
        """The controller's policy with the registered keys (the evaluator only asks whether one exists)."""
        p = load_documents(self.api.active_policy_yaml(), "controller")
        keyed = {e["name"] for e in self.api.events(action="wireguard.key_register")}
        revoked = {e["name"] for e in self.api.events(action="wireguard.key_revoke")}
        fake = WireGuardIdentity("A" * 43 + "=")
        return replace(p, workloads=tuple(replace(w, wireguard=fake) if w.name in keyed - revoked else w
                                          for w in p.workloads))

    def transfer(self, name: str) -> int:
        """Bytes through this host's tunnel (received + sent, every peer)."""
        iface = wireguard_key.interface_name(self.tmp / "state" / name)
        out = subprocess.run(["wg", "show", iface, "transfer"], capture_output=True, text=True).stdout
        return sum(int(x) for line in out.splitlines() for x in line.split()[1:])


@pytest.fixture(scope="module", params=["nftables", "ebpf"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"wg-e2e-{backend}")
    estate = load_policy(ESTATE).workload_map()
    with Lab([HostSpec(n, estate[n].addresses, TCP_PORTS) for n in HOSTS]) as lab:
        link = ControllerLink(lab)
        controller = ControllerProcess(tmp / "controller", "10.70.0.1", 8443, tmp / "controller.log")
        w: World | None = None
        try:
            controller.start()
            api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                      controller.ca_cert)
            api.import_estate()
            api.ok("POST", "/rulesets", 201, json=VAULT)
            api.ok("POST", "/policy/provision", 201, json={"message": "e2e: encrypt app -> db"})
            w = World(lab, api, controller, {}, tmp)
            for name in HOSTS:
                code = api.adoption_code("lab", name)
                a = AgentProcess(name, lab.netns(name), tmp / "state" / name, CONTROLLER, code,
                                 tmp / f"agent-{name}.log", ca_cert=controller.ca_cert,
                                 extra=("--backend", backend))
                w.agents[name] = a
                a.start()

            def ready() -> bool:
                keyed = {e["name"] for e in api.events(action="wireguard.key_register")}
                return keyed >= set(HOSTS) and api.converged(list(HOSTS))

            took = wait_for(ready, 60.0, 0.1)
            logs = "\n".join(a.log_tail(1500) for a in w.agents.values())
            assert took is not None, f"agents did not register and converge\n{logs}\n{controller.log_tail()}"
            yield w
        finally:
            if w is not None:
                for a in w.agents.values():
                    a.stop()
            controller.kill()
            link.remove()


def _probe(w: World, src: str, dst: str, port: int, timeout: float = 0.5) -> bool:
    s, d = w.lab.hosts[src].addresses[0], w.lab.hosts[dst].addresses[0]
    (r,) = w.lab.probe([Probe(src, dst, ProbeKind.TCP, s, d, port)], timeout=timeout)
    return r.succeeded


def test_real_agents_encrypt_what_the_policy_says(world: World) -> None:
    ev = Evaluator(world.keyed_policy())
    probes = probe_matrix([(n, s.addresses) for n, s in world.lab.hosts.items()], tcp_ports=TCP_PORTS)
    results = world.lab.probe(probes, timeout=0.5)
    bad = [f"{r.probe}: real {r.outcome.value}, evaluator {evaluate_probe(ev, r.probe).verdict.value}"
           for r in results if r.succeeded != (evaluate_probe(ev, r.probe).verdict is not Verdict.BLOCKED)]
    assert bad == []
    app, db = world.lab.hosts["app-prod-1"].addresses[0], world.lab.hosts["db-prod-1"].addresses[0]
    e = ev.evaluate(app, db, Proto.TCP, 5432)
    assert e.encrypted and e.encrypted_by == "ruleset/vault/0"
    # the encrypted flow goes through the tunnel; a plain one (web -> app 8080) does not touch it
    before = world.transfer("db-prod-1")
    assert _probe(world, "app-prod-1", "db-prod-1", 5432)
    assert world.transfer("db-prod-1") > before
    before = world.transfer("app-prod-1")
    assert _probe(world, "web-prod-1", "app-prod-1", 8080)
    assert world.transfer("app-prod-1") == before
    # each agent with a tunnel reported its datapath (this kernel has no module: wireguard-go)
    def reported() -> dict[str, str]:
        return {e["name"]: str((e["after"] or {}).get("detail"))
                for e in world.api.events(action="agent.wireguard-datapath")}

    assert wait_for(lambda: {"app-prod-1", "db-prod-1"} <= set(reported()), 10.0, 0.1) is not None
    assert reported()["db-prod-1"] == "WireGuard datapath: wireguard-go"
    assert "web-prod-1" not in reported()  # no encrypted rule: no tunnel


def test_revoking_a_key_stops_the_encrypted_flow_within_1s(world: World) -> None:
    assert _probe(world, "app-prod-1", "db-prod-1", 5432)
    start = time.monotonic()
    world.api.ok("DELETE", "/workloads/app-prod-1/wireguard-key", 204)
    took = wait_for(lambda: not _probe(world, "app-prod-1", "db-prod-1", 5432, timeout=0.25), 5.0, 0.0)
    assert took is not None and time.monotonic() - start <= bound(1.5)
    assert _probe(world, "web-prod-1", "app-prod-1", 8080)  # the plain flow goes on
    # a restarted agent registers its key again: the encrypted flow comes back
    world.agents["app-prod-1"].stop()
    world.agents["app-prod-1"].start()
    assert wait_for(lambda: _probe(world, "app-prod-1", "db-prod-1", 5432, timeout=0.25), 20.0, 0.0) is not None
