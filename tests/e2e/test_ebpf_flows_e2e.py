"""End to end: agents enforcing with the eBPF backend report real traffic as flows, like NFLOG hosts.

The world of ``test_visibility_e2e.py`` (a controller process with the example estate, three of
its workloads as namespace hosts, an unmanaged office desktop), except that every agent runs
``stockade agent --backend ebpf``: tc programs and maps, no nftables table at all. The datapath
writes one event per new connection to its ring buffer; the agent reads it (the backend is a
``FlowSource`` of ``EventFlows``) and uploads the same flow summaries an NFLOG host does. So the
visibility tests run here unchanged (imported below, against this module's ``world``): every real
connection shows up in the flow API with the workloads, labels, reporting side, verdict and
deciding rule the reference evaluator gives, and ``db-prod-1`` switched to full mode really
blocks and reports the blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from stockade.backends.common import in_netns
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.lab import Lab
from tests.e2e import test_visibility_e2e as visibility
from tests.e2e.harness import AgentProcess, nft_table, wait_for
from tests.e2e.test_visibility_e2e import AGENTS, World, running_world
from tests.kernel.test_ebpf_backend import SKIP

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

# The visibility tests, collected here too against this module's eBPF world (in this order:
# the second switches db-prod-1 to full mode).
test_visibility_traffic_appears_with_workloads_labels_and_verdicts = (
    visibility.test_visibility_traffic_appears_with_workloads_labels_and_verdicts
)
test_switching_to_full_turns_potentially_blocked_into_blocked = (
    visibility.test_switching_to_full_turns_potentially_blocked_into_blocked
)


def _remove_ebpf(lab: Lab, host: str) -> None:
    """Detach and unpin what a stopped agent left in force (pins outlive the namespace)."""
    in_netns(lab.netns(host), lambda: EbpfBackend().remove())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("ebpf-flows"), ("--backend", "ebpf"), _remove_ebpf) as w:
        yield w


def test_the_hosts_enforce_and_report_with_ebpf_only(world: World) -> None:
    for name in AGENTS:
        assert nft_table(world.lab, name) == "", f"{name} has an nftables table: not an eBPF-only host"
        # the ring buffer is pinned by the first apply; the agent looks for it again every second, so
        # right after convergence it may not have opened it yet
        assert wait_for(functools.partial(_reads_the_ring_buffer, world.agents[name]), 10.0, 0.1) is not None, \
            world.logs()


def _reads_the_ring_buffer(agent: AgentProcess) -> bool:
    return "reading flows from the eBPF flow-event ring buffer" in agent.log_tail(200_000)
