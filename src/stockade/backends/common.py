"""Helpers every backend family shares: service bounds and matches, commands, network namespaces.

One module per concern would be three tiny modules; these are small, pure or thin, and each
was written once per backend before (port bounds four times, the subprocess executor twice,
namespace validation three times). Backend families import this, ``base``, ``flowlog`` and
``setalgebra``, never each other.

* **Services**: :func:`entry_bounds` turns a :class:`ServiceEntry` into a checked
  (first, last) range; :func:`service_groups` groups entries per protocol with merged ranges
  (what every renderer's ``service_matches`` starts from), ``None`` meaning any protocol.
* **Text in artifacts**: :func:`checked_rule_id` lets a rule id into a comment only when it is
  made of safe characters; :func:`safe_text` makes any name safe for a header comment;
  :func:`rule_difference` says how two chains' rule lines differ (verification).
* **Commands**: :func:`run_command` runs an argv list (never a shell) with a timeout;
  :class:`CommandResult` and :data:`Executor` let a backend take a fake runner in tests.
* **Namespaces**: :func:`validate_netns` checks a name before it reaches a path or an argv;
  :func:`in_netns` runs a function in a named namespace (a socket created there stays there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from stockade.errors import ApplyError, RenderError
from stockade.model.addresses import Family, Range, merge_ranges
from stockade.model.services import Proto, ServiceEntry

PORT_MAX = 65535
TYPE_MAX = 255
ND_TYPES = (133, 134, 135, 136, 137)  # ICMPv6 neighbour discovery: RS, RA, NS, NA, redirect
T = TypeVar("T")

# ---- services ----------------------------------------------------------------------------


def limit_of(proto: Proto) -> int:
    """The largest port (TCP/UDP) or type (ICMP/ICMPv6) of ``proto``."""
    return PORT_MAX if proto.has_ports else TYPE_MAX


def entry_bounds(entry: ServiceEntry) -> Range:
    """(first, last) port or type of ``entry``; every port/type when it names none.

    RenderError when the entry is out of range (0-65535 ports, 0-255 types) or reversed.
    """
    limit = limit_of(entry.proto)
    if entry.first is None:
        return 0, limit
    last = entry.last if entry.last is not None else entry.first
    if not 0 <= entry.first <= last <= limit:
        raise RenderError(f"service entry {entry} out of range 0-{limit}")
    return entry.first, last


def controller_port(port: int) -> int:
    """The failsafe's controller port when it is usable (1-65535); RenderError otherwise."""
    if not 0 < port <= PORT_MAX:
        raise RenderError(f"controller port {port} out of range")
    return port


@dataclass(frozen=True)
class ProtoGroup:
    """The entries of one protocol: ``ranges`` merged and sorted, None for every port/type."""

    proto: Proto
    ranges: tuple[Range, ...] | None

    @property
    def values(self) -> tuple[int, ...]:
        """Every port/type named (for ICMP type lists); () when ``ranges`` is None."""
        return tuple(v for lo, hi in self.ranges or () for v in range(lo, hi + 1))


LAYER4_ORDER = (Proto.TCP, Proto.UDP, Proto.SCTP, Proto.ICMP, Proto.ICMPV6)


def service_groups(entries: Iterable[ServiceEntry], family: Family | None = None) -> tuple[ProtoGroup, ...] | None:
    """``entries`` grouped per protocol (TCP, UDP, SCTP, ICMP, ICMPv6 order); None for any protocol.

    ``family`` keeps ICMP for IPv4 only and ICMPv6 for IPv6 only (None keeps both). A
    protocol with an entry naming no port/type gets ``ranges=None``; protocols without
    entries are left out.
    """
    entries = list(entries)
    if any(e.proto is Proto.ANY for e in entries):
        return None
    out: list[ProtoGroup] = []
    for proto in LAYER4_ORDER:
        if (proto is Proto.ICMP and family is Family.V6) or (proto is Proto.ICMPV6 and family is Family.V4):
            continue
        found = [e for e in entries if e.proto is proto]
        if not found:
            continue
        if any(e.first is None for e in found):
            out.append(ProtoGroup(proto, None))
        else:
            out.append(ProtoGroup(proto, merge_ranges(entry_bounds(e) for e in found)))
    return tuple(out)


# ---- text in artifacts -------------------------------------------------------------------

_RULE_ID_RE = re.compile(r"^[A-Za-z0-9_.:/@=+\-]{1,120}$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.:/@=+\-]")


def checked_rule_id(rule_id: str, where: str) -> str:
    """``rule_id`` when it may be embedded in ``where`` (a comment) as it is; RenderError otherwise."""
    if not _RULE_ID_RE.match(rule_id):
        raise RenderError(f"rule id {rule_id!r} cannot be {where}")
    return rule_id


def safe_text(text: str) -> str:
    """``text`` with every character a comment could misread replaced by ``?`` (120 at most)."""
    return _UNSAFE_RE.sub("?", text)[:120]


def rule_difference(chain: str, want: tuple[str, ...], have: tuple[str, ...]) -> str:
    """The first difference between the rule lines a chain should hold and those it holds."""
    for i, (w, h) in enumerate(zip(want, have, strict=False)):
        if w != h:
            return f"chain {chain}: rule {i} is {h!r}, expected {w!r}"
    if len(have) > len(want):
        return f"chain {chain}: unexpected rule {have[len(want)]!r}"
    return f"chain {chain}: missing rule {want[len(have)]!r}"


# ---- commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


Executor = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str], timeout: float, stdin: str | None = None, *, what: str = "") -> CommandResult:
    """Run ``argv`` (no shell) and capture its output; ApplyError naming ``what`` (default: the
    program) when it cannot run or times out."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApplyError(f"cannot run {what or argv[0]}: {exc}") from exc
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


def nsenter_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``netns`` through ``nsenter --net`` (half the cost of ``ip netns exec``,
    and /sys stays the caller's: pinned BPF objects remain visible); ``argv`` itself for None."""
    return [*(["nsenter", f"--net={netns_path(netns)}"] if netns else []), *argv]


def executor_with_timeout(timeout: float) -> Executor:
    """An :data:`Executor` running commands for real, each for at most ``timeout`` seconds."""

    def run(argv: Sequence[str]) -> CommandResult:
        return run_command(argv, timeout)

    return run


# ---- network namespaces ------------------------------------------------------------------

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_NETNS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def validate_netns(netns: str | None) -> str | None:
    """``netns`` when it is a safe namespace name (or None); ApplyError otherwise."""
    if netns is not None and not _NETNS_RE.match(netns):
        raise ApplyError(f"invalid network namespace name {netns!r}")
    return netns


def netns_path(netns: str) -> str:
    """``/run/netns/<netns>`` (where ``ip netns add`` pins a namespace), name validated."""
    validate_netns(netns)
    return f"{NETNS_DIR}/{netns}"


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` run inside network namespace ``netns`` (None: here, in this thread).

    ``setns(2)`` moves only the calling thread, so a short-lived worker thread joins the
    namespace and runs ``fn``; the caller's thread never changes namespace. A socket
    ``fn`` creates belongs to ``netns`` for its whole life, whichever thread uses it.
    """
    if netns is None:
        return fn()
    path = netns_path(netns)
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            error.append(ApplyError(f"network namespace {netns!r}: {exc.strerror}"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                error.append(ApplyError(f"setns into {netns!r}: {os.strerror(err)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
