"""The node agent's data (issue 15): a local pod as the node agent needs it, the node agent's options, its timings.

Kept apart from :mod:`stockade.k8s.node_agent` (which imports them from here) so the node's pod
view (:mod:`stockade.k8s.node_watch`) and the CLI name them without the agent's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LocalPod:
    """What the node agent needs of a pod bound to its node (from the API)."""

    uid: str
    namespace: str
    name: str
    workload: str
    addresses: tuple[str, ...]
    host_network: bool = False
    finished: bool = False  # phase Succeeded or Failed

    @property
    def ready(self) -> bool:
        """Worth enrolling: the sync makes an (address-less, see :mod:`stockade.k8s.mapping`) workload
        of a pod as soon as it is bound to a node, so its policy can be in hand before its sandbox
        exists; a finished pod is no workload."""
        return not self.finished


@dataclass(frozen=True)
class NodeOptions:
    node: str
    controller: str
    state_dir: Path
    activation_code: str | None = None
    table: str = "stockade"
    host_policy: bool = True
    long_poll_seconds: float = 20.0
    pod_tamper_interval: float = 10.0
    host_tamper_interval: float = 0.5
    apply_slots: int = 2  # pods' deltas and proofs applied at once (first applies: START_WORKERS)
    pod_proof_min_gap: float = 30.0  # a pod's proofs at most this often (each apply is read back regardless)
    node_poll: bool = True  # one long-poll, ack batch and batch enrolment for all pods (k8s/node_poll.py);
    # False (--per-pod-poll): every pod's runtime long-polls, acks and heartbeats on its own (the per-pod protocol)
    pod_netlink: bool = True  # pods' full applies and read-backs over netlink (False: nft processes)
    pod_change_feed: bool = True  # each pod's tamper watch woken by nf_tables' netlink group in its namespace
    # (one socket and thread per pod; the read-back every pod_tamper_interval stays as the safety net)
    frozen_heap: bool = False  # the process's long-lived heap frozen between collections, deep ones when no pod
    # is starting (stockade.agent.heap; the CLI's node agent: on; off here so an in-process test's heap is its own)


@dataclass
class NodeStats:
    programmed: dict[str, float] = field(default_factory=dict)  # uid -> seconds from start to first apply
    # uid -> stage -> wall-clock time: seen (IP in the node's watch), taken (a start began), found
    # (namespace), pinned, enrolled (credential), runtime (started), then the runtime's milestones
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
