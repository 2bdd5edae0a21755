"""A real ``stockade agent`` refuses bad controller answers and keeps the previous policy in force.

Issue 5's acceptance, in the kernel lab: the agent process runs in a lab namespace with the
nftables backend, against a FAKE controller (:mod:`tests.fakes.bad_controller`) listening on
the estate's controller address (``10.70.0.1:8443``, what every host's failsafe allows), which
this test puts on the lab bridge inside the lab's bridge namespace (nothing in the root
namespace, so concurrent labs cannot clash). The fake first serves a good policy at revision
2, then in turn:

(a) revision 3 whose HostPolicy is malformed (an unknown mode, a rule without a peer);
(b) revision 4, a well-formed HostPolicy the nftables backend cannot express. nftables
    declares every :class:`~stockade.backends.base.Capability`, so the capability check can
    never refuse a policy for it; what it cannot express is refused by its renderer
    (``RenderError``), which the agent treats like a missing capability. The policy adds an
    "allow everything inbound" rule whose rule id holds characters an nft comment cannot carry;
(c) revision 1, a valid and more permissive policy (selective mode), going backwards.

After each: a ``policy-refused`` event naming the revision reaches the fake, the bad revision
is never acknowledged, the table in the namespace is the very same one (``nft -a list``, so
handles prove it was not even reloaded; counters zeroed) and real probes are unchanged and
match what the good policy decides on this host.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stockade.compiler import compile_host
from stockade.compiler.ir import host_policy_to_dict
from stockade.evaluator import Evaluator
from stockade.lab import HostSpec, Lab, probe_matrix
from stockade.lab.estate import evaluate_probe
from stockade.lab.netns import run_ip
from stockade.lab.probes import Probe
from stockade.policyfile import load_policy
from tests.e2e.harness import ESTATE, AgentProcess, wait_for
from tests.fakes.bad_controller import Answer, FakeController, ReceivedEvent

pytestmark = pytest.mark.kernel

AGENT_HOST = "app-prod-1"
HOSTS = ("web-prod-1", AGENT_HOST, "db-prod-1")
TCP_PORTS = (443, 8080, 5432)
CONTROLLER = ("10.70.0.1", 8443)  # examples/estate/settings.yaml: the failsafe allows it
CODE = "fake-activation-code"
REFUSED = "policy-refused"


@dataclass
class World:
    lab: Lab
    fake: FakeController
    agent: AgentProcess
    good: dict[str, Any]  # the HostPolicy JSON of revision 2
    probes: tuple[Probe, ...]
    expected: dict[str, bool]  # str(probe) -> succeeds under the good policy


def _table(lab: Lab) -> str:
    """The agent's table with rule handles, counters zeroed ("" when absent)."""
    proc = lab.run_in(AGENT_HOST, ["nft", "-a", "list", "table", "inet", "stockade"], check=False)
    text = proc.stdout if proc.returncode == 0 else ""
    return re.sub(r"counter packets \d+ bytes \d+", "counter packets 0 bytes 0", text)


def _probe(w: World) -> dict[str, bool]:
    w.lab.flush_conntrack(list(HOSTS))
    return {str(r.probe): r.succeeded for r in w.lab.probe(w.probes, timeout=0.5)}


def _malformed(good: dict[str, Any]) -> dict[str, Any]:
    bad = copy.deepcopy(good)
    bad["mode"] = "maximal"
    del bad["rules"][0]["peer"]
    return bad


def _inexpressible(good: dict[str, Any]) -> dict[str, Any]:
    """Valid HostPolicy JSON opening every protocol inbound, under a rule id nft cannot write."""
    policy = copy.deepcopy(good)
    everyone = next(s["name"] for s in policy["sets"] if s["selector"] == "all")
    rules = policy["rules"]
    first_allow = next(i for i, r in enumerate(rules) if r["action"] != "override-deny")
    rules.insert(first_allow, {"action": "allow", "direction": "in", "rule_id": 'ruleset/ops "open door"',
                               "peer": everyone, "services": [{"proto": "any", "first": None, "last": None}]})
    return policy


def _backwards(good: dict[str, Any]) -> dict[str, Any]:
    older = copy.deepcopy(good)
    older["mode"] = "selective"  # default allow: would open e.g. web -> app 443
    return older


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("agent-bad-answers")
    policy = load_policy(ESTATE)
    workloads = policy.workload_map()
    good = host_policy_to_dict(compile_host(policy, AGENT_HOST))
    specs = [HostSpec(n, workloads[n].addresses, TCP_PORTS) for n in HOSTS]
    pairs = [(s.name, s.addresses) for s in specs]
    probes = tuple(p for p in probe_matrix(pairs, tcp_ports=TCP_PORTS) if AGENT_HOST in (p.src_host, p.dst_host))
    # Only this host enforces: a probe's fate is its side's decision (outbound here, or inbound here).
    evaluator = Evaluator(policy)
    expected = {}
    for p in probes:
        ev = evaluate_probe(evaluator, p)
        side = ev.outbound if p.src_host == AGENT_HOST else ev.inbound
        assert side is not None and side.workload == AGENT_HOST, (p, ev)
        expected[str(p)] = side.action != "block"
    fake = FakeController(CODE)
    fake.serve_answer(Answer(2, good))
    with Lab(specs) as lab:
        agent = AgentProcess(AGENT_HOST, lab.netns(AGENT_HOST), tmp / "state", f"http://{CONTROLLER[0]}:{CONTROLLER[1]}",
                             CODE, tmp / "agent.log", extra=("--backend", "nftables", "--long-poll", "2"))
        try:
            run_ip(["-n", lab.bridge_netns, "addr", "add", f"{CONTROLLER[0]}/24", "dev", "br0"])
            fake.start(CONTROLLER[0], CONTROLLER[1], netns=lab.bridge_netns)
            agent.start()
            yield World(lab, fake, agent, good, probes, expected)
        finally:
            agent.stop()
            fake.close()


def _refusal(w: World, revision: int, since: float, timeout: float = 10.0) -> ReceivedEvent:
    def found() -> list[ReceivedEvent]:
        return [e for e in w.fake.events() if e.kind == REFUSED and e.revision == revision and e.received >= since]

    assert wait_for(lambda: bool(found()), timeout, 0.05) is not None, (
        f"no {REFUSED} event for revision {revision}: {w.fake.events()}\n{w.agent.log_tail()}")
    return found()[0]


def _next_poll_after(w: World, moment: float, timeout: float = 10.0) -> None:
    """Wait until the agent long-polls again after ``moment``: it is done with the answer."""
    assert wait_for(lambda: any(p.received > moment for p in w.fake.polls()), timeout, 0.05) is not None, (
        w.agent.log_tail())


def test_bad_answers_are_refused_and_the_previous_policy_stays(world: World) -> None:
    w = world
    # The good policy, revision 2: applied, acknowledged, in the kernel, and real traffic obeys it.
    assert wait_for(lambda: 2 in w.fake.acked(), 15.0, 0.05) is not None, w.agent.log_tail()
    baseline = _table(w.lab)
    assert "chain inbound" in baseline and 'comment "ruleset/shop-prod/1"' in baseline, baseline
    before = _probe(w)
    assert before == w.expected, {k: v for k, v in before.items() if w.expected[k] != v}
    assert any(before.values()) and not all(before.values()), before  # some allowed, some blocked

    good = w.good
    steps = [
        (3, _malformed(good), "malformed policy"),
        (4, _inexpressible(good), "cannot be embedded in an nft comment"),
        (1, _backwards(good), "revision went backwards"),
    ]
    for revision, body, reason in steps:
        started = time.monotonic()
        w.fake.serve_answer(Answer(revision, body))
        event = _refusal(w, revision, started)
        assert reason in event.detail, event
        _next_poll_after(w, event.received)
        assert revision not in w.fake.acked(), (revision, w.fake.acked())
        assert max(w.fake.acked()) == 2, w.fake.acked()
        assert _table(w.lab) == baseline, f"revision {revision} changed the table"
        after = _probe(w)
        assert after == before, {k: (before[k], v) for k, v in after.items() if before[k] != v}
        print(f"\nrevision {revision} refused in {event.received - started:.2f}s: {event.detail[:110]}")
    assert w.agent.alive(), w.agent.log_tail()
    # Each bad revision was reported once (the agent does not ask for a refused revision again).
    counts = {rev: sum(1 for e in w.fake.events() if e.kind == REFUSED and e.revision == rev) for rev in (3, 4, 1)}
    assert counts == {3: 1, 4: 1, 1: 1}, w.fake.events()
