"""The iptables+ipset backend's data: chains, ipsets, names and address spellings (no logic).

Shared by the renderer (:mod:`stockade.backends.iptables.render`), the script builders
(:mod:`stockade.backends.iptables.scripts`), the runner and the backend, so none of them
imports another for its types.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from stockade.model.addresses import Family, IPNetwork

IPSET_NAME_MAX = 31  # IPSET_MAXNAMELEN is 32 including the NUL
TEMP_SUFFIX = "-t"  # a set's new members are loaded under <name>-t, then swapped in
SET_MAXELEM = 1 << 22  # one constant for every set: ``create -exist`` then never conflicts


_LOOKUP_CHAIN_RE = re.compile(r"-(?:IN|OUT)-(?:end|[oad](?:-[tu][0-9]{1,6})?)")


class IptablesVariant(Enum):
    """Which iptables: the legacy x_tables kernel API or the nf_tables one (``iptables-nft``)."""

    LEGACY = "legacy"
    NFT = "nft"

    def tool(self, family: Family, action: str) -> str:
        """Binary name, e.g. ``ip6tables-nft-restore`` for (V6, "restore")."""
        base = "iptables" if family is Family.V4 else "ip6tables"
        return f"{base}-{self.value}-{action}"


class Layout(Enum):
    """How the host rules are evaluated: a tree of chains by port per tier (default), or the historic list."""

    LOOKUP = "lookup"
    LIST = "list"


class DeltaPath(Enum):
    """How set deltas reach the kernel: ipset netlink messages (default; the ``ipset`` command
    when the kernel refuses them), or always the ``ipset`` command."""

    NETLINK = "netlink"
    IPSET_CLI = "ipset-cli"


class Hook(Enum):
    """The built-in filter chains Stockade jumps from."""

    INPUT = "INPUT"
    OUTPUT = "OUTPUT"
    FORWARD = "FORWARD"


@dataclass(frozen=True)
class ChainNames:
    """Every chain name of one prefix: the three entry chains and the two heads (``-IN``/``-OUT``)."""

    prefix: str

    def entry(self, hook: Hook) -> str:
        return f"{self.prefix}-{hook.value}"

    @property
    def inbound(self) -> str:
        return f"{self.prefix}-IN"

    @property
    def outbound(self) -> str:
        return f"{self.prefix}-OUT"

    @property
    def all(self) -> tuple[str, ...]:
        return self._fixed

    @cached_property
    def _fixed(self) -> tuple[str, ...]:
        return (*(self.entry(h) for h in Hook), self.inbound, self.outbound)

    def owns(self, name: str) -> bool:
        """Whether ``name`` is a chain Stockade writes: the five above or one of the lookup
        layout's (``-IN-a``, ``-IN-a-t3``, ``-IN-end``; see ``lookup.py``).
        Anything else, even ``<prefix>-SOMETHING``, is someone else's and never touched."""
        if name in self._fixed:
            return True
        return name.startswith(self.prefix + "-") and _LOOKUP_CHAIN_RE.fullmatch(name[len(self.prefix) :]) is not None


@dataclass(frozen=True)
class IpSet:
    """One ``hash:net`` ipset (one family). ``members`` are what ``ipset add`` receives."""

    name: str
    family: Family
    members: tuple[IPNetwork, ...]

    @property
    def temp_name(self) -> str:
        return self.name + TEMP_SUFFIX

    @property
    def ipset_family(self) -> str:
        return "inet" if self.family is Family.V4 else "inet6"

    @property
    def hashsize(self) -> int:
        """Initial hash size: room for every member at once (fewer resizes while loading)."""
        size = 64
        while size < len(self.members) and size < (1 << 20):
            size <<= 1
        return size

    def create_line(self, name: str) -> str:
        return f"create {name} hash:net family {self.ipset_family} hashsize {self.hashsize} maxelem {SET_MAXELEM}"


@dataclass(frozen=True)
class IptChain:
    """A Stockade chain: rule specs as ``iptables-save`` prints them after ``-A <name> ``."""

    name: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class FamilyRuleset:
    """Stockade's chains in one family's filter table and the built-in chains jumping to them."""

    family: Family
    chains: tuple[IptChain, ...]
    hooks: tuple[Hook, ...]

    def chain(self, name: str) -> IptChain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)


def _ntop(net: IPNetwork) -> str:
    value = int(net.network_address)
    if net.version == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def address_text(net: IPNetwork) -> str:
    """A set member as ``ipset save`` prints it (``inet_ntop``): bare for a single host."""
    text = _ntop(net)
    return text if net.prefixlen == net.max_prefixlen else f"{text}/{net.prefixlen}"


def cidr_text(net: IPNetwork) -> str:
    """An address match as ``iptables-save`` prints it: always with the prefix length."""
    return f"{_ntop(net)}/{net.prefixlen}"


def ipset_members(members: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Members as a ``hash:net`` set can hold them: ``/0`` (refused by the kernel) as two ``/1``."""
    out: list[IPNetwork] = []
    for m in members:
        out.extend(m.subnets(prefixlen_diff=1) if m.prefixlen == 0 else (m,))
    return tuple(out)
