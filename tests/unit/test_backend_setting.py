"""The per-workload backend setting: one codec for YAML and REST, carried in the HostPolicy, and
followed by the agent make-before-break (controller setting wins; ``--backend`` is the default)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stockade.agent.agent import Agent
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import FakeController, FakeControllerClient
from stockade.agent.main import start_backend
from stockade.agent.state import CachedPolicy, StateDir
from stockade.agent.transport import EventKind
from stockade.backends.registry import BACKENDS
from stockade.codec import bodies
from stockade.compiler import Compiler, host_policy_to_dict
from stockade.compiler.ir import host_policy_from_dict
from stockade.errors import ApplyError, ValidationError
from stockade.model.workloads import BACKEND_NAMES
from stockade.policyfile.loader import load_policy
from tests.unit.test_agent_core import host_policy
from tests.unit.test_agent_loop import HOST, OPTIONS, wait
from tests.unit.test_backend_switch import Recording

POLICY = """\
apiVersion: stockade.io/v1
kind: Workload
name: web1
labels: {{role: web}}
interfaces: [{{name: eth0, addresses: [10.0.0.1]}}]
mode: full
{backend}
---
apiVersion: stockade.io/v1
kind: Workload
name: db1
labels: {{role: db}}
interfaces: [{{name: eth0, addresses: [10.0.0.2]}}]
mode: full
---
apiVersion: stockade.io/v1
kind: Service
name: pg
ports: [5432/tcp]
---
apiVersion: stockade.io/v1
kind: Ruleset
name: r
scope: all
rules:
  - consumers: [{{labels: {{role: web}}}}]
    providers: [{{labels: {{role: db}}}}]
    services: [pg]
"""


def _load(tmp_path: Path, backend_line: str) -> dict[str, object]:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(backend=backend_line))
    return {w.name: w.backend for w in load_policy(path).workloads}


def test_the_names_are_the_registry_s() -> None:
    assert set(BACKEND_NAMES) == set(BACKENDS)


@pytest.mark.parametrize(("line", "want"), [("", None), ("backend: null", None), ("backend: iptables", "iptables"),
                                            ("backend: ebpf", "ebpf")])
def test_yaml_reads_the_setting(tmp_path: Path, line: str, want: str | None) -> None:
    assert _load(tmp_path, line)["web1"] == want


@pytest.mark.parametrize("bad", ["pf", "NFTABLES", "42", "[nftables]"])
def test_yaml_refuses_an_unknown_backend_naming_file_line_and_field(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValidationError) as exc:
        _load(tmp_path, f"backend: {bad}")
    issue = exc.value.issues[0]
    assert issue.field == "backend" and issue.line == 7 and issue.source.endswith("p.yaml"), issue


def test_rest_bodies_use_the_same_codec() -> None:
    body = {"name": "web1", "labels": {}, "interfaces": [], "mode": "full", "backend": "iptables", "description": ""}
    w = bodies.decode("workload", body)
    assert w.backend == "iptables"
    assert bodies.encode("workload", w)["backend"] == "iptables"
    assert bodies.decode("workload", {**body, "backend": None}).backend is None
    with pytest.raises(ValidationError) as exc:
        bodies.decode("workload", {**body, "backend": "pf"})
    assert [i.field for i in exc.value.issues] == ["backend"]
    assert "unknown backend" in exc.value.issues[0].message


def test_the_host_policy_carries_it_and_its_rules_do_not_change(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(backend=""))
    compiler = Compiler(load_policy(path))
    before = compiler.host_policy("web1")
    assert before.backend is None and "backend" not in host_policy_to_dict(before)  # the wire is as before
    w = next(w for w in compiler.policy.workloads if w.name == "web1")
    deltas = compiler.upsert_workload(dataclasses.replace(w, backend="iptables"))
    reload = [d for d in deltas if d.workload == "web1"]
    assert reload and reload[0].rules_changed and reload[0].policy is not None
    after = reload[0].policy
    assert after.backend == "iptables"
    assert dataclasses.replace(after, backend=None) == before  # never widens: the same policy, rendered elsewhere
    assert host_policy_from_dict(host_policy_to_dict(after)) == after
    assert [d.workload for d in deltas] == ["web1"]  # peers are not touched


def test_a_wire_policy_naming_an_unknown_backend_is_malformed() -> None:
    d = host_policy_to_dict(host_policy())
    with pytest.raises(ValidationError):
        host_policy_from_dict({**d, "backend": "pf; rm -rf /"})


# ---- the agent ------------------------------------------------------------------------------


class World:
    def __init__(self, tmp: Path, factory_fails: bool = False) -> None:
        self.log: list[str] = []
        self.made: dict[str, Recording] = {}
        self.controller = FakeController()
        self.controller.add_code("code-web1", "web1")
        self.state = StateDir(tmp / "state")
        self.first = Recording("nftables", self.log)
        self.factory_fails = factory_fails

        def backend_factory(name: str) -> Recording:
            if self.factory_fails or name == "ebpf":
                raise ApplyError(f"{name}: clang not found")
            self.made[name] = Recording(name, self.log)
            return self.made[name]

        options = dataclasses.replace(OPTIONS, default_backend="nftables", available_backends=("nftables",))
        self.agent = Agent(options, self.state, Enforcer(self.first),
                           lambda url, ca: FakeControllerClient(self.controller, url, ca),
                           host_reader=lambda: HOST, backend_factory=backend_factory)

    def events(self, kind: EventKind) -> list[str]:
        return [e.detail for ag in self.controller.agents.values() for e in ag.events if e.kind is kind]

    @property
    def in_force(self) -> str:
        return self.agent.enforcer.backend.name


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_the_controller_setting_switches_make_before_break_and_null_goes_back(world: World) -> None:
    hp = host_policy()
    world.controller.publish(hp)
    world.agent.start()
    try:
        assert wait(lambda: world.first.installed == hp)
        world.log.clear()
        world.controller.publish(dataclasses.replace(hp, backend="iptables"))
        assert wait(lambda: world.in_force == "iptables" and world.agent.converged.is_set())
        new = world.made["iptables"]
        assert world.log.index("iptables:apply") < world.log.index("iptables:read") < world.log.index("nftables:remove")
        assert new.installed is not None and world.first.installed is None
        assert wait(lambda: world.state.load_backend() == "iptables")  # the backend-in-force file
        assert wait(lambda: any("nftables -> iptables" in d for d in world.events(EventKind.BACKEND_SWITCHED)))
        beats = world.controller.agent_for("web1").heartbeats
        assert wait(lambda: bool(beats) and beats[-1].backend == "iptables" and beats[-1].backends == ("nftables",))
        world.controller.publish(hp)  # null again: the agent's own --backend
        assert wait(lambda: world.in_force == "nftables" and world.made["iptables"].installed is None)
        assert wait(lambda: world.state.load_backend() == "nftables")
    finally:
        world.agent.stop()


def test_a_backend_the_agent_lacks_is_refused_and_the_old_one_keeps_enforcing(world: World) -> None:
    hp = host_policy()
    world.controller.publish(hp)
    world.agent.start()
    try:
        assert wait(lambda: world.first.installed == hp)
        world.controller.publish(dataclasses.replace(hp, backend="ebpf", rules=hp.rules))
        assert wait(lambda: bool(world.events(EventKind.BACKEND_SWITCH_FAILED)))
        detail = world.events(EventKind.BACKEND_SWITCH_FAILED)[0]
        assert "clang not found" in detail and "nftables stays in force" in detail
        assert world.in_force == "nftables" and world.first.installed is not None
        assert "nftables:remove" not in world.log
    finally:
        world.agent.stop()


def test_a_failing_apply_on_the_new_backend_leaves_the_old_one(tmp_path: Path) -> None:
    world = World(tmp_path)
    hp = host_policy()
    world.controller.publish(hp)
    real_factory = world.agent.backend_factory
    assert real_factory is not None

    def losing(name: str) -> Recording:
        b = real_factory(name)
        assert isinstance(b, Recording)
        b.lose_applies = True  # applies vanish: the read-back catches it
        return b

    world.agent.backend_factory = losing
    world.agent.start()
    try:
        assert wait(lambda: world.first.installed == hp)
        world.controller.publish(dataclasses.replace(hp, backend="iptables"))
        assert wait(lambda: bool(world.events(EventKind.BACKEND_SWITCH_FAILED)))
        assert world.in_force == "nftables" and world.first.installed is not None
        assert world.made["iptables"].removes >= 1  # its partial state cleaned up
    finally:
        world.agent.stop()


def test_a_restart_starts_on_the_controller_setting_not_the_cli_default(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    assert start_backend(state, "nftables") == "nftables"  # no cache: --backend
    state.save_policy(CachedPolicy(3, host_policy()))
    assert start_backend(state, "nftables") == "nftables"  # the setting is null: --backend
    state.save_policy(CachedPolicy(4, dataclasses.replace(host_policy(), backend="iptables")))
    assert start_backend(state, "nftables") == "iptables"  # the controller's setting wins


def test_the_agent_reports_the_backends_whose_tools_the_host_has(monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.backends import registry

    have = {"nft", "tc"}
    monkeypatch.setattr(registry.shutil, "which", lambda tool: f"/usr/sbin/{tool}" if tool in have else None)
    assert registry.available_backends() == ("nftables",)  # tc without clang: no eBPF
    have |= {"clang-16", "iptables-legacy-restore", "ipset"}
    assert registry.available_backends() == ("nftables", "iptables", "ebpf")
