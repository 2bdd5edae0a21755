"""Probes the kernel lab sends, and the frozen records of what happened.

A ``Probe`` is one connection attempt from a lab host to another: a TCP connect
(answered by a banner naming the server's host), a UDP request/response (echoed),
an SCTP INIT answered by an INIT-ACK, or an ICMP/ICMPv6 echo. Probes travel to the
in-namespace agent as JSON and come back as ``ProbeResult`` records; this module owns both
encodings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from stockade.model.addresses import Family, IPAddress, family_of
from stockade.model.services import Proto


class ProbeKind(Enum):
    """What a probe attempts."""

    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"  # an INIT answered by an INIT-ACK (raw sockets: the lab kernel has no SCTP stack)
    ICMP_ECHO = "icmp-echo"

    def proto(self, family: Family) -> Proto:
        """The model's protocol for this probe in ``family`` (ICMP echo is ICMPv6 on v6)."""
        if self is ProbeKind.TCP:
            return Proto.TCP
        if self is ProbeKind.UDP:
            return Proto.UDP
        if self is ProbeKind.SCTP:
            return Proto.SCTP
        return Proto.ICMP if family is Family.V4 else Proto.ICMPV6


ICMP_ECHO_REQUEST = {Family.V4: 8, Family.V6: 128}


class Outcome(Enum):
    """How a probe ended. Only ``OK`` means the traffic got through both ways."""

    OK = "ok"
    REFUSED = "refused"  # TCP RST or ICMP port unreachable: reached a host, nothing listening
    TIMEOUT = "timeout"  # silence: dropped somewhere
    UNREACHABLE = "unreachable"  # an ICMP error (e.g. a reject rule) came back
    ERROR = "error"  # anything else (wrong answer, local error)


@dataclass(frozen=True)
class Probe:
    """One attempt from ``src`` (on lab host ``src_host``) to ``dst`` (on ``dst_host``).

    ``port`` is the TCP/UDP port; None for ICMP echo.
    """

    src_host: str
    dst_host: str
    kind: ProbeKind
    src: IPAddress
    dst: IPAddress
    port: int | None = None

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError(f"probe mixes address families: {self.src} -> {self.dst}")
        if (self.port is None) != (self.kind is ProbeKind.ICMP_ECHO):
            raise ValueError(f"{self.kind.value} probe with port {self.port}")

    @property
    def family(self) -> Family:
        return family_of(self.src)

    @property
    def proto(self) -> Proto:
        return self.kind.proto(self.family)

    @property
    def evaluator_port(self) -> int:
        """The port the evaluator is asked about: the ICMP type for echo."""
        if self.port is not None:
            return self.port
        return ICMP_ECHO_REQUEST[self.family]

    def service_text(self) -> str:
        if self.kind is ProbeKind.ICMP_ECHO:
            return "echo/icmp" if self.family is Family.V4 else "echo/icmpv6"
        return f"{self.port}/{self.kind.value}"

    def __str__(self) -> str:
        return f"{self.src_host}({self.src}) -> {self.dst_host}({self.dst}) {self.service_text()}"


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    outcome: Outcome
    elapsed_ms: float
    detail: str = ""

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.OK


def probe_to_wire(index: int, probe: Probe, timeout: float) -> dict[str, Any]:
    return {
        "id": index,
        "kind": probe.kind.value,
        "src": str(probe.src),
        "dst": str(probe.dst),
        "port": probe.port,
        "timeout": timeout,
        "expect": probe.dst_host,
    }


def result_from_wire(probe: Probe, wire: dict[str, Any]) -> ProbeResult:
    return ProbeResult(
        probe=probe,
        outcome=Outcome(wire["outcome"]),
        elapsed_ms=float(wire["ms"]),
        detail=str(wire.get("detail", "")),
    )


def probe_matrix(
    hosts: Sequence[tuple[str, Sequence[IPAddress]]],
    *,
    tcp_ports: Iterable[int] = (),
    udp_ports: Iterable[int] = (),
    sctp_ports: Iterable[int] = (),
    icmp: bool = True,
    families: Iterable[Family] = (Family.V4, Family.V6),
) -> tuple[Probe, ...]:
    """Every ordered pair of distinct hosts × every port × every family both hosts have.

    ``hosts`` is ``(name, addresses)``; the first address of each family is used.
    """
    tcp = sorted(set(tcp_ports))
    udp = sorted(set(udp_ports))
    sctp = sorted(set(sctp_ports))
    fams = sorted(set(families))
    out: list[Probe] = []
    for src_name, src_addrs in hosts:
        for dst_name, dst_addrs in hosts:
            if src_name == dst_name:
                continue
            for fam in fams:
                src = first_of_family(src_addrs, fam)
                dst = first_of_family(dst_addrs, fam)
                if src is None or dst is None:
                    continue
                out += [Probe(src_name, dst_name, ProbeKind.TCP, src, dst, p) for p in tcp]
                out += [Probe(src_name, dst_name, ProbeKind.UDP, src, dst, p) for p in udp]
                out += [Probe(src_name, dst_name, ProbeKind.SCTP, src, dst, p) for p in sctp]
                if icmp:
                    out.append(Probe(src_name, dst_name, ProbeKind.ICMP_ECHO, src, dst))
    return tuple(out)


def first_of_family(addresses: Iterable[IPAddress], family: Family) -> IPAddress | None:
    for a in addresses:
        if family_of(a) is family:
            return a
    return None


def parse_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text)
