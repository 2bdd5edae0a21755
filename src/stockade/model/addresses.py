"""IP addresses, CIDR arithmetic and IP lists.

Sets of addresses are kept as sorted, merged integer ranges per family, so that
membership, subtraction and conversion to minimal CIDRs are fast and deterministic.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Family(Enum):
    """Address family. Sets never mix families."""

    V4 = 4
    V6 = 6

    def __lt__(self, other: Family) -> bool:
        return self.value < other.value

    @property
    def bits(self) -> int:
        return 32 if self is Family.V4 else 128


def family_of(net: IPNetwork | IPAddress) -> Family:
    return Family.V4 if net.version == 4 else Family.V6


def address_key(a: IPAddress) -> tuple[int, int]:
    """Total order of addresses: IPv4 first, then by value."""
    return a.version, int(a)


def network_key(n: IPNetwork) -> tuple[int, int, int]:
    """Total order of networks: IPv4 first, then by first address, then by prefix length."""
    return n.version, int(n.network_address), n.prefixlen


Range = tuple[int, int]  # inclusive [first, last]


def merge_ranges(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sort and merge overlapping or adjacent inclusive ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def subtract_ranges(keep: tuple[Range, ...], remove: tuple[Range, ...]) -> tuple[Range, ...]:
    """``keep`` minus ``remove``; both merged and sorted."""
    out: list[Range] = []
    j = 0
    for lo, hi in keep:
        cur = lo
        while j < len(remove) and remove[j][1] < cur:
            j += 1
        k = j
        while k < len(remove) and remove[k][0] <= hi:
            rlo, rhi = remove[k]
            if rlo > cur:
                out.append((cur, rlo - 1))
            cur = max(cur, rhi + 1)
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def ranges_to_networks(ranges: Iterable[Range], family: Family) -> tuple[IPNetwork, ...]:
    """Minimal CIDR cover of merged ranges, in address order."""
    bits = family.bits
    cls = ipaddress.IPv4Network if family is Family.V4 else ipaddress.IPv6Network
    out: list[IPNetwork] = []
    for lo, hi in ranges:
        cur = lo
        while cur <= hi:
            # largest block aligned at cur that fits in [cur, hi]
            size = (cur & -cur).bit_length() - 1 if cur else bits
            span = (hi - cur + 1).bit_length() - 1
            size = min(size, span)
            out.append(cls((cur, bits - size)))
            cur += 1 << size
    return tuple(out)


def network_range(net: IPNetwork) -> Range:
    return int(net.network_address), int(net.broadcast_address)


@dataclass(frozen=True, order=True)
class AddressRanges:
    """An immutable set of addresses of both families, as merged ranges."""

    v4: tuple[Range, ...] = ()
    v6: tuple[Range, ...] = ()

    @staticmethod
    def of(networks: Iterable[IPNetwork | IPAddress]) -> AddressRanges:
        v4: list[Range] = []
        v6: list[Range] = []
        for n in networks:
            net = ipaddress.ip_network(n) if not isinstance(n, IPNetwork) else n
            (v4 if net.version == 4 else v6).append(network_range(net))
        return AddressRanges(merge_ranges(v4), merge_ranges(v6))

    def minus(self, other: AddressRanges) -> AddressRanges:
        return AddressRanges(subtract_ranges(self.v4, other.v4), subtract_ranges(self.v6, other.v6))

    def union(self, other: AddressRanges) -> AddressRanges:
        return AddressRanges(merge_ranges(self.v4 + other.v4), merge_ranges(self.v6 + other.v6))

    def networks(self, family: Family) -> tuple[IPNetwork, ...]:
        return ranges_to_networks(self.v4 if family is Family.V4 else self.v6, family)

    def contains(self, addr: IPAddress) -> bool:
        value = int(addr)
        for lo, hi in self.v4 if addr.version == 4 else self.v6:
            if lo <= value <= hi:
                return True
            if lo > value:
                return False
        return False

    def is_empty(self) -> bool:
        return not self.v4 and not self.v6


@dataclass(frozen=True, order=True)
class IPList:
    """Named CIDRs with exclusions, IPv4 and IPv6 (Illumio's IP list)."""

    name: str
    include: tuple[IPNetwork, ...]
    exclude: tuple[IPNetwork, ...] = ()
    description: str = ""

    def ranges(self) -> AddressRanges:
        return AddressRanges.of(self.include).minus(AddressRanges.of(self.exclude))
