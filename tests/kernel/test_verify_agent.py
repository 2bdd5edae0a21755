"""The agent proves what it applied: "proven at revision N" after an apply, the counterexample after a change.

A real agent (fake controller, real nftables in a namespace) applies a published policy and,
right after, reports a ``proven`` event naming the revision; a set element deleted behind its
back (tamper watcher slowed down so the proof sees it first) makes the next proof report
``proof-differs`` with the packet; a construct the prover does not model gives ``proof-failed``.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent.agent import Agent, AgentOptions
from stockade.agent.backoff import BackoffPolicy
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import FakeController, FakeControllerClient, wait_until
from stockade.agent.host import HostReport, InterfaceReport
from stockade.agent.state import StateDir
from stockade.agent.transport import EventKind
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ebpf.render import peer_key
from stockade.backends.nftables.backend import NftablesBackend
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

pytestmark = pytest.mark.kernel

HOST = HostReport("web1", "Linux", (InterfaceReport("eth0", (ipaddress.ip_address("10.0.0.1"),)),))


def _policy() -> HostPolicy:
    n = ipaddress.ip_network
    return HostPolicy(
        "web1", EnforcementMode.FULL, (ipaddress.ip_address("10.0.0.1"),),
        (HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/app/0", "peer1", (ServiceEntry(Proto.TCP, 80, 80),)),),
        (AddressSet("peer1", Family.V4, (n("10.0.0.2/32"),)), AddressSet("peer1", Family.V6, ())),
        Failsafe(controller=(n("192.0.2.1/32"),)),
    )  # fmt: skip


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stk-va-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


def test_agent_reports_proven_then_the_counterexample(tmp_path: Path, netns: str) -> None:
    table = f"stk{uuid.uuid4().hex[:6]}"
    controller = FakeController()
    controller.add_code("code-web1", "web1")
    options = AgentOptions(
        controller="fake://c", activation_code="code-web1", long_poll_seconds=0.3, tamper_interval=60.0,
        change_feed=False, heartbeat_seconds=0.2, backoff=BackoffPolicy(initial=0.02, maximum=0.1),
        watch_addresses=False, proof_interval=60.0,
    )  # fmt: skip

    def factory(url: str, ca: str | None) -> FakeControllerClient:
        return FakeControllerClient(controller, url, ca)

    agent = Agent(options, StateDir(tmp_path / "state"), Enforcer(NftablesBackend(table, netns=netns)), factory,
                  host_reader=lambda: HOST)  # fmt: skip

    def events(kind: EventKind) -> list[str]:
        return [e.detail for a in controller.agents.values() for e in a.events if e.kind is kind]

    agent.start()
    try:
        rev = controller.publish(_policy())
        assert wait_until(lambda: bool(events(EventKind.PROVEN)), timeout=15), events(EventKind.PROOF_FAILED)
        assert events(EventKind.PROVEN)[0].startswith(f"proven at revision {rev}:")
        subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "element", "inet", table, "peer1_v4_host",
                        "{ 10.0.0.2 }"], check=True)  # fmt: skip
        assert agent.prove_now() == "differs"
        assert wait_until(lambda: bool(events(EventKind.PROOF_DIFFERS)), timeout=5)
        detail = events(EventKind.PROOF_DIFFERS)[0]
        assert "10.0.0.2" in detail and ":80" in detail and "policy says accept, kernel does drop" in detail
        subprocess.run(["ip", "netns", "exec", netns, "nft", "insert", "rule", "inet", table, "inbound",
                        "meta", "mark", "0x1", "accept"], check=True)  # fmt: skip
        assert agent.prove_now() == "failed"
        assert wait_until(lambda: any("mark" in d for d in events(EventKind.PROOF_FAILED)), timeout=5)
    finally:
        agent.stop()
        subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", table], check=False,
                       capture_output=True)  # fmt: skip


def test_agent_proves_ebpf_after_apply_then_reports_the_counterexample(tmp_path: Path, netns: str) -> None:
    table = f"stk{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    controller = FakeController()
    controller.add_code("code-web1", "web1")
    options = AgentOptions(
        controller="fake://c", activation_code="code-web1", long_poll_seconds=0.3, tamper_interval=60.0,
        change_feed=False, heartbeat_seconds=0.2, backoff=BackoffPolicy(initial=0.02, maximum=0.1),
        watch_addresses=False, proof_interval=60.0,
    )  # fmt: skip

    def factory(url: str, ca: str | None) -> FakeControllerClient:
        return FakeControllerClient(controller, url, ca)

    backend = EbpfBackend(netns=netns, table=table)
    agent = Agent(options, StateDir(tmp_path / "state"), Enforcer(backend), factory, host_reader=lambda: HOST)

    def events(kind: EventKind) -> list[str]:
        return [e.detail for a in controller.agents.values() for e in a.events if e.kind is kind]

    agent.start()
    try:
        rev = controller.publish(_policy())
        assert wait_until(lambda: bool(events(EventKind.PROVEN)), timeout=15), events(EventKind.PROOF_FAILED)
        assert events(EventKind.PROVEN)[0].startswith(f"proven at revision {rev}:")
        loader = EbpfBackend(netns=netns, table=table).loader
        cur = loader.current()
        assert cur is not None
        trie = loader.trie(cur.generation)
        assert trie is not None
        with trie:  # the peer's element removed from the trie in force
            assert trie.delete(peer_key(Family.V4, int(ipaddress.ip_address("10.0.0.2")), 32))
        loader.close()
        assert agent.prove_now() == "differs"
        assert wait_until(lambda: bool(events(EventKind.PROOF_DIFFERS)), timeout=5)
        detail = events(EventKind.PROOF_DIFFERS)[0]
        assert "10.0.0.2" in detail and ":80" in detail and "policy says accept, kernel does drop" in detail
        subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "del", "dev", "eth0", "ingress", "pref",
                        str(backend.loader.pref), "handle", "1", "bpf"], check=True)  # fmt: skip
        assert agent.prove_now() == "failed"
        assert wait_until(lambda: any("no Stockade program" in d for d in events(EventKind.PROOF_FAILED)), timeout=5)
    finally:
        agent.stop()
        backend.remove()
        backend.close()
