"""The nftables artifact as data: hooks, chain policies, layouts, sets and chains, and their text
(split from :mod:`stockade.backends.nftables.render`, which builds them from a HostPolicy)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from stockade.backends.common import (
    safe_text,
)
from stockade.backends.nftables.lookup import (
    FLOWLOG_SETS,
    TierMap,
    flowlog_set_text,
    map_text,
)
from stockade.compiler.ir import WireGuardConfig
from stockade.model.addresses import Family, IPAddress, IPNetwork
from stockade.model.workloads import EnforcementMode


def net_element(net: IPNetwork) -> str:
    """A set element as nft prints it: bare address for a host, CIDR otherwise.

    Formatted through ``inet_ntop`` (5x faster than ``str`` on ipaddress objects, which
    matters at 100k elements); IPv6 addresses in ``::/80`` keep Python's spelling, where
    C libraries may print an embedded IPv4 address instead.
    """
    value = int(net.network_address)
    if net.version == 4:
        text = socket.inet_ntoa(value.to_bytes(4, "big"))
    elif value >> 48:
        text = socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
    else:
        text = str(net.network_address)
    return text if net.prefixlen == net.max_prefixlen else f"{text}/{net.prefixlen}"


class Hook(Enum):
    INPUT = "input"
    OUTPUT = "output"
    FORWARD = "forward"
    POSTROUTING = "postrouting"


class ChainPolicy(Enum):
    ACCEPT = "accept"
    DROP = "drop"


class Layout(Enum):
    """How the host rules are evaluated: verdict-map lookups per tier (default), or the
    historic list of rule lines (kept selectable for the benchmark's side-by-side)."""

    LOOKUP = "lookup"
    LIST = "list"


class SetKind(Enum):
    """Single addresses in a hash set, or CIDR blocks in an interval set."""

    HOST = "host"
    NET = "net"

    def __lt__(self, other: SetKind) -> bool:
        return self.value < other.value


@dataclass(frozen=True)
class NftSet:
    """One named set of one family and kind."""

    name: str
    family: Family
    kind: SetKind
    members: tuple[IPNetwork, ...]

    @property
    def type_name(self) -> str:
        return "ipv4_addr" if self.family is Family.V4 else "ipv6_addr"


@dataclass(frozen=True)
class NftChain:
    """A chain: base chain when ``hook`` is set. ``rules`` are nft statements, one per rule."""

    name: str
    hook: Hook | None
    policy: ChainPolicy | None
    rules: tuple[str, ...]
    chain_type: str = "filter"  # "route": the output chain that steers encrypted rules' packets
    priority: str = "filter"

    def header(self) -> str | None:
        """The base-chain line exactly as ``nft list`` prints it."""
        if self.hook is None:
            return None
        policy = self.policy or ChainPolicy.ACCEPT
        return f"type {self.chain_type} hook {self.hook.value} priority {self.priority}; policy {policy.value};"


@dataclass(frozen=True)
class NftablesArtifact:
    """The rendered table. ``present`` False (idle) means: the table must not exist."""

    table: str
    workload: str
    mode: EnforcementMode
    present: bool
    sets: tuple[NftSet, ...]
    chains: tuple[NftChain, ...]
    maps: tuple[TierMap, ...] = ()
    layout: Layout = Layout.LOOKUP
    wireguard: WireGuardConfig | None = None  # the tunnel the backend brings up beside the table
    local_addresses: tuple[IPAddress, ...] = ()  # with ``wireguard``: a change re-sets peer endpoints

    def to_text(self) -> str:
        """The complete ``nft -f`` transaction (replace the table, or only delete it)."""
        return self._text

    @cached_property
    def _text(self) -> str:
        # computed once per artifact (a frozen value), so a retried apply does not re-format
        name = safe_text(self.workload)
        out = [
            f"# Stockade nftables ruleset: workload {name}, mode {self.mode.value}",
            f"table inet {self.table}",
            f"delete table inet {self.table}",
        ]
        if self.present:
            out.append(f"table inet {self.table} {{")
            blocks = [_set_text(s) for s in self.sets] + [map_text(m) for m in self.maps]
            if self.layout is Layout.LOOKUP:
                blocks += [flowlog_set_text(name) for name in FLOWLOG_SETS]
            blocks += [_chain_text(c) for c in self.chains]
            out.append("\n\n".join(blocks))
            out.append("}")
        return "\n".join(out) + "\n"

    def set_named(self, name: str) -> NftSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)


def _set_text(s: NftSet) -> str:
    lines = [f"\tset {s.name} {{", f"\t\ttype {s.type_name}"]
    if s.kind is SetKind.NET:
        lines.append("\t\tflags interval")
    if s.members:
        elems = [net_element(m) for m in s.members]
        if len(elems) <= 4:
            lines.append(f"\t\telements = {{ {', '.join(elems)} }}")
        else:
            lines.append("\t\telements = {")
            lines.append(",\n".join(f"\t\t\t{e}" for e in elems))
            lines.append("\t\t}")
    lines.append("\t}")
    return "\n".join(lines)


def _chain_text(c: NftChain) -> str:
    lines = [f"\tchain {c.name} {{"]
    header = c.header()
    if header is not None:
        lines.append(f"\t\t{header}")
    lines.extend(f"\t\t{r}" for r in c.rules)
    lines.append("\t}")
    return "\n".join(lines)


# ---- names and values ---------------------------------------------------------------
