"""Services: named sets of protocol/port (or ICMP type) matches."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Proto(Enum):
    """Transport protocol of a service entry; ANY matches every protocol."""

    ANY = "any"
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "icmpv6"
    SCTP = "sctp"  # last: adding it left the order (and every hash) of the others unchanged

    def __lt__(self, other: Proto) -> bool:
        return _PROTO_ORDER[self] < _PROTO_ORDER[other]

    @property
    def has_ports(self) -> bool:
        return self in (Proto.TCP, Proto.UDP, Proto.SCTP)

    @property
    def is_icmp(self) -> bool:
        return self in (Proto.ICMP, Proto.ICMPV6)


_PROTO_ORDER = {p: i for i, p in enumerate(Proto)}


@dataclass(frozen=True)
class ServiceEntry:
    """One match. For TCP/UDP/SCTP, ``first..last`` is a port range (None: every port).

    For ICMP/ICMPv6, ``first`` is the type (None: every type) and ``last`` equals it.
    For ANY, both are None.
    """

    proto: Proto
    first: int | None = None
    last: int | None = None

    def matches(self, proto: Proto, port: int | None) -> bool:
        if self.proto is Proto.ANY:
            return True
        if self.proto is not proto:
            return False
        if self.first is None:
            return True
        if port is None:
            return False
        last = self.last if self.last is not None else self.first
        return self.first <= port <= last

    def sort_key(self) -> tuple[int, int, int]:
        """Total order; a port-less entry (every port/type) sorts before ported ones."""
        first = -1 if self.first is None else self.first
        last = first if self.last is None else self.last
        return _PROTO_ORDER[self.proto], first, last

    def __lt__(self, other: ServiceEntry) -> bool:
        return self.sort_key() < other.sort_key()

    def __le__(self, other: ServiceEntry) -> bool:
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: ServiceEntry) -> bool:
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: ServiceEntry) -> bool:
        return self.sort_key() >= other.sort_key()

    def __str__(self) -> str:
        if self.proto is Proto.ANY:
            return "any"
        if self.first is None:
            return str(self.proto.value)
        if self.last is not None and self.last != self.first:
            return f"{self.first}-{self.last}/{self.proto.value}"
        return f"{self.first}/{self.proto.value}"


ANY_SERVICE_ENTRY = ServiceEntry(Proto.ANY)


@dataclass(frozen=True, order=True)
class Service:
    """A named service such as ``https`` = 443/tcp."""

    name: str
    entries: tuple[ServiceEntry, ...]
    description: str = ""

    def matches(self, proto: Proto, port: int | None) -> bool:
        return any(e.matches(proto, port) for e in self.entries)
