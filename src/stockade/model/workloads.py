"""Workloads: hosts, VMs, containers, pods and network-device virtual servers."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from stockade.errors import Issue, ValidationError
from stockade.model.addresses import IPAddress
from stockade.model.labels import Label


class EnforcementMode(Enum):
    """What the agent does with the policy (Illumio's enforcement states)."""

    IDLE = "idle"  # touch nothing, only report
    VISIBILITY = "visibility"  # block nothing, report would-be blocks
    SELECTIVE = "selective"  # default allow; deny rules enforced unless an allow crosses them
    FULL = "full"  # default deny; only allowed traffic passes

    def __lt__(self, other: EnforcementMode) -> bool:
        return _MODE_ORDER[self] < _MODE_ORDER[other]


_MODE_ORDER = {m: i for i, m in enumerate(EnforcementMode)}


@dataclass(frozen=True, order=True)
class Interface:
    name: str
    addresses: tuple[IPAddress, ...]


def validate_public_key(text: str, field: str = "public_key") -> str:
    """A WireGuard public key: canonical base64 of 32 bytes, not all zero (else ValidationError)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or base64.b64encode(raw).decode() != text or raw == bytes(32):
        raise ValidationError([Issue("", 0, field, "not a WireGuard public key (base64 of 32 bytes)")])
    return text


@dataclass(frozen=True, order=True)
class WireGuardIdentity:
    """A workload's registered WireGuard public key and the endpoint its peers send to.

    The private key never leaves the host; the controller only ever sees this.
    ``endpoint`` is one of the workload's own addresses (None: its first address).
    """

    public_key: str  # base64 of 32 bytes (Curve25519)
    endpoint: IPAddress | None = None
    port: int = 51820


# Backend names a workload may ask its agent to enforce with (``stockade.backends.registry``'s
# table; a unit test keeps the two equal). Which of them a given host can run is the agent's
# to say: it reports the backends it has, and refuses a switch to one it lacks.
BACKEND_NAMES = ("ebpf", "f5", "ipfilter", "iptables", "nftables", "windows")
DEFAULT_RENDER_BACKEND = "nftables"  # what offline rendering uses for a workload with no backend set


@dataclass(frozen=True, order=True)
class Workload:
    """One enforcement point. ``backend``: the firewall backend its agent must enforce with
    (the controller setting, which wins over the agent's ``--backend``); None: the agent's own choice."""

    name: str
    labels: frozenset[Label] = field(default_factory=frozenset)
    interfaces: tuple[Interface, ...] = ()
    mode: EnforcementMode = EnforcementMode.VISIBILITY
    backend: str | None = None
    description: str = ""
    wireguard: WireGuardIdentity | None = None

    def wireguard_endpoint(self) -> IPAddress | None:
        """The address peers send WireGuard packets to, or None when the workload cannot encrypt."""
        if self.wireguard is None or self.mode is EnforcementMode.IDLE or not self.addresses:
            return None
        ep = self.wireguard.endpoint
        if ep is not None and ep in self.addresses:
            return ep
        return self.addresses[0]

    @cached_property
    def addresses(self) -> tuple[IPAddress, ...]:
        """Every address of every interface, sorted (v4 first), without duplicates."""
        found: dict[tuple[int, int], IPAddress] = {}
        for i in self.interfaces:
            for a in i.addresses:
                found[_addr_key(a)] = a
        return tuple(found[k] for k in sorted(found))

    def label(self, key: str) -> str | None:
        for lab in self.labels:
            if lab.key == key:
                return lab.value
        return None


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return a.version, int(a)
