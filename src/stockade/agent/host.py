"""What the agent reports about its host: frozen records, built from rtnetlink messages (pure).

:mod:`stockade.agent.hostinfo` reads the messages from the kernel (pyroute2) and watches
for changes; this module holds the records and the pure conversion, so the transport and
its tests need no netlink.
"""

from __future__ import annotations

import contextlib
import ipaddress
import platform
from dataclasses import dataclass
from typing import Any

from stockade.model.addresses import IPAddress

IFF_LOOPBACK = 0x8


@dataclass(frozen=True, order=True)
class InterfaceReport:
    name: str
    addresses: tuple[IPAddress, ...]  # sorted: IPv4 first, then IPv6


@dataclass(frozen=True)
class HostReport:
    hostname: str
    os: str
    interfaces: tuple[InterfaceReport, ...]  # sorted by name

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return tuple(sorted({a for i in self.interfaces for a in i.addresses}, key=_addr_key))

    def to_dict(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "os": self.os,
            "interfaces": [
                {"name": i.name, "addresses": [str(a) for a in i.addresses]} for i in self.interfaces
            ],
        }


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return a.version, int(a)


def os_description() -> str:
    """``Linux 6.1.0 (Debian GNU/Linux 12 (bookworm))``-style text."""
    pretty = ""
    with contextlib.suppress(OSError):
        pretty = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    base = f"{platform.system()} {platform.release()}"
    return f"{base} ({pretty})" if pretty else base


def _reportable(addr: IPAddress) -> bool:
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


def host_report_from_netlink(
    links: list[Any], addrs: list[Any], hostname: str, os_text: str
) -> HostReport:
    """Build the report from pyroute2 link and address messages (pure; tested with fakes)."""
    names: dict[int, str] = {}
    loopback: set[int] = set()
    for link in links:
        index = int(link.get("index"))
        names[index] = str(link.get_attr("IFLA_IFNAME"))
        if int(link.get("flags") or 0) & IFF_LOOPBACK:
            loopback.add(index)
    per_if: dict[str, set[IPAddress]] = {name: set() for i, name in names.items() if i not in loopback}
    for msg in addrs:
        index = int(msg.get("index"))
        if index in loopback or index not in names:
            continue
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if text is None:
            continue
        addr = ipaddress.ip_address(str(text).split("%")[0])
        if _reportable(addr):
            per_if[names[index]].add(addr)
    interfaces = tuple(
        InterfaceReport(name, tuple(sorted(addrs_, key=_addr_key))) for name, addrs_ in sorted(per_if.items())
    )
    return HostReport(hostname=hostname, os=os_text, interfaces=interfaces)
