"""The agent runtime against the in-memory controller and firewall.

Enrolment, cache-first start-up, full and delta updates, acks, refusals (malformed,
unsupported, backwards, foreign), controller outages with backoff, tamper restore, modes.
"""

from __future__ import annotations

import base64
import ipaddress
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.agent.agent import Agent, AgentOptions
from stockade.agent.backoff import BackoffPolicy
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import FakeController, FakeControllerClient, MemoryBackend, wait_until
from stockade.agent.host import HostReport, InterfaceReport
from stockade.agent.state import CachedPolicy, StateDir
from stockade.agent.transport import EventKind
from stockade.backends.base import Capability
from stockade.compiler import host_policy_to_dict
from stockade.compiler.ir import HostPolicy, WireGuardConfig, WireGuardPeer
from stockade.model.workloads import EnforcementMode
from tests.unit.test_agent_core import host_policy

HOST = HostReport("web1", "Linux", (InterfaceReport("eth0", (ipaddress.ip_address("10.0.0.1"),)),))
OPTIONS = AgentOptions(
    controller="fake://c",
    activation_code="code-web1",
    long_poll_seconds=0.3,
    tamper_interval=0.05,
    heartbeat_seconds=0.2,
    backoff=BackoffPolicy(initial=0.02, maximum=0.1),
    watch_addresses=False,
)


class Harness:
    def __init__(self, tmp: Path, controller: FakeController | None = None) -> None:
        self.controller = controller or FakeController()
        self.controller.add_code("code-web1", "web1")
        self.state = StateDir(tmp / "state")
        self.backend = MemoryBackend()
        self.agents: list[Agent] = []
        self.clients: list[FakeControllerClient] = []

    def agent(self, options: AgentOptions = OPTIONS, backend: MemoryBackend | None = None) -> Agent:
        if backend is not None:
            self.backend = backend

        def factory(url: str, ca: str | None) -> FakeControllerClient:
            c = FakeControllerClient(self.controller, url, ca)
            self.clients.append(c)
            return c

        a = Agent(options, self.state, Enforcer(self.backend), factory, host_reader=lambda: HOST)
        self.agents.append(a)
        return a

    def events(self, kind: EventKind) -> list[str]:
        return [e.detail for ag in self.controller.agents.values() for e in ag.events if e.kind is kind]

    def acked(self) -> list[int]:
        try:
            return self.controller.agent_for("web1").acked
        except KeyError:
            return []  # not enrolled yet

    def stop(self) -> None:
        for a in self.agents:
            a.stop()


@pytest.fixture(params=[False, True], ids=["fetch", "inline"])
def h(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Both controller styles: policy fetched after the long-poll, or sent with its answer."""
    harness = Harness(tmp_path, FakeController(inline=request.param))
    yield harness
    harness.stop()


def wait(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    return wait_until(pred, timeout)


def test_enrols_applies_caches_acks_and_reports(h: Harness) -> None:
    hp = host_policy()
    rev = h.controller.publish(hp)
    a = h.agent()
    a.start()
    assert wait(lambda: h.backend.installed == hp and rev in h.acked())
    cred = h.state.load_credential()
    assert cred is not None and cred.workload == "web1" and cred.controller == "fake://c"
    cached = h.state.load_policy()
    assert cached == CachedPolicy(rev, hp)
    assert wait(lambda: bool(h.controller.agent_for("web1").heartbeats))
    fa = h.controller.agent_for("web1")
    assert fa.hosts[-1] == HOST
    assert wait(lambda: fa.heartbeats[-1].applied_revision == rev and fa.heartbeats[-1].mode == "full")


def test_restart_enforces_cache_before_contacting_controller_then_converges(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    old = host_policy()
    h.controller.publish(old)
    first = h.agent()
    first.start()
    assert wait(lambda: h.acked() == [1])
    first.stop()
    h.backend.installed = None  # reboot: the kernel forgot everything
    h.controller.set_reachable(False)
    new = host_policy(port=443)
    h.controller.publish(new)
    second = h.agent()
    second.enforce_cache()  # what start() does first, synchronously
    assert h.backend.installed == old
    second.start()
    assert h.backend.installed == old
    assert not wait(lambda: h.backend.installed == new, timeout=0.4)  # still down: old stays
    h.controller.set_reachable(True)
    assert wait(lambda: h.backend.installed == new and h.acked()[-1] == 2)
    assert len(h.controller.agents) == 1, "the second run reused the credential"
    assert wait(lambda: any("cached revision 1" in d for d in h.events(EventKind.STARTED)))
    h.stop()


def test_set_only_change_arrives_as_delta_without_reload(h: Harness) -> None:
    h.controller.publish(host_policy())
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    new = host_policy(peers=("10.0.0.2/32", "10.0.0.5/32"))
    h.controller.publish(new)
    assert wait(lambda: h.acked() == [1, 2])
    assert h.backend.installed == new
    assert h.backend.applies == 1 and h.backend.deltas_applied == 1
    assert h.controller.fetches[-1] == ("web1", 1)
    cached = h.state.load_policy()
    assert cached is not None and cached.policy == new and cached.revision == 2


def test_peer_rotation_arrives_as_a_peer_delta_without_reload(h: Harness) -> None:
    """A peer's key rotates (rules, sets unchanged): the agent gets a peer delta, applies it through
    the backend's PeerUpdating capability, never reloads its ruleset, and caches the new policy."""
    def with_peer(key: str) -> HostPolicy:
        peer = WireGuardPeer("db1", key, ipaddress.ip_address("10.0.0.2"), 51820,
                             (ipaddress.ip_network("10.0.0.2/32"),))
        return replace(host_policy(), wireguard=WireGuardConfig(51820, (peer,)))

    old, new = with_peer(base64.b64encode(b"a" * 32).decode()), with_peer(base64.b64encode(b"b" * 32).decode())
    h.controller.publish(old)
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.controller.publish(new)
    assert wait(lambda: h.acked() == [1, 2])
    assert h.backend.installed == new
    assert (h.backend.applies, h.backend.deltas_applied, h.backend.peer_deltas_applied) == (1, 0, 1)
    cached = h.state.load_policy()
    assert cached is not None and cached.policy == new and cached.revision == 2


def test_delta_without_backend_support_falls_back_to_full_reload(h: Harness) -> None:
    h.controller.publish(host_policy())
    a = h.agent(backend=MemoryBackend(frozenset(Capability) - {Capability.SET_DELTAS}))
    a.start()
    assert wait(lambda: h.acked() == [1])
    new = host_policy(peers=("10.0.0.6/32",))
    h.controller.publish(new)
    assert wait(lambda: h.acked() == [1, 2])
    assert h.backend.installed == new and h.backend.applies == 2 and h.backend.deltas_applied == 0


def test_malformed_policy_is_refused_and_previous_stays(h: Harness) -> None:
    hp = host_policy()
    h.controller.publish(hp)
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.controller.override = {"revision": 2, "full": {"workload": "web1", "mode": "full"}}
    h.controller.publish(host_policy(port=8080))
    assert wait(lambda: bool(h.events(EventKind.POLICY_REFUSED)))
    assert "malformed" in h.events(EventKind.POLICY_REFUSED)[0]
    assert h.backend.installed == hp and h.acked() == [1]
    good = host_policy(port=9090)
    h.controller.publish(good)  # revision 3, well formed
    assert wait(lambda: h.backend.installed == good and h.acked() == [1, 3])


def test_unsupported_feature_is_refused_with_event(h: Harness) -> None:
    hp = host_policy()
    h.controller.publish(hp)
    a = h.agent(backend=MemoryBackend(frozenset(Capability) - {Capability.IPV6}))
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.controller.publish(host_policy(peers=("fd00::9/128",)))
    assert wait(lambda: bool(h.events(EventKind.POLICY_REFUSED)))
    assert "IPv6" in h.events(EventKind.POLICY_REFUSED)[0]
    assert h.backend.installed == hp and h.acked() == [1]
    assert a.refused_revision == 2


def test_revision_going_backwards_is_refused_once(h: Harness) -> None:
    h.controller.publish(host_policy())
    h.controller.publish(host_policy(port=81))
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [2])
    installed = h.backend.installed
    h.controller.announce = 1
    assert wait(lambda: bool(h.events(EventKind.POLICY_REFUSED)), timeout=2.0)
    assert "backwards" in h.events(EventKind.POLICY_REFUSED)[0]
    assert not wait(lambda: len(h.events(EventKind.POLICY_REFUSED)) > 1, timeout=0.8)
    assert h.backend.installed == installed and a.applied_revision == 2


def test_policy_for_another_workload_is_refused(h: Harness) -> None:
    h.controller.publish(host_policy())
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.controller.override = {"revision": 2, "full": host_policy_to_dict(host_policy(workload="db1"))}
    h.controller.publish(host_policy(port=5432))
    assert wait(lambda: bool(h.events(EventKind.POLICY_REFUSED)))
    assert "db1" in h.events(EventKind.POLICY_REFUSED)[0]
    assert h.backend.installed is not None and h.backend.installed.workload == "web1"


def test_tamper_is_restored_and_reported(h: Harness) -> None:
    hp = host_policy()
    h.controller.publish(hp)
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.backend.tampered_text = ""
    assert wait(lambda: h.backend.tampered_text is None and h.backend.installed == hp, timeout=2.0)
    assert wait(lambda: bool(h.events(EventKind.TAMPER)), timeout=2.0)
    assert "table missing" in h.events(EventKind.TAMPER)[0] and "restored" in h.events(EventKind.TAMPER)[0]
    assert a.tamper_count == 1


def test_mode_switches_idle_removes_full_reinstalls(h: Harness) -> None:
    h.controller.publish(host_policy())
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.controller.publish(host_policy(mode=EnforcementMode.IDLE))
    assert wait(lambda: h.acked() == [1, 2] and h.backend.installed is None)
    vis = host_policy(mode=EnforcementMode.VISIBILITY)
    h.controller.publish(vis)
    assert wait(lambda: h.acked()[-1] == 3 and h.backend.installed == vis)


def test_controller_outage_keeps_enforcing_and_reconverges(h: Harness) -> None:
    hp = host_policy()
    h.controller.publish(hp)
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.controller.set_reachable(False)
    h.backend.tampered_text = ""  # tamper during the outage: restored anyway, event queued
    assert wait(lambda: h.backend.installed == hp and h.backend.tampered_text is None)
    new = host_policy(port=8443)
    h.controller.publish(new)
    assert not wait(lambda: h.backend.installed == new, timeout=0.3)
    h.controller.set_reachable(True)
    assert wait(lambda: h.backend.installed == new and h.acked()[-1] == 2)
    assert wait(lambda: bool(h.events(EventKind.TAMPER)))


def test_bad_activation_code_never_enrols_but_cache_is_enforced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    hp = host_policy()
    h.state.save_policy(CachedPolicy(5, hp))
    a = h.agent(AgentOptions(**{**OPTIONS.__dict__, "activation_code": "wrong"}))
    a.start()
    assert h.backend.installed == hp
    assert not a.enrolled.wait(0.3)
    assert h.state.load_credential() is None and not h.controller.agents
    h.stop()


def test_no_credential_and_no_code_is_an_error_but_cache_enforced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.state.save_policy(CachedPolicy(2, host_policy()))
    a = h.agent(AgentOptions(**{**OPTIONS.__dict__, "activation_code": None}))
    a.start()
    assert h.backend.installed is not None
    assert not a.enrolled.wait(0.2)
    h.stop()


def test_address_change_reconnects_and_reports_the_new_addresses(h: Harness) -> None:
    h.controller.publish(host_policy())
    reports = [HOST, HostReport("web1", "Linux", (InterfaceReport("eth0", (ipaddress.ip_address("10.0.0.9"),)),))]
    a = h.agent()
    a.host_reader = lambda: reports[0]
    a.start()
    assert wait(lambda: h.acked() == [1] and h.controller.agent_for("web1").hosts[-1] == HOST)
    reports.pop(0)
    a.on_address_change()  # what the netlink watcher calls
    assert wait(lambda: h.controller.agent_for("web1").hosts[-1] == reports[0])
    assert h.clients[-1].reconnects == 1


def test_a_restore_that_keeps_failing_is_reported_once(h: Harness) -> None:
    h.controller.publish(host_policy())
    a = h.agent()
    a.start()
    assert wait(lambda: h.acked() == [1])
    h.backend.fail_apply = 10**6
    h.backend.tampered_text = ""
    assert wait(lambda: any("NOT restored" in d for d in h.events(EventKind.TAMPER)))
    time.sleep(0.5)  # ~10 more failing checks
    assert len(h.events(EventKind.TAMPER)) == 1
    h.backend.fail_apply = 0
    assert wait(lambda: h.backend.installed == host_policy() and h.backend.tampered_text is None)
    assert wait(lambda: any("; restored in " in d for d in h.events(EventKind.TAMPER)))


@pytest.mark.parametrize("inline", [False, True])
def test_a_full_policy_that_only_moves_set_members_is_applied_as_a_delta(tmp_path: Path, inline: bool) -> None:
    """The controller sends a full policy when an agent's revision fell out of its history (a node's
    pods under churn: ~8 revisions behind). Before, every one was a full render, reload and verify
    in the pod's namespace; when only set members differ from the policy in force, the agent now
    applies the difference as a checked delta. More than members (a port) is still a full reload,
    and so is a delta the backend refuses."""
    h = Harness(tmp_path, FakeController(deltas=False, inline=inline))
    try:
        h.controller.publish(host_policy())
        h.agent().start()
        assert wait(lambda: h.acked() == [1])
        members = host_policy(peers=("10.0.0.2/32", "10.0.0.5/32"))
        h.controller.publish(members)
        assert wait(lambda: h.acked() == [1, 2])
        assert h.backend.installed == members
        assert (h.backend.applies, h.backend.deltas_applied) == (1, 1), "a full reload for set members only"
        cached = h.state.load_policy()
        assert cached is not None and cached.policy == members and cached.revision == 2
        port = host_policy(port=443, peers=("10.0.0.2/32", "10.0.0.5/32"))
        h.controller.publish(port)
        assert wait(lambda: h.acked() == [1, 2, 3])
        assert h.backend.installed == port and (h.backend.applies, h.backend.deltas_applied) == (2, 1)
        h.backend.installed = None  # the table vanished: the delta fails, the full reload puts it back
        again = host_policy(port=443, peers=("10.0.0.2/32",))
        h.controller.publish(again)
        assert wait(lambda: h.acked() == [1, 2, 3, 4])
        assert h.backend.installed == again and (h.backend.applies, h.backend.deltas_applied) == (3, 1)
    finally:
        h.stop()
