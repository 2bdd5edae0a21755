"""Moving the agent process into a named network namespace (``stockade agent --netns NS``).

The whole agent then lives in that namespace, as if it ran on that host: its HTTP
connection to the controller leaves through the namespace's interfaces (so the failsafe
path to the controller is exercised), netlink reports the namespace's addresses and the
backend programs the namespace's firewall with no ``ip netns exec`` per command.

``setns(2)`` affects only the calling thread, so :func:`enter_netns` must run before the
agent starts any thread (the CLI calls it first thing). ``/run/netns/NAME`` is where
``ip netns add`` pins namespaces.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

from stockade.errors import StockadeError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


class NetnsError(StockadeError):
    """The agent could not enter the requested network namespace."""


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the network namespace ``name``."""
    if not _NAME_RE.match(name):
        raise NetnsError(f"invalid network namespace name {name!r}")
    if threading.active_count() > 1:
        raise NetnsError("enter_netns must run before any thread starts (setns is per thread)")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"no network namespace {name!r}: {exc}") from exc
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def current_netns_inode() -> int:
    """The inode of this thread's network namespace (to check where we are)."""
    return os.stat("/proc/thread-self/ns/net").st_ino
