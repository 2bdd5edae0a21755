"""The backend contract: capabilities, the ``Backend`` protocol and the central capability check.

Every enforcement backend (nftables, iptables+ipset, eBPF, Windows Firewall, ...) is one
module implementing :class:`Backend`:

* ``render(host_policy)`` is pure: HostPolicy IR in, a native artifact (a value) out;
* ``apply(artifact)`` is atomic: either the whole artifact is in force, or the previous
  ruleset still is (:class:`~stockade.errors.ApplyError`);
* ``apply_delta(set_deltas)`` changes address-set members without reloading rules;
* ``read_back()`` returns what the kernel/device holds now, normalised for comparison;
* ``remove()`` deletes everything the backend owns and nothing else.

Optional capabilities are typed protocols too, checked once (``isinstance``) by whoever
uses them, never discovered by ``getattr``:

* :class:`Verifying` - ``verify(artifact)`` compares the kernel with an artifact by meaning
  and returns the one :class:`VerifyReport` (an apply is checked with it);
* :class:`FlowSource` - the datapath reports the verdict of every new connection, either to
  an NFLOG group (:class:`NflogFlows`, prefixes of :mod:`stockade.backends.flowlog`) or as
  :class:`~stockade.backends.flowlog.FlowEvent` records (:class:`EventFlows`, the eBPF ring
  buffer); the agent turns either into flow reports;
* :class:`ChangeFeedSource` - where the kernel announces a change to what the backend owns (a
  netlink group, :class:`NetlinkGroup`: nf_tables' ``NFNLGRP_NFTABLES``; or a command printing a
  line per change), so tamper is noticed without fast polling;
* :class:`NetnsBound` - the backend programs a named network namespace, not the caller's.

A backend *declares* the policy features it supports (``capabilities``).
:func:`check_capabilities` derives the features a host policy needs and raises
:class:`~stockade.errors.UnsupportedFeatureError`, naming the feature and the rule, for the
first one missing: a security-relevant field is never silently dropped (fail closed).
Renderers call it before producing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeVar, runtime_checkable

from stockade.backends.flowlog import FlowEvent
from stockade.compiler.ir import Direction, HostPolicy, PeerDelta, SetDelta, WireGuardConfig
from stockade.errors import UnsupportedFeatureError
from stockade.model.addresses import Family
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode


class Capability(Enum):
    """A policy feature a backend can express. Values are human-readable feature names."""

    IPV4 = "IPv4 peers"
    IPV6 = "IPv6 peers"
    INBOUND = "inbound rules"
    OUTBOUND = "outbound rules"
    ANY_PROTOCOL = "any-protocol services"
    TCP = "TCP services"
    UDP = "UDP services"
    SCTP = "SCTP services"
    PORT_RANGES = "port ranges"
    ICMP = "ICMP services"
    ICMP_TYPES = "ICMP type matches"
    ICMPV6 = "ICMPv6 services"
    ICMPV6_TYPES = "ICMPv6 type matches"
    DENY = "deny rules"
    OVERRIDE_DENY = "override-deny rules"
    MODE_FULL = "full enforcement mode"
    MODE_SELECTIVE = "selective enforcement mode"
    MODE_VISIBILITY = "visibility mode"
    VISIBILITY_LOG = "logging of would-be drops"
    CONTROLLER_FAILSAFE = "controller failsafe"
    SET_DELTAS = "incremental address-set deltas"  # not needed by a policy; the agent asks
    ENCRYPT = "WireGuard encryption (encrypt: true)"  # never sent in the clear where it is missing


WITHOUT_ENCRYPTION: frozenset[Capability] = frozenset(Capability) - {Capability.ENCRYPT}
"""Every feature but ``encrypt: true``: the backends with no WireGuard datapath (encrypted rules fail closed)."""


class Artifact(Protocol):
    """What a renderer produces: a value that can be printed and applied."""

    def to_text(self) -> str:
        """The artifact in the backend's native syntax (what ``stockade render`` prints)."""
        ...


ArtifactT = TypeVar("ArtifactT", bound=Artifact)
ArtifactT_contra = TypeVar("ArtifactT_contra", bound=Artifact, contravariant=True)


class BackendControl(Protocol):
    """The part of a backend that does not depend on its artifact type (what the agent holds)."""

    name: str
    capabilities: frozenset[Capability]

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        """Change address-set members in one transaction, without touching rules."""
        ...

    def read_back(self) -> str:
        """What is in force now, normalised (counters zeroed); "" when nothing is installed."""
        ...

    def remove(self) -> None:
        """Delete everything this backend owns; never touch anything else. Idempotent."""
        ...


class Backend(BackendControl, Protocol[ArtifactT]):
    """One enforcement target. Implementations hold only connection options (table, netns...)."""

    def render(self, host_policy: HostPolicy) -> ArtifactT:
        """Pure: the native artifact enforcing ``host_policy``. Raises UnsupportedFeatureError/RenderError."""
        ...

    def apply(self, artifact: ArtifactT) -> None:
        """Atomically replace what this backend owns by ``artifact``. Raises ApplyError."""
        ...


# ---- optional capabilities ---------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """Differences between the kernel and the expected artifact; empty means in sync."""

    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@runtime_checkable
class Verifying(Protocol[ArtifactT_contra]):
    """A backend that can check, by meaning, that the kernel holds an artifact."""

    def verify(self, expected: ArtifactT_contra) -> VerifyReport:
        """What differs between the kernel and ``expected`` (tamper and drift detection)."""
        ...


@runtime_checkable
class VerifyingReadBack(Protocol[ArtifactT_contra]):
    """A verifying backend that can also give its read-back from the listing it verified (one
    kernel listing fewer after a full apply)."""

    def verify_read_back(self, expected: ArtifactT_contra) -> tuple[VerifyReport, str]:
        """``(verify(expected), read_back())`` from the same listings."""
        ...


@dataclass(frozen=True)
class NflogFlows:
    """The first packet of every new connection is logged to NFLOG ``group`` with a verdict
    prefix (:mod:`stockade.backends.flowlog`); bind the group in the backend's namespace."""

    group: int


class FlowEventStream(Protocol):
    """A reader of flow events written by the datapath itself (the eBPF ring buffer)."""

    def poll(self, timeout: float = 0.0) -> list[FlowEvent]:
        """Events written since the last call, waiting up to ``timeout`` seconds for the first."""
        ...

    def lost(self) -> int:
        """Events the datapath could not write (buffer full), cumulative."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EventFlows:
    """Flow events are read from a stream the backend opens (call ``open`` in the reading thread)."""

    open: Callable[[], FlowEventStream]


@runtime_checkable
class FlowSource(Protocol):
    """A backend whose datapath reports the verdict of every new connection."""

    def flow_source(self) -> NflogFlows | EventFlows:
        """Where the flows are reported."""
        ...


@dataclass(frozen=True)
class NetlinkGroup:
    """A netlink multicast group on which the kernel announces every change (nf_tables:
    ``NETLINK_NETFILTER`` / ``NFNLGRP_NFTABLES``, what ``nft monitor`` listens to), joined in
    network namespace ``netns`` (None: the agent's own)."""

    protocol: int
    group: int
    netns: str | None
    # the message that ends each transaction and names the thread that committed it (nf_tables:
    # NEWGEN, attribute NFTA_GEN_PROC_PID): a transaction of one of the agent's own threads (an
    # apply, a delta, a restore, each with its own read-back) then wakes nobody; None: every change does
    commit_type: int | None = None
    commit_tid_attr: int = 0


@runtime_checkable
class ChangeFeedSource(Protocol):
    """A backend whose kernel announces changes to what it owns."""

    def change_monitor(self) -> tuple[str, ...] | NetlinkGroup:
        """Where changes are announced: a netlink group to join, or the argv (no shell) of a command
        printing one line per change, running until stopped."""
        ...


@runtime_checkable
class PeerUpdating(Protocol):
    """A backend with a WireGuard tunnel (``Capability.ENCRYPT``) applies a peer delta over the
    tunnel's control socket, one peer at a time, without touching its ruleset. ``old``: the
    tunnel configuration in force (it names the keys of peers to remove or replace)."""

    def apply_peer_delta(self, old: WireGuardConfig, delta: PeerDelta) -> None: ...


@runtime_checkable
class TunnelReporting(Protocol):
    """A backend with a WireGuard tunnel says which implementation runs it: ``"kernel"`` (the
    module) or ``"wireguard-go"``; ``""`` while no tunnel is up. The agent reports changes."""

    def wireguard_datapath(self) -> str: ...


@runtime_checkable
class NetnsBound(Protocol):
    """A backend that programs a named network namespace (None: the caller's own)."""

    @property
    def netns(self) -> str | None: ...


# ---- the central capability check --------------------------------------------------


_PORTED = {Proto.TCP: Capability.TCP, Proto.UDP: Capability.UDP, Proto.SCTP: Capability.SCTP}


def _entry_needs(entry: ServiceEntry) -> Iterator[Capability]:
    proto = entry.proto
    if proto is Proto.ANY:
        yield Capability.ANY_PROTOCOL
    elif proto.has_ports:
        yield _PORTED[proto]
        if entry.first is not None and entry.last is not None and entry.last != entry.first:
            yield Capability.PORT_RANGES
    elif proto is Proto.ICMP:
        yield Capability.ICMP
        if entry.first is not None:
            yield Capability.ICMP_TYPES
    else:
        yield Capability.ICMPV6
        if entry.first is not None:
            yield Capability.ICMPV6_TYPES


_MODE_NEEDS: dict[EnforcementMode, tuple[Capability, ...]] = {
    EnforcementMode.IDLE: (),
    EnforcementMode.VISIBILITY: (Capability.MODE_VISIBILITY, Capability.VISIBILITY_LOG),
    EnforcementMode.SELECTIVE: (Capability.MODE_SELECTIVE,),
    EnforcementMode.FULL: (Capability.MODE_FULL,),
}


def required_capabilities(host_policy: HostPolicy) -> Iterator[tuple[Capability, str]]:
    """Every (feature, rule id) the host policy needs, in a deterministic order.

    An idle host needs nothing: the backend will not install anything for it.
    """
    if host_policy.mode is EnforcementMode.IDLE:
        return
    for cap in _MODE_NEEDS[host_policy.mode]:
        yield cap, f"mode:{host_policy.mode.value}"
    fs = host_policy.failsafe
    for entry in fs.management:
        yield Capability.INBOUND, "failsafe:management"
        for cap in _entry_needs(entry):
            yield cap, "failsafe:management"
    for net in fs.controller:
        yield Capability.CONTROLLER_FAILSAFE, "failsafe:controller"
        yield Capability.OUTBOUND, "failsafe:controller"
        yield (Capability.IPV4 if net.version == 4 else Capability.IPV6), "failsafe:controller"
    families = {(s.name, s.family): bool(s.members) for s in host_policy.sets}
    for rule in host_policy.rules:
        rid = rule.rule_id
        yield (Capability.INBOUND if rule.direction is Direction.INBOUND else Capability.OUTBOUND), rid
        if rule.action is Action.DENY:
            yield Capability.DENY, rid
        elif rule.action is Action.OVERRIDE_DENY:
            yield Capability.OVERRIDE_DENY, rid
        for entry in rule.services:
            yield from ((cap, rid) for cap in _entry_needs(entry))
        if rule.encrypt:
            yield Capability.ENCRYPT, rid
        if families.get((rule.peer, Family.V4)):
            yield Capability.IPV4, rid
        if families.get((rule.peer, Family.V6)):
            yield Capability.IPV6, rid


def check_capabilities(backend_name: str, capabilities: frozenset[Capability], host_policy: HostPolicy) -> None:
    """Fail closed: raise UnsupportedFeatureError for the first feature the backend lacks.

    IPv4/IPv6 are required only by peers that have members of that family, so a backend
    without IPv6 can still enforce a policy whose IPv6 sets are empty; a later delta that
    adds an IPv6 member must then go through a full render again.
    """
    for cap, rule_id in required_capabilities(host_policy):
        if cap not in capabilities:
            raise UnsupportedFeatureError(backend_name, cap.value, rule_id)


def check_delta_capabilities(
    backend_name: str, capabilities: frozenset[Capability], deltas: tuple[SetDelta, ...]
) -> None:
    """Fail closed for deltas: set deltas at all, and the families of the added members."""
    if not deltas:
        return
    if Capability.SET_DELTAS not in capabilities:
        raise UnsupportedFeatureError(backend_name, Capability.SET_DELTAS.value, f"set:{deltas[0].name}")
    for d in deltas:
        if d.added:
            cap = Capability.IPV4 if d.family is Family.V4 else Capability.IPV6
            if cap not in capabilities:
                raise UnsupportedFeatureError(backend_name, cap.value, f"set:{d.name}")
