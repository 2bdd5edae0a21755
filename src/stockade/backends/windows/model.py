"""The Windows Firewall backend's data model: rules, keywords, profile defaults (no logic).

Shared by the renderer (:mod:`stockade.backends.windows.render`), the script writer
(:mod:`stockade.backends.windows.script`) and the backend (:mod:`stockade.backends.windows.backend`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from stockade.backends.setalgebra import PeerExpr
from stockade.compiler.ir import HostPolicy
from stockade.model.addresses import AddressRanges, Family, Range, ranges_to_networks
from stockade.model.workloads import EnforcementMode

BACKEND_NAME = "windows"
RULE_GROUP = "Stockade"
KEYWORD_PREFIX = "stockade-"  # dynamic keyword names: stockade-<generation>-<peer expression>
RULE_PREFIX = "stk-"  # rule names: stk-<generation>-<number>
NOTHING_ADDRESS = "100::"  # RFC 6666 discard-only prefix: never a real peer
# IP protocol numbers other than ICMP (1), TCP (6), UDP (17) and ICMPv6 (58)
OTHER_PROTOCOL_RANGES: tuple[Range, ...] = ((0, 0), (2, 5), (7, 16), (18, 57), (59, 255))


class PeerMode(Enum):
    DYNAMIC_KEYWORDS = "dynamic-keywords"
    ADDRESS_LISTS = "address-lists"


class OtherProtocols(Enum):
    EXPAND = "expand"  # one block rule per remaining IP protocol number
    REFUSE = "refuse"  # fail closed


class WinDirection(Enum):
    INBOUND = "Inbound"
    OUTBOUND = "Outbound"


class WinAction(Enum):
    ALLOW = "Allow"
    BLOCK = "Block"


class WinProtocol(Enum):
    """``-Protocol`` values; OTHER is rendered as a loop over :data:`OTHER_PROTOCOL_RANGES`."""

    ANY = "Any"
    TCP = "TCP"
    UDP = "UDP"
    ICMPV4 = "ICMPv4"
    ICMPV6 = "ICMPv6"
    OTHER = "other"


class ProfileAction(Enum):
    ALLOW = "Allow"
    BLOCK = "Block"
    NOT_CONFIGURED = "NotConfigured"


class RemoteKind(Enum):
    ANY = "any"
    KEYWORD = "keyword"
    LIST = "list"


@dataclass(frozen=True)
class WinRemote:
    """The remote-address condition of a rule: any, a dynamic keyword, or an address list."""

    kind: RemoteKind
    keyword: str = ""  # KEYWORD: the keyword's Stockade name
    addresses: tuple[str, ...] = ()  # LIST: address items (see address_items), never empty


ANY_REMOTE = WinRemote(RemoteKind.ANY)


@dataclass(frozen=True)
class WinRule:
    """One ``New-NetFirewallRule`` (or a loop of them for WinProtocol.OTHER)."""

    number: int
    rule_id: str
    direction: WinDirection
    action: WinAction
    protocol: WinProtocol
    remote: WinRemote
    ports: tuple[Range, ...] = ()  # TCP/UDP: -LocalPort (inbound) / -RemotePort (outbound); () = any
    icmp_types: tuple[Range, ...] = ()  # ICMP: -IcmpType; () = any

    @property
    def name_suffix(self) -> str:
        return f"{self.number:04d}"


@dataclass(frozen=True)
class WinKeyword:
    """A dynamic keyword address: the addresses of one peer expression."""

    name: str
    expr: PeerExpr
    addresses: tuple[str, ...]  # address items (see address_items); () = no address

    def address_text(self) -> str:
        """The ``-Addresses`` value: comma-separated items, or the nothing-address when empty."""
        return ",".join(self.addresses) or NOTHING_ADDRESS


@dataclass(frozen=True)
class WindowsPlan:
    """Everything the script installs. ``present`` False (idle): remove everything."""

    workload: str
    mode: EnforcementMode
    peer_mode: PeerMode
    present: bool
    keywords: tuple[WinKeyword, ...]
    rules: tuple[WinRule, ...]
    default_inbound: ProfileAction
    default_outbound: ProfileAction
    log_allowed: bool
    log_blocked: bool

    def keyword(self, name: str) -> WinKeyword:
        for k in self.keywords:
            if k.name == name:
                return k
        raise KeyError(name)


@dataclass(frozen=True)
class WindowsArtifact:
    """A plan, the PowerShell script that installs it (what ``stockade render`` prints), and
    the host policy it came from (set deltas are folded into it to recompute keywords)."""

    plan: WindowsPlan
    script: str
    host_policy: HostPolicy

    def to_text(self) -> str:
        return self.script


def address_items(ranges: AddressRanges) -> tuple[str, ...]:
    """Windows remote-address items for ``ranges``: ``a``, ``a/len`` or ``first-last`` per range.

    A merged range that is one CIDR block is written as that block, any other as a range,
    which Windows accepts for rules and keywords alike (far shorter than a CIDR cover).
    """
    items: list[str] = []
    for family, fam_ranges in ((Family.V4, ranges.v4), (Family.V6, ranges.v6)):
        for lo, hi in fam_ranges:
            nets = ranges_to_networks(((lo, hi),), family)
            if len(nets) == 1:
                net = nets[0]
                items.append(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net))
            else:
                items.append(f"{_address(lo, family)}-{_address(hi, family)}")
    return tuple(items)


def _address(value: int, family: Family) -> str:
    return str(ipaddress.IPv4Address(value) if family is Family.V4 else ipaddress.IPv6Address(value))
