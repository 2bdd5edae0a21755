"""How a WireGuard interface is created and configured: which datapath (the kernel module or
wireguard-go) and which configurator (wireguard-go's UAPI socket, or the ``wg`` tool).

Why two configurators, and why the ``wg`` tool for the kernel module:

* A **kernel** WireGuard device has no UAPI socket; it is configured over generic netlink (the
  ``wireguard`` family). Rather than encode those messages here (code that could not run on a
  machine without the module, so would stay untested), the kernel path uses the ``wg`` tool
  (wireguard-tools), which speaks genetlink to a kernel device *and* the UAPI socket to
  wireguard-go. So the very configurator a kernel device uses (:class:`WgToolConfigurator`) is
  tested here against real wireguard-go devices: peer add, remove, endpoint change and rotation,
  one peer at a time, read back with ``wg show NAME dump``. What stays untested on a machine
  without the module is only the module itself (``ip link add NAME type wireguard`` succeeding).
* **wireguard-go** keeps the direct UAPI socket (:class:`UapiConfigurator`): no process per
  change (bench/wireguard.py measures both).

Every call is an argv list (never a shell string); public keys are validated before they reach
an argv, and the private key is passed to ``wg`` as a file path (``private-key FILE``), never as
an argument; over the UAPI socket it is written as hex, never logged.

The datapath is chosen by ``STOCKADE_WIREGUARD`` (:class:`DatapathChoice`): ``auto`` (default:
the kernel module when ``ip link add ... type wireguard`` works, wireguard-go when the kernel
answers "Unknown device type" / "not supported"), ``kernel`` (no fallback: the apply fails with
a clear error and the ruleset's guards keep the encrypted rules' traffic dropped) or
``userspace``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from stockade.backends.common import nsenter_argv, run_command
from stockade.compiler.ir import WireGuardPeer
from stockade.errors import ApplyError, Issue, ValidationError
from stockade.model.workloads import validate_public_key

UAPI_DIR = Path("/var/run/wireguard")
TIMEOUT_S = 10.0
ENV = "STOCKADE_WIREGUARD"
WG_BATCH = 200  # peers per `wg set` when many change at once (~130 bytes of argv each)
_IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")
# what `ip link add NAME type wireguard` prints when the kernel has no WireGuard module
_NO_MODULE = re.compile(r"unknown device type|not supported|EOPNOTSUPP", re.I)


class Datapath(Enum):
    """The WireGuard implementation an interface runs on (reported by the agent)."""

    KERNEL = "kernel"
    USERSPACE = "wireguard-go"


class DatapathChoice(Enum):
    """What the operator asked for (``STOCKADE_WIREGUARD``)."""

    AUTO = "auto"
    KERNEL = "kernel"
    USERSPACE = "userspace"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DatapathChoice:
        """The choice in ``env`` (default: the process environment); unset or empty: auto."""
        value = (os.environ if env is None else env).get(ENV, "").strip().lower()
        if not value:
            return cls.AUTO
        try:
            return cls(value)
        except ValueError:
            raise ValidationError([Issue("", 0, ENV, f"{value!r} is not one of auto, kernel, userspace")]) from None


def validate_ifname(name: str) -> str:
    if not _IFNAME_RE.match(name):
        raise ApplyError(f"invalid WireGuard interface name {name!r}")
    return name


def key_hex(b64: str) -> str:
    return base64.b64decode(validate_public_key(b64)).hex()


def key_b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


def read_private_key(path: Path) -> bytes:
    """The 32-byte private key in ``path`` (base64, as ``wg genkey`` writes it)."""
    try:
        raw = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, binascii.Error, ValueError) as exc:
        raise ApplyError(f"WireGuard private key {path}: unreadable") from exc
    if len(raw) != 32:
        raise ApplyError(f"WireGuard private key {path}: not 32 bytes")
    return raw


def endpoint_text(peer: WireGuardPeer) -> str:
    ep = peer.endpoint
    return f"[{ep}]:{peer.port}" if ep.version == 6 else f"{ep}:{peer.port}"


@dataclass(frozen=True)
class PeerState:
    public_key: str
    endpoint: str  # "ip:port" / "[ip6]:port", "" when unknown
    allowed: frozenset[str]
    last_handshake: int  # seconds since the epoch, 0: never


@dataclass(frozen=True)
class InterfaceState:
    private_key_hex: str  # "" when none is set
    listen_port: int
    fwmark: int  # 0: off


class Configurator(Protocol):
    """Reads and changes one WireGuard interface's settings and peers, one peer at a time."""

    def dump(self) -> tuple[InterfaceState, dict[str, PeerState]]:
        """(interface settings, peers by public key) as the device reports them."""
        ...

    def set_interface(self, private_key_file: Path | None, listen_port: int | None, fwmark: int | None) -> None: ...

    def set_peer(self, peer: WireGuardPeer) -> None:
        """Add or update one peer: endpoint set, allowed addresses replaced."""
        ...

    def set_endpoint(self, peer: WireGuardPeer) -> None:
        """Set one existing peer's endpoint only (keeps its allowed addresses and session)."""
        ...

    def remove_peer(self, public_key: str) -> None: ...

    def change_peers(self, upsert: Sequence[WireGuardPeer], remove: Sequence[str]) -> None:
        """Many peers' changes in one call, each peer's as :meth:`set_peer` / :meth:`remove_peer`
        (never a configuration replace: the other peers' sessions stay)."""
        ...


class UapiConfigurator:
    """wireguard-go's control socket, ``/var/run/wireguard/<name>.sock`` (shared by all namespaces)."""

    def __init__(self, name: str) -> None:
        self.name = validate_ifname(name)

    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def _request(self, request: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT_S)
            try:
                s.connect(str(self.socket_path))
                s.sendall(request.encode())
                chunks: list[bytes] = []
                while not b"".join(chunks).endswith(b"\n\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except OSError as exc:
                raise ApplyError(f"WireGuard interface {self.name}: UAPI socket: {exc}") from exc
        text = b"".join(chunks).decode()
        m = re.search(r"^errno=(-?\d+)$", text, re.M)
        if m is None or m.group(1) != "0":
            raise ApplyError(f"WireGuard interface {self.name}: UAPI answered {text.strip()!r}")
        return text

    def _set(self, lines: list[str]) -> None:
        self._request("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")

    def dump(self) -> tuple[InterfaceState, dict[str, PeerState]]:
        return parse_uapi(self._request("get=1\n\n"))

    def set_interface(self, private_key_file: Path | None, listen_port: int | None, fwmark: int | None) -> None:
        lines = [] if private_key_file is None else [f"private_key={read_private_key(private_key_file).hex()}"]
        lines += [] if listen_port is None else [f"listen_port={listen_port}"]
        lines += [] if fwmark is None else [f"fwmark={fwmark}"]
        if lines:
            self._set(lines)

    def set_peer(self, peer: WireGuardPeer) -> None:
        self._set([f"public_key={key_hex(peer.public_key)}", "replace_allowed_ips=true",
                   f"endpoint={endpoint_text(peer)}", *(f"allowed_ip={n}" for n in peer.allowed)])

    def set_endpoint(self, peer: WireGuardPeer) -> None:
        self._set([f"public_key={key_hex(peer.public_key)}", "update_only=true", f"endpoint={endpoint_text(peer)}"])

    def remove_peer(self, public_key: str) -> None:
        self._set([f"public_key={key_hex(public_key)}", "remove=true"])

    def change_peers(self, upsert: Sequence[WireGuardPeer], remove: Sequence[str]) -> None:
        lines = [line for key in remove for line in (f"public_key={key_hex(key)}", "remove=true")]
        for peer in upsert:
            lines += [f"public_key={key_hex(peer.public_key)}", "replace_allowed_ips=true",
                      f"endpoint={endpoint_text(peer)}", *(f"allowed_ip={n}" for n in peer.allowed)]
        if lines:
            self._set(lines)


def parse_uapi(text: str) -> tuple[InterfaceState, dict[str, PeerState]]:
    """A UAPI ``get=1`` answer, as (interface, peers by base64 public key)."""
    iface: dict[str, str] = {}
    peers: dict[str, PeerState] = {}
    key = ""
    fields: dict[str, str] = {}
    allowed: set[str] = set()

    def flush() -> None:
        if key:
            peers[key] = PeerState(key, fields.get("endpoint", ""), frozenset(allowed),
                                   int(fields.get("last_handshake_time_sec", "0")))

    for line in text.splitlines():
        k, _, v = line.partition("=")
        if k == "public_key":
            flush()
            key, fields, allowed = key_b64(v), {}, set()
        elif not key:
            iface[k] = v
        elif k == "allowed_ip":
            allowed.add(str(ipaddress.ip_network(v)))
        else:
            fields[k] = v
    flush()
    return InterfaceState(iface.get("private_key", ""), int(iface.get("listen_port", "0")),
                          int(iface.get("fwmark", "0"))), peers


class WgToolConfigurator:
    """The ``wg`` tool (wireguard-tools) run in the interface's namespace: genetlink to a kernel
    device, the UAPI socket to wireguard-go. One ``wg set`` per peer change."""

    def __init__(self, name: str, netns: str | None) -> None:
        self.name = validate_ifname(name)
        self.netns = netns

    def _wg(self, args: list[str]) -> str:
        res = run_command(nsenter_argv(self.netns, ["wg", *args]), TIMEOUT_S, what="wg")
        if res.returncode != 0:
            raise ApplyError(f"WireGuard interface {self.name}: wg {args[0]}: "
                             f"{res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def dump(self) -> tuple[InterfaceState, dict[str, PeerState]]:
        return parse_wg_dump(self._wg(["show", self.name, "dump"]))

    def set_interface(self, private_key_file: Path | None, listen_port: int | None, fwmark: int | None) -> None:
        args = wg_interface_args(private_key_file, listen_port, fwmark)
        if args:
            if private_key_file is not None:
                read_private_key(private_key_file)  # a clear error here rather than wg's
            self._wg(["set", self.name, *args])

    def set_peer(self, peer: WireGuardPeer) -> None:
        self._wg(["set", self.name, *wg_peer_args(peer)])

    def set_endpoint(self, peer: WireGuardPeer) -> None:
        # wg 1.0.20210914 has no update-only: the peer exists already (reconciled first)
        self._wg(["set", self.name, "peer", validate_public_key(peer.public_key), "endpoint", endpoint_text(peer)])

    def remove_peer(self, public_key: str) -> None:
        self._wg(["set", self.name, "peer", validate_public_key(public_key), "remove"])

    def change_peers(self, upsert: Sequence[WireGuardPeer], remove: Sequence[str]) -> None:
        groups = [["peer", validate_public_key(key), "remove"] for key in remove]
        groups += [wg_peer_args(peer) for peer in upsert]
        for i in range(0, len(groups), WG_BATCH):  # argv stays far below the kernel's limit
            self._wg(["set", self.name, *(arg for group in groups[i:i + WG_BATCH] for arg in group)])


def wg_interface_args(private_key_file: Path | None, listen_port: int | None, fwmark: int | None) -> list[str]:
    args = [] if private_key_file is None else ["private-key", str(private_key_file)]
    args += [] if listen_port is None else ["listen-port", str(listen_port)]
    args += [] if fwmark is None else ["fwmark", hex(fwmark) if fwmark else "off"]
    return args


def wg_peer_args(peer: WireGuardPeer) -> list[str]:
    """``peer KEY endpoint EP allowed-ips A,B``: wg replaces the peer's allowed addresses (an empty
    list clears them) and leaves every other peer alone."""
    return ["peer", validate_public_key(peer.public_key), "endpoint", endpoint_text(peer),
            "allowed-ips", ",".join(str(n) for n in peer.allowed)]


def parse_wg_dump(text: str) -> tuple[InterfaceState, dict[str, PeerState]]:
    """``wg show NAME dump``: the interface line (private key, public key, port, fwmark), then one
    tab-separated line per peer (key, preshared key, endpoint, allowed ips, latest handshake,
    rx, tx, keepalive); "(none)" and "off" for unset values."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ApplyError("wg show dump: empty answer")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise ApplyError(f"wg show dump: unexpected interface line ({len(head)} fields)")
    private = "" if head[0] == "(none)" else base64.b64decode(head[0]).hex()
    iface = InterfaceState(private, int(head[2]), 0 if head[3] == "off" else int(head[3], 0))
    peers: dict[str, PeerState] = {}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) != 8:
            raise ApplyError(f"wg show dump: unexpected peer line ({len(f)} fields)")
        allowed = frozenset() if f[3] == "(none)" else frozenset(str(ipaddress.ip_network(a)) for a in f[3].split(","))
        peers[f[0]] = PeerState(f[0], "" if f[2] == "(none)" else f[2], allowed, int(f[4]))
    return iface, peers


def datapath_of(ip_detail: str) -> Datapath:
    """What ``ip -d -o link show dev NAME`` says the interface is: its kind ``wireguard`` (the
    module) or anything else (wireguard-go's ``tun``)."""
    return Datapath.KERNEL if re.search(r"(^|[\s\\])wireguard\s", ip_detail) else Datapath.USERSPACE


def no_module(stderr: str) -> bool:
    """Whether ``ip link add ... type wireguard`` failed because the kernel lacks the module."""
    return bool(_NO_MODULE.search(stderr))


def create_kernel_link(name: str, netns: str | None) -> str | None:
    """``ip link add NAME type wireguard``; None when it worked, else ip's error (the caller
    decides: fall back to wireguard-go when :func:`no_module`, otherwise fail)."""
    res = run_command(nsenter_argv(netns, ["ip", "link", "add", validate_ifname(name), "type", "wireguard"]),
                      TIMEOUT_S, what="ip link add")
    return None if res.returncode == 0 else (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}")


__all__ = [
    "ENV", "WG_BATCH", "Configurator", "Datapath", "DatapathChoice", "InterfaceState", "PeerState",
    "UapiConfigurator", "WgToolConfigurator", "create_kernel_link", "datapath_of", "endpoint_text", "key_b64",
    "key_hex", "no_module", "parse_uapi", "parse_wg_dump", "read_private_key", "validate_ifname",
    "wg_interface_args", "wg_peer_args",
]
