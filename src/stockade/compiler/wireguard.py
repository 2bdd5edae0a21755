"""Which WireGuard peers each host gets: the workloads on the other side of its encrypted rules.

A host needs a peer for workload W exactly when W is a member of the peer set of one of the
host's encrypted rules, W is not the host itself, and W can run a tunnel (not idle, with a
registered public key). Rule matching is symmetric (a rule that puts W in the consumer's
provider set puts the consumer in W's consumer set), so peers come in pairs.

``PeerIndex`` keeps, per workload address set, the names of its members that can encrypt. The
compiler already knows which sets a workload is a member of (per label set), so filing a
workload costs one update per set it belongs to; answering a host's peers is a union over its
encrypted rules' sets, never a scan of the fleet. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from stockade.compiler.ir import HostDelta, WireGuardConfig, WireGuardPeer
from stockade.model.workloads import Workload

DEFAULT_PORT = 51820


def can_encrypt(w: Workload) -> bool:
    """A workload that can be a WireGuard peer: not idle, with a registered key and an address."""
    return w.wireguard_endpoint() is not None


def peer_of(w: Workload) -> WireGuardPeer:
    """``w`` as its peers see it (call only when ``can_encrypt(w)``)."""
    endpoint = w.wireguard_endpoint()
    assert endpoint is not None and w.wireguard is not None
    allowed = tuple(ipaddress.ip_network(a) for a in w.addresses)
    return WireGuardPeer(w.name, w.wireguard.public_key, endpoint, w.wireguard.port, allowed)


def config_for(host: Workload, peers: Iterable[Workload]) -> WireGuardConfig:
    """The tunnel configuration of ``host`` with ``peers`` (the host itself is left out)."""
    port = host.wireguard.port if host.wireguard is not None else DEFAULT_PORT
    found = sorted({p.name: p for p in peers if p.name != host.name and can_encrypt(p)}.items())
    return WireGuardConfig(port, tuple(peer_of(w) for _, w in found))


class PeerIndex:
    """Address-set name -> the names of its members that can encrypt (see the module docstring)."""

    def __init__(self) -> None:
        self._by_set: dict[str, set[str]] = defaultdict(set)

    def add(self, w: Workload, member_of: Iterable[str]) -> None:
        if can_encrypt(w):
            for s in member_of:
                self._by_set[s].add(w.name)

    def remove(self, name: str, member_of: Iterable[str]) -> None:
        for s in member_of:
            names = self._by_set.get(s)
            if names is not None:
                names.discard(name)

    def members(self, sets: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for s in sets:
            out |= self._by_set.get(s, set())
        return out


def same_port(old: WireGuardConfig | None, new: WireGuardConfig | None) -> bool:
    """Both tunnels exist on the same port: what differs between them is peers only."""
    return old is not None and new is not None and old.listen_port == new.listen_port


def merge_peer_only(out: list[HostDelta]) -> list[HostDelta]:
    """A host with a peer-only delta and a set delta in one batch gets one delta holding both."""
    by: dict[str, HostDelta] = {}
    for d in out:
        prev = by.get(d.workload)
        if prev is None:
            by[d.workload] = d
        else:  # neither changed rules (a reload excludes the host from set fan-out)
            by[d.workload] = HostDelta(d.workload, d.policy, False, (*prev.set_deltas, *d.set_deltas),
                                       prev.peers_changed or d.peers_changed)
    return list(by.values())
