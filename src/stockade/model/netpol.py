"""Kubernetes NetworkPolicies, resolved: which workloads they isolate and what they allow.

``stockade.k8s.netpol`` translates ``networking.k8s.io/v1`` NetworkPolicy objects against the
pods and namespaces it knows into these frozen values; the compiler and the evaluator read only
these. Label selectors are already resolved here (to workload names), named ports to numbers
(per destination pod), ``ipBlock`` with ``except`` to address ranges, so nothing downstream needs
Kubernetes' label syntax.

Semantics (upstream's, and the evaluator is the definition):

* A workload is *isolated* for ingress (egress) when some policy selects it and lists that
  direction in its policy types. A workload no policy isolates in a direction is unaffected.
* An isolated direction allows exactly the union of the rules of that direction, over every
  policy, whose targets include the workload and whose peers and ports match.
* How that combines with Stockade's own rules is in ``stockade.evaluator`` and docs/kubernetes.md:
  override-deny first, then NetworkPolicy for isolated directions, then Stockade's allow/deny and
  the mode default for the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

from stockade.model.addresses import AddressRanges
from stockade.model.services import ServiceEntry

MAX_RULE_ID = 100  # rule ids end up in NFLOG prefixes (at most 127 bytes with ours)


class NetpolDirection(Enum):
    INGRESS = "ingress"
    EGRESS = "egress"

    def __lt__(self, other: NetpolDirection) -> bool:
        return self.value < other.value


@dataclass(frozen=True, order=True)
class NetpolRule:
    """One ``ingress[i]`` or ``egress[i]`` rule of a policy, for one group of resolved ports.

    A rule whose named ports resolve to different numbers on different pods is split into several
    ``NetpolRule`` values with the same ``index``: for ingress by target pod (the named port is
    the target's own), for egress by peer pod (it is the destination's).

    ``any_peer``: no ``from``/``to`` (every source/destination). Otherwise the peers are the pods
    ``peer_workloads`` (by workload name) and the addresses ``peer_cidrs`` (ipBlocks minus except).
    ``services`` empty means nothing matches (a named port no pod has); ``ANY`` entry: every port.
    """

    direction: NetpolDirection
    index: int
    targets: frozenset[str]
    any_peer: bool
    peer_workloads: frozenset[str]
    peer_cidrs: AddressRanges
    services: tuple[ServiceEntry, ...]

    def matches_peer(self, workload: str | None, addr_in_cidrs: bool) -> bool:
        return self.any_peer or addr_in_cidrs or (workload is not None and workload in self.peer_workloads)


@dataclass(frozen=True, order=True)
class KubeNetworkPolicy:
    """One NetworkPolicy, resolved. ``selected``: the workloads its podSelector picks."""

    namespace: str
    name: str
    selected: frozenset[str]
    isolates_ingress: bool
    isolates_egress: bool
    rules: tuple[NetpolRule, ...] = ()
    problems: tuple[str, ...] = ()  # what could not be expressed (then ``rules`` is empty: deny)

    def isolates(self, direction: NetpolDirection) -> bool:
        return self.isolates_ingress if direction is NetpolDirection.INGRESS else self.isolates_egress

    @property
    def ref(self) -> str:
        """``namespace/name``, shortened with a hash when rule ids would grow too long."""
        return netpol_ref(self.namespace, self.name)

    def rule_id(self, direction: NetpolDirection, index: int) -> str:
        """The id of rule ``index`` (0-based) of ``direction``: ``netpol/<ns>/<name>/ingress/<i>``."""
        return f"netpol/{self.ref}/{direction.value}/{index}"

    def isolation_id(self, direction: NetpolDirection) -> str:
        """The id of the implicit deny of a direction this policy isolates."""
        return f"netpol/{self.ref}/{direction.value}"


def netpol_ref(namespace: str, name: str) -> str:
    ref = f"{namespace}/{name}"
    if len(ref) <= MAX_RULE_ID - 30:
        return ref
    digest = hashlib.sha256(ref.encode()).hexdigest()[:10]
    return f"{namespace[:30]}/{name[:24]}+{digest}"
