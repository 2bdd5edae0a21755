"""The whole system: a controller and real agents in lab namespaces, driven through the API.

One world per module (building it takes ~15 s): the example estate is imported and
provisioned through the API, five of its workloads get a namespace host running
``stockade agent`` (enrolled with an activation code, reaching the controller through the
failsafe), plus an unmanaged office desktop and a spare host for the copied-credentials case.
The tests run in file order and each leaves the world as it found it (except the last).

Real connections are compared with the reference evaluator over the controller's own view
of the policy (``GET /policy/draft?version=active``, inventory included).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from stockade.evaluator import Evaluator, Verdict
from stockade.lab import HostSpec, Lab, Probe, ProbeKind, probe_matrix
from stockade.lab.estate import evaluate_probe
from stockade.lab.probes import ProbeResult
from stockade.model.addresses import IPAddress
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.policyfile import load_documents, load_policy
from tests.e2e.harness import (
    ESTATE,
    AgentProcess,
    Api,
    ControllerLink,
    ControllerProcess,
    bound,
    load_note,
    nft_table,
    wait_for,
)

pytestmark = pytest.mark.kernel

AGENT_HOSTS = ("web-prod-1", "app-prod-1", "db-prod-1", "web-dev-1", "mon-1")
OFFICE = ("office", (ipaddress.ip_address("10.70.0.200"), ipaddress.ip_address("fd70::c8")))
SPARE = ("dev-new", (ipaddress.ip_address("10.70.0.140"), ipaddress.ip_address("fd70::140")))
TCP_PORTS = (22, 443, 445, 5432, 8080, 9100)
CONTROLLER = "https://10.70.0.1:8443"  # the controller's own CA, pinned by every agent
A = ipaddress.ip_address


@dataclass
class World:
    lab: Lab
    api: Api
    controller: ControllerProcess
    agents: dict[str, AgentProcess]
    tmp: Path

    def agent(self, name: str, code: str | None = None) -> AgentProcess:
        """An agent for ``name``; without ``code``, an adoption code for the declared workload ``name``."""
        code = code or self.api.adoption_code("lab", name)
        a = AgentProcess(name, self.lab.netns(name), self.tmp / "state" / name, CONTROLLER,
                         code, self.tmp / f"agent-{name}.log", ca_cert=self.controller.ca_cert)
        self.agents[name] = a
        return a

    def policy(self) -> Policy:
        return load_documents(self.api.active_policy_yaml(), "controller")

    def logs(self) -> str:
        """Every agent's log tail, and the controller's with a dump of its threads' stacks."""
        agents = "\n".join(f"--- {n}\n{a.log_tail(1500)}" for n, a in self.agents.items())
        return f"{agents}\n--- controller\n{self.controller.dump_stacks()}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e")
    estate = load_policy(ESTATE).workload_map()
    hosts = [HostSpec(n, estate[n].addresses, TCP_PORTS) for n in AGENT_HOSTS]
    hosts += [HostSpec(name, addrs, TCP_PORTS) for name, addrs in (OFFICE, SPARE)]
    with Lab(hosts) as lab:
        link = ControllerLink(lab)
        controller = ControllerProcess(tmp / "controller", "10.70.0.1", 8443, tmp / "controller.log")
        w: World | None = None
        try:
            controller.start()
            assert controller.url == CONTROLLER
            api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                      controller.ca_cert)
            api.import_estate()
            role = api.ok("GET", "/label-keys/role")["body"]
            api.ok("PUT", "/label-keys/role", json={**role, "values": [*role["values"], "batch"]})
            w = World(lab, api, controller, {}, tmp)
            for name in AGENT_HOSTS:
                w.agent(name).start()
            took = wait_for(lambda: api.converged(list(AGENT_HOSTS)), 60.0, 0.1)
            assert took is not None, f"agents did not converge\n{w.logs()}\n{controller.log_tail()}"
            print(f"\n5 agents enrolled and converged in {took:.2f}s")
            yield w
        finally:
            if w is not None:
                for a in w.agents.values():
                    a.stop()
            controller.kill()
            link.remove()


# ---- probing ----------------------------------------------------------------------------------------


def _pairs(lab: Lab, names: Sequence[str] | None = None) -> list[tuple[str, tuple[IPAddress, ...]]]:
    return [(n, s.addresses) for n, s in lab.hosts.items() if names is None or n in names]


def expected_ok(evaluator: Evaluator, probe: Probe) -> bool:
    return evaluate_probe(evaluator, probe).verdict is not Verdict.BLOCKED


def probe(w: World, probes: Sequence[Probe], timeout: float = 0.5) -> tuple[ProbeResult, ...]:
    # No conntrack flush: every probe is a new flow (fresh socket), and a flush would also cut
    # the agents' own connections to the controller (see KEEPALIVE in stockade.agent.http_client).
    return w.lab.probe(probes, timeout=timeout)


def disagreements(w: World, probes: Sequence[Probe], policy: Policy | None = None) -> list[str]:
    """Probes whose real outcome differs from the evaluator's, confirmed by one slower retry.

    ``policy`` defaults to the controller's current view (it must be up then)."""
    evaluator = Evaluator(policy if policy is not None else w.policy())
    results = probe(w, probes)
    bad = [r for r in results if r.succeeded != expected_ok(evaluator, r.probe)]
    if bad:
        again = probe(w, [r.probe for r in bad], timeout=1.5)
        bad = [r for r in again if r.succeeded != expected_ok(evaluator, r.probe)]
    return [f"{r.probe}: real {r.outcome.value}, evaluator {evaluate_probe(evaluator, r.probe).verdict.value}"
            for r in bad]


def full_matrix(w: World) -> tuple[Probe, ...]:
    return probe_matrix(_pairs(w.lab), tcp_ports=TCP_PORTS)


def time_until_flipped(w: World, flips: Sequence[Probe], want_ok: dict[Probe, bool], start: float,
                       limit: float = 10.0) -> float | None:
    """Seconds from ``start`` to the beginning of the first probe round where every flip shows."""
    while time.monotonic() - start < limit:
        round_start = time.monotonic()
        results = probe(w, flips, timeout=0.25)
        if all(r.succeeded == want_ok[r.probe] for r in results):
            return round_start - start
    return None


# ---- the tests -----------------------------------------------------------------------------------------


def test_provisioned_policy_matches_the_evaluator(world: World) -> None:
    probes = full_matrix(world)
    assert len(probes) > 400
    bad = disagreements(world, probes)
    assert bad == [], "\n".join(bad)
    allowed = sum(1 for r in probe(world, probes) if r.succeeded)
    assert 0 < allowed < len(probes), "a policy that allows all or nothing proves nothing"


def _relabel(w: World, name: str, **labels: str) -> None:
    body = w.api.workload(name)
    w.api.put_workload(name, {**body, "labels": {**body["labels"], **labels}})


def _flips(w: World, before: Policy, after: Policy) -> tuple[list[Probe], dict[Probe, bool]]:
    e0, e1 = Evaluator(before), Evaluator(after)
    flips = [p for p in full_matrix(w) if expected_ok(e0, p) != expected_ok(e1, p)]
    return flips, {p: expected_ok(e1, p) for p in flips}


def test_relabel_changes_real_connections_within_1s(world: World) -> None:
    before = world.policy()
    web = before.workload_map()["web-prod-1"]
    after = before.with_workload(
        replace(web, labels=frozenset(lab for lab in web.labels if lab.key != "role") | {Label("role", "batch")})
    )
    flips, want = _flips(world, before, after)
    assert flips, "relabelling web-prod-1 must change some connections"
    affected = sorted({p.src_host for p in flips} | {p.dst_host for p in flips})
    start = time.monotonic()
    _relabel(world, "web-prod-1", role="batch")
    acked = wait_for(lambda: world.api.converged(list(AGENT_HOSTS)), 10.0, 0.01)
    flipped = time_until_flipped(world, flips, want, start)
    print(f"\nrelabel web-prod-1 role=web->batch: {len(flips)} connections flip on {affected}; "
          f"all agents acked after {acked}s, real connections flipped after {flipped}s ({load_note()})")
    assert acked is not None, world.logs()
    assert flipped is not None and flipped <= bound(1.0), world.logs()
    assert disagreements(world, full_matrix(world)) == []
    _relabel(world, "web-prod-1", role="web")
    assert wait_for(lambda: world.api.converged(list(AGENT_HOSTS)), 10.0, 0.05) is not None
    assert time_until_flipped(world, flips, {p: not v for p, v in want.items()}, time.monotonic()) is not None


def _elements_stripped(listing: str) -> str:
    text = re.sub(r"elements = \{[^}]*\}", "elements = {...}", listing)
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def test_changed_ip_address_is_reported_and_peers_sets_follow(world: World) -> None:
    lab, host = world.lab, "app-prod-1"
    db_rules_before = _elements_stripped(nft_table(lab, "db-prod-1"))
    lab.run_in(host, ["ip", "addr", "add", "10.70.0.22/32", "dev", "eth0"])
    lab.run_in(host, ["ip", "addr", "del", "10.70.0.21/32", "dev", "eth0"])
    start = time.monotonic()
    try:
        def db_follows() -> bool:
            t = nft_table(lab, "db-prod-1")
            return "10.70.0.22" in t and "10.70.0.21" not in t

        # correctness, not speed (bench/convergence.py measures that): a request the agent had in flight on
        # a connection from the removed address can hold its report up to the request timeout (10 s)
        took = wait_for(db_follows, 30.0)
        assert took is not None, world.logs()
        print(f"\napp-prod-1 re-addressed: db-prod-1's sets followed after {time.monotonic() - start:.2f}s")
        assert world.api.workload(host)["interfaces"][0]["addresses"] == ["10.70.0.22", "fd70::21"]
        assert _elements_stripped(nft_table(lab, "db-prod-1")) == db_rules_before, "only set members changed"
        new_app = A("10.70.0.22")
        probes = [
            Probe("web-prod-1", host, ProbeKind.TCP, A("10.70.0.11"), new_app, 8080),
            Probe(host, "db-prod-1", ProbeKind.TCP, new_app, A("10.70.0.31"), 5432),
            Probe("web-dev-1", host, ProbeKind.TCP, A("10.70.0.111"), new_app, 8080),
            Probe("office", host, ProbeKind.TCP, A("10.70.0.200"), new_app, 8080),
        ]
        assert wait_for(lambda: world.api.converged(list(AGENT_HOSTS)), 30.0) is not None
        assert disagreements(world, probes) == []
        results = probe(world, probes)
        assert [r.succeeded for r in results] == [True, True, False, False]
    finally:
        lab.run_in(host, ["ip", "addr", "add", "10.70.0.21/32", "dev", "eth0"], check=False)
        lab.run_in(host, ["ip", "addr", "del", "10.70.0.22/32", "dev", "eth0"], check=False)
    assert wait_for(lambda: "10.70.0.21" in nft_table(lab, "db-prod-1"), 30.0) is not None
    assert wait_for(lambda: world.api.converged(list(AGENT_HOSTS)), 30.0) is not None


def test_copied_credentials_on_a_dev_host_cannot_reach_the_prod_database(world: World) -> None:
    """A new host paired with the dev profile uses the prod database's real address (and would
    use its real password): the network refuses, and prod's rules do not change."""
    lab = world.lab
    prod = ("web-prod-1", "app-prod-1", "db-prod-1")
    rules_before = {h: _elements_stripped(nft_table(lab, h)) for h in prod}
    prod_probes = probe_matrix(_pairs(lab, prod), tcp_ports=TCP_PORTS)
    prod_before = [r.succeeded for r in probe(world, prod_probes)]
    code = world.api.activation_code("dev-shop", {"app": "shop", "env": "dev", "role": "app"}, mode="full")
    world.agent("dev-new", code).start()
    assert wait_for(lambda: world.api.converged([*AGENT_HOSTS, "dev-new"]), 30.0, 0.1) is not None, world.logs()
    assert world.api.workload("dev-new")["labels"] == {"app": "shop", "env": "dev", "role": "app"}
    to_db = [Probe("dev-new", "db-prod-1", ProbeKind.TCP, A("10.70.0.140"), A("10.70.0.31"), 5432),
             Probe("dev-new", "db-prod-1", ProbeKind.TCP, A("fd70::140"), A("fd70::31"), 5432)]
    assert [r.succeeded for r in probe(world, to_db, timeout=1.0)] == [False, False]
    assert disagreements(world, [*to_db, *full_matrix(world)]) == []
    assert [r.succeeded for r in probe(world, prod_probes)] == prod_before
    assert {h: _elements_stripped(nft_table(lab, h)) for h in prod} == rules_before


def test_tamper_is_restored_within_2s_and_reported_to_the_controller(world: World) -> None:
    lab, host = world.lab, "web-dev-1"
    before = _elements_stripped(nft_table(lab, host))
    lab.run_in(host, ["nft", "flush", "table", "inet", "stockade"])
    took = wait_for(lambda: _elements_stripped(nft_table(lab, host)) == before, 5.0)
    print(f"\nflushed table on {host} restored after {took}s ({load_note()})")
    assert took is not None and took <= bound(2.0), world.logs()

    def reported() -> bool:
        return any(e["name"] == host for e in world.api.events(kind="agent", action="agent.tamper"))

    assert wait_for(reported, 5.0, 0.1) is not None, world.logs()
    event = next(e for e in world.api.events(kind="agent", action="agent.tamper") if e["name"] == host)
    assert "restored" in event["after"]["detail"]


def test_mode_switch_to_idle_removes_the_table_and_back(world: World) -> None:
    lab, host = world.lab, "web-dev-1"
    world.api.ok("PUT", f"/workloads/{host}/mode", json={"mode": "idle"})
    assert wait_for(lambda: nft_table(lab, host) == "", 5.0) is not None, world.logs()
    assert wait_for(lambda: world.api.converged(list(AGENT_HOSTS)), 10.0) is not None
    assert disagreements(world, probe_matrix(_pairs(lab, (host, "office", "app-prod-1")), tcp_ports=TCP_PORTS)) == []
    world.api.ok("PUT", f"/workloads/{host}/mode", json={"mode": "selective"})
    assert wait_for(lambda: "chain inbound" in nft_table(lab, host), 5.0) is not None, world.logs()
    assert wait_for(lambda: world.api.converged(list(AGENT_HOSTS)), 10.0) is not None


def test_controller_down_enforcement_continues_cache_restart_then_reconverge(world: World) -> None:
    lab = world.lab
    matrix = full_matrix(world)
    policy = world.policy()
    world.controller.kill()
    assert disagreements(world, matrix, policy) == [], "enforcement must not change with the controller gone"
    host = "db-prod-1"
    before = _elements_stripped(nft_table(lab, host))
    agent = world.agents[host]
    agent.kill()
    lab.run_in(host, ["nft", "delete", "table", "inet", "stockade"])  # as after a reboot
    started = time.monotonic()
    agent.start()
    took = wait_for(lambda: _elements_stripped(nft_table(lab, host)) == before, 5.0, 0.01)
    print(f"\nagent restarted with the controller down: cache enforced {took}s after exec ({load_note()})")
    assert took is not None and took <= bound(1.0), agent.log_tail()
    assert time.monotonic() - started < 5
    assert disagreements(world, matrix, policy) == []

    world.controller.start()
    everyone = sorted(world.agents)  # the estate's agents, plus dev-new when its test ran in this world
    back = wait_for(lambda: world.api.converged(everyone), 30.0, 0.1)
    keys = ("converged", "applied_revision", "desired_revision", "status", "quarantined", "quarantine_reason")
    state = {w: {k: a.get(k) for k in keys} for w, a in world.api.agents().items()}
    assert back is not None, f"{state}\n{world.logs()[-4000:]}"
    # And they follow changes again: relabel, watch every agent acknowledge.
    _relabel(world, "app-prod-1", role="batch")
    acked = wait_for(lambda: world.api.converged(everyone), 10.0, 0.01)
    print(f"controller back: agents reconverged after {back:.2f}s, then acked a relabel after {acked}s")
    assert acked is not None
    _relabel(world, "app-prod-1", role="app")
    assert wait_for(lambda: world.api.converged(everyone), 10.0, 0.05) is not None
    assert disagreements(world, matrix) == []


def test_agent_memory_and_idle_cpu(world: World) -> None:
    agents = [a for a in world.agents.values() if a.alive()]
    names = [a.name for a in agents]
    assert wait_for(lambda: world.api.converged(names), 60.0, 0.2) is not None, world.logs()
    # idle means after the work the earlier tests caused: an agent proves after every apply (a BDD, up to
    # seconds of CPU), so a 5 s window may catch the tail of one; an agent idles when some window of the
    # next 30 s is quiet (one that spins, or proves in a loop, never is)
    rows: list[tuple[str, float, float]] = []
    for _ in range(6):
        cpu0 = {a.name: a.cpu_seconds() for a in agents}
        time.sleep(5.0)
        window = [(a.name, a.rss_kib() / 1024, (a.cpu_seconds() - cpu0[a.name]) / 5.0 * 100) for a in agents]
        rows = window if not rows else [min(o, n, key=lambda r: r[2]) for o, n in zip(rows, window, strict=True)]
        if all(cpu < 20 for _, _, cpu in rows):
            break
    print("\nagent (+ children: a running nft)      RSS MiB   idle CPU % (quietest 5 s window)")
    for name, rss, cpu in rows:
        print(f"{name:<37} {rss:7.1f}   {cpu:6.2f}")
    offenders = [a for a, (_, rss, cpu) in zip(agents, rows, strict=True) if rss >= 200 or cpu >= 20]
    assert not offenders, f"{rows}\n" + "\n".join(a.diagnose() for a in offenders)


def test_uninstall_removes_rules_and_credential_and_tells_the_controller(world: World) -> None:
    host = "mon-1"
    agent = world.agents[host]
    agent.stop()
    assert "chain" in nft_table(world.lab, host)
    agent_id = world.api.agents()[host]["id"]
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.agent", "uninstall", "--netns", world.lab.netns(host),
         "--state-dir", str(agent.state_dir), "--unit-dir", str(world.tmp / "units")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert nft_table(world.lab, host) == ""
    assert not agent.state_dir.exists()
    assert host not in world.api.agents()
    assert world.api.ok("GET", f"/agents/{agent_id}")["status"] == "revoked"
