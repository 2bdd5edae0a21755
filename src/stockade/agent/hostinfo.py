"""Reading the host through rtnetlink (pyroute2), and watching it for address changes.

:func:`read_host` returns a frozen :class:`~stockade.agent.host.HostReport`: hostname, OS,
and every interface with its IPv4/IPv6 addresses (loopback and link-local addresses are
left out: policy never names them). :class:`AddressWatcher` subscribes to the kernel's
``RTM_NEWADDR`` / ``RTM_DELADDR`` (and link) multicast groups and calls back once per burst
of changes, so a re-addressed host is reported at once, without polling.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import (  # type: ignore[import-untyped]
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)

from stockade.agent.host import HostReport, host_report_from_netlink, os_description

__all__ = ["AddressWatcher", "HostReport", "read_host"]

DEBOUNCE_SECONDS = 0.05  # changes arriving together (ip addr replace) become one report


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
