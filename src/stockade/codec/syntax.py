"""The small textual syntaxes inside policy files: service ports, CIDRs and addresses.

Each ``parse_*`` raises ``BadValue`` with a message for the user; each ``format_*`` is its
exact inverse, so that ``dump_policy`` writes what ``load_policy`` reads.

Service entry syntax::

    any                 every protocol and port
    tcp | udp           every port of that protocol
    443/tcp             one port
    8000-8080/tcp       an inclusive range
    icmp | icmpv6       every ICMP / ICMPv6 type
    icmp:8 | icmpv6:128 one ICMP type, by number
    icmp:echo-request   one ICMP type, by its nftables name (written back as the number)

Workload addresses are host addresses: ``parse_workload_address`` refuses the ones that can
never be a workload's own, i.e. exactly the ones the agent never reports (unspecified
``0.0.0.0``/``::``, loopback, link-local, multicast) plus IPv4's reserved class E
``240.0.0.0/4``, which holds the limited broadcast ``255.255.255.255``. Such an address in a
peer set would make a rule about one workload match every host or none.
"""

from __future__ import annotations

import ipaddress
import re

from stockade.codec.tree import quote as _q
from stockade.model.addresses import IPAddress, IPNetwork
from stockade.model.services import Proto, ServiceEntry

PORT_FORMS = '"443/tcp", "8000-8080/tcp", "53/udp", "3868/sctp", "tcp", "icmp", "icmp:8", "icmpv6:128" or "any"'

_PORTS_RE = re.compile(r"^([0-9]+)(?:-([0-9]+))?/([a-z0-9]+)$")
_ICMP_RE = re.compile(r"^(icmp|icmpv6):([0-9]+|[a-z][a-z0-9-]*)$")
_WHOLE = {"any": Proto.ANY, "tcp": Proto.TCP, "udp": Proto.UDP, "icmp": Proto.ICMP, "icmpv6": Proto.ICMPV6,
          "sctp": Proto.SCTP}


# The type names nftables uses (``nft describe icmp_type`` / ``icmpv6_type``).
ICMP_TYPE_NAMES: dict[Proto, dict[str, int]] = {
    Proto.ICMP: {
        "echo-reply": 0,
        "destination-unreachable": 3,
        "source-quench": 4,
        "redirect": 5,
        "echo-request": 8,
        "router-advertisement": 9,
        "router-solicitation": 10,
        "time-exceeded": 11,
        "parameter-problem": 12,
        "timestamp-request": 13,
        "timestamp-reply": 14,
        "info-request": 15,
        "info-reply": 16,
        "address-mask-request": 17,
        "address-mask-reply": 18,
    },
    Proto.ICMPV6: {
        "destination-unreachable": 1,
        "packet-too-big": 2,
        "time-exceeded": 3,
        "parameter-problem": 4,
        "echo-request": 128,
        "echo-reply": 129,
        "mld-listener-query": 130,
        "mld-listener-report": 131,
        "mld-listener-done": 132,
        "nd-router-solicit": 133,
        "nd-router-advert": 134,
        "nd-neighbor-solicit": 135,
        "nd-neighbor-advert": 136,
        "nd-redirect": 137,
        "router-renumbering": 138,
        "ind-neighbor-solicit": 141,
        "ind-neighbor-advert": 142,
        "mld2-listener-report": 143,
    },
}


class BadValue(ValueError):
    """A value does not follow its syntax; the message is meant for the user."""


def parse_service_entry(text: str) -> ServiceEntry:
    if text in _WHOLE:
        return ServiceEntry(_WHOLE[text])
    icmp = _ICMP_RE.match(text)
    if icmp:
        proto = Proto(icmp.group(1))
        icmp_type = icmp_type_number(proto, icmp.group(2))
        return ServiceEntry(proto, icmp_type, icmp_type)
    ports = _PORTS_RE.match(text)
    if not ports:
        raise BadValue(f"cannot read {_q(text)} as a service port; expected {PORT_FORMS}")
    proto_text = ports.group(3)
    if proto_text not in ("tcp", "udp", "sctp"):
        raise BadValue(f"unknown protocol {_q(proto_text)} in {_q(text)} (ports need tcp, udp or sctp)")
    first, last = (
        _number(digits, f"port {_short(digits)} is out of range (1-65535)", 1, 65535)
        for digits in (ports.group(1), ports.group(2) or ports.group(1))
    )
    if first > last:
        raise BadValue(f"port range {first}-{last} is reversed (did you mean {last}-{first}?)")
    return ServiceEntry(Proto(proto_text), first, last)


def icmp_type_number(proto: Proto, text: str) -> int:
    """An ICMP/ICMPv6 type given as a number (0-255) or by name (``echo-request``)."""
    if text.isascii() and text.isdigit():
        return _number(text, f"ICMP type {_short(text)} is out of range (0-255)", 0, 255)
    names = ICMP_TYPE_NAMES[proto]
    if text not in names:
        raise BadValue(f"unknown {proto.value} type {_q(text)} (a number 0-255 or a name such as echo-request)")
    return names[text]


def _short(digits: str) -> str:
    return digits if len(digits) <= 12 else digits[:9] + "..."


def _number(digits: str, message: str, low: int, high: int) -> int:
    """``digits`` as an int within [low, high] (never converts absurdly long digit strings)."""
    value = int(digits) if len(digits) <= 6 else high + 1
    if not low <= value <= high:
        raise BadValue(message)
    return value


def format_service_entry(entry: ServiceEntry) -> str:
    if entry.proto is Proto.ANY:
        return "any"
    if entry.first is None:
        return str(entry.proto.value)
    if entry.proto.is_icmp:
        return f"{entry.proto.value}:{entry.first}"
    last = entry.last if entry.last is not None else entry.first
    if last == entry.first:
        return f"{entry.first}/{entry.proto.value}"
    return f"{entry.first}-{last}/{entry.proto.value}"


def parse_network(text: str) -> IPNetwork:
    """A CIDR (``10.0.0.0/8``, ``fd00::/8``) or a bare address (meaning /32 or /128)."""
    if "%" in text:
        raise BadValue(f"scoped addresses are not supported: {_q(text)}")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            raise BadValue(f"{_q(text)} has host bits set (did you mean {fixed}?)") from None
        raise BadValue(f"not a valid CIDR: {_q(text)}") from None


def parse_workload_address(text: str) -> IPAddress:
    """A workload's own address: ``parse_address`` minus the addresses no host can own."""
    address = parse_address(text)
    what = non_host_address(address)
    if what:
        raise BadValue(f"{address} is {what}, not a workload address")
    return address


def non_host_address(address: IPAddress) -> str:
    """What makes ``address`` unfit as a workload's own address ("" when it is fit)."""
    if address.is_unspecified:
        return "the unspecified address"
    if address.version == 4 and int(address) == 0xFFFFFFFF:
        return "the broadcast address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address"
    if address.version == 4 and address in _CLASS_E:
        return "a reserved (class E) address"
    return ""


_CLASS_E = ipaddress.ip_network("240.0.0.0/4")


def parse_address(text: str) -> IPAddress:
    """One IPv4 or IPv6 address, without a prefix length."""
    if "%" in text:
        raise BadValue(f"scoped addresses are not supported: {_q(text)}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        hint = " (write the address without a prefix length)" if "/" in text else ""
        raise BadValue(f"not a valid IP address: {_q(text)}{hint}") from None
