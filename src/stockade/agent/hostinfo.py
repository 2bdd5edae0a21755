"""What the agent tells the controller about its host, read through rtnetlink (pyroute2).

:func:`read_host` returns a frozen :class:`HostReport`: hostname, OS, and every interface
with its IPv4/IPv6 addresses (loopback and link-local addresses are left out: policy never
names them). :class:`AddressWatcher` subscribes to the kernel's ``RTM_NEWADDR`` /
``RTM_DELADDR`` (and link) multicast groups and calls back once per burst of changes,
so a re-addressed host is reported at once, without polling.
"""

from __future__ import annotations

import contextlib
import ipaddress
import platform
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import (  # type: ignore[import-untyped]
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)

from stockade.model.addresses import IPAddress

IFF_LOOPBACK = 0x8
DEBOUNCE_SECONDS = 0.05  # changes arriving together (ip addr replace) become one report


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


def read_host() -> HostReport:
    """The current host report, from this process's network namespace."""
    with IPRoute() as ipr:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
    return host_report_from_netlink(links, addrs, socket.gethostname(), os_description())


class AddressWatcher:
    """Calls ``on_change()`` after each burst of address/link changes (netlink events).

    Runs one daemon thread; ``stop()`` ends it within ~0.2 s. Callback exceptions are
    passed to ``on_error`` and do not stop the watcher.
    """

    def __init__(self, on_change: Callable[[], None], on_error: Callable[[BaseException], None]) -> None:
        self._on_change = on_change
        self._on_error = on_error
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stockade-addr-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        try:
            ipr = IPRoute()
        except Exception as exc:
            self._on_error(exc)
            self._ready.set()
            return
        try:
            ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK)
            self._ready.set()
            fd = ipr.fileno()
            while not self._stop.is_set():
                readable, _, _ = select.select([fd], [], [], 0.2)
                if not readable:
                    continue
                ipr.get()
                # Drain whatever else arrives in the same burst, then report once.
                while select.select([fd], [], [], DEBOUNCE_SECONDS)[0]:
                    ipr.get()
                try:
                    self._on_change()
                except Exception as exc:
                    self._on_error(exc)
        except Exception as exc:
            if not self._stop.is_set():
                self._on_error(exc)
        finally:
            self._ready.set()
            ipr.close()
