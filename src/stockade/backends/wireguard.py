"""The WireGuard side of a Linux host: one interface, its peers, and the routing that steers
encrypted rules' traffic into it. Shared by the Linux backends that declare ``Capability.ENCRYPT``.

Why this shape (measured on this machine, see bench/wireguard.py and docs/architecture.md):

* **wireguard-go** when the kernel has no WireGuard module (this one has none); the kernel
  module's netlink path is not implemented here yet. wireguard-go's control sockets live in
  ``/var/run/wireguard/<interface>.sock``, shared by every network namespace, so interface
  names are unique per host (the agent derives them from the workload).
* **Peers one at a time over the UAPI socket.** Replacing the configuration (``wg setconf``)
  resets every session; a ``set=1`` with one ``public_key=`` block touches only that peer, so
  established tunnels with the others keep their keys and counters.
* **Marks + policy routing, not per-peer routes.** A per-peer route sends *all* traffic to that
  peer through the tunnel; encryption here is per rule, so the nftables ``route`` chain marks only
  packets of encrypted rules (and of connections they accepted: ``ct mark``), and an ``ip rule``
  sends the mark to a table whose only route is the WireGuard interface. wireguard-go's own UDP
  packets carry ``SOCKET_MARK`` (its ``fwmark``) and are never re-steered.
* **Fail closed.** The table's rules drop marked packets leaving by any other interface and
  packets of encrypted connections arriving by any other interface, so a dead wireguard-go or a
  deleted interface drops the traffic (never sends it in the clear) until ``ensure`` restores it.

The private key is read from a file on the host (mode 0600, made by the agent) and written only
to the UAPI socket; it never appears in an argv, a log line or the HostPolicy.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from stockade.backends.common import in_netns, nsenter_argv, run_command
from stockade.compiler.ir import PeerDelta, WireGuardConfig, WireGuardPeer
from stockade.errors import ApplyError
from stockade.model.addresses import IPAddress
from stockade.model.workloads import validate_public_key

__all__ = ["Tunnel", "WireGuardDevice", "validate_public_key"]

DEFAULT_PORT = 51820
STEER_MARK = 0x5745  # packets of encrypted rules: routed into the tunnel
SOCKET_MARK = 0x5747  # wireguard-go's own UDP packets (its fwmark): never steered
ROUTE_TABLE = 0x5745
RULE_PRIORITY = 1000
UAPI_DIR = Path("/var/run/wireguard")
MTU = 1420
_IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")
TIMEOUT_S = 10.0


def key_hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def _key_b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


def validate_ifname(name: str) -> str:
    if not _IFNAME_RE.match(name):
        raise ApplyError(f"invalid WireGuard interface name {name!r}")
    return name


@dataclass(frozen=True)
class PeerState:
    public_key: str
    endpoint: str  # "ip:port" / "[ip6]:port", "" when unknown
    allowed: frozenset[str]
    last_handshake: int  # seconds since the epoch, 0: never


def endpoint_text(peer: WireGuardPeer) -> str:
    ep = peer.endpoint
    return f"[{ep}]:{peer.port}" if ep.version == 6 else f"{ep}:{peer.port}"


class WireGuardDevice:
    """One wireguard-go interface in one network namespace (None: this one)."""

    def __init__(self, name: str, netns: str | None, private_key_file: Path) -> None:
        self.name = validate_ifname(name)
        self.netns = netns
        self.private_key_file = private_key_file

    # ---- UAPI -------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def _uapi(self, request: str) -> str:
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
        self._uapi("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")

    def dump(self) -> tuple[dict[str, str], dict[str, PeerState]]:
        """(interface settings, peers by public key) as the daemon reports them."""
        text = self._uapi("get=1\n\n")
        iface: dict[str, str] = {}
        peers: dict[str, PeerState] = {}
        current: dict[str, object] | None = None

        def flush() -> None:
            if current is not None:
                key = str(current["public_key"])
                allowed = current.get("allowed", set())
                assert isinstance(allowed, set)
                peers[key] = PeerState(key, str(current.get("endpoint", "")), frozenset(allowed),
                                       int(str(current.get("last_handshake_time_sec", "0"))))

        for line in text.splitlines():
            k, _, v = line.partition("=")
            if k == "public_key":
                flush()
                current = {"public_key": _key_b64(v), "allowed": set()}
            elif current is None:
                iface[k] = v
            elif k == "allowed_ip":
                allowed = current["allowed"]
                assert isinstance(allowed, set)
                allowed.add(str(ipaddress.ip_network(v)))
            elif k in ("endpoint", "last_handshake_time_sec"):
                current[k] = v
        flush()
        return iface, peers

    # ---- peers, one at a time ---------------------------------------------------------------
    def add_peer(self, peer: WireGuardPeer) -> None:
        """Add or update one peer (its allowed addresses replaced); other sessions untouched."""
        lines = [f"public_key={key_hex(peer.public_key)}", "replace_allowed_ips=true",
                 f"endpoint={endpoint_text(peer)}"]
        lines += [f"allowed_ip={n}" for n in peer.allowed]
        self._set(lines)

    def remove_peer(self, public_key: str) -> None:
        self._set([f"public_key={key_hex(public_key)}", "remove=true"])

    def refresh_endpoints(self, config: WireGuardConfig) -> None:
        """Set every peer's endpoint again, one peer at a time: wireguard-go forgets the source
        address it stuck to (gone when this host was re-addressed); sessions are kept."""
        for peer in config.peers:
            self._set([f"public_key={key_hex(peer.public_key)}", "update_only=true",
                       f"endpoint={endpoint_text(peer)}"])

    def reconcile(self, config: WireGuardConfig) -> tuple[int, int]:
        """Bring the peers to ``config`` one peer at a time; (added or changed, removed)."""
        _, have = self.dump()
        want = {p.public_key: p for p in config.peers}
        removed = 0
        for key in sorted(set(have) - set(want)):
            self.remove_peer(key)
            removed += 1
        changed = 0
        for key, peer in sorted(want.items()):
            state = have.get(key)
            allowed = frozenset(str(n) for n in peer.allowed)
            if state is None or state.allowed != allowed or state.endpoint != endpoint_text(peer):
                self.add_peer(peer)
                changed += 1
        return changed, removed

    # ---- the interface ------------------------------------------------------------------------
    def _run(self, argv: list[str], what: str) -> str:
        res = run_command(nsenter_argv(self.netns, argv), TIMEOUT_S, what=what)
        if res.returncode != 0:
            raise ApplyError(f"{what}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def exists(self) -> bool:
        def lookup() -> bool:
            try:
                socket.if_nametoindex(self.name)
            except OSError:
                return False
            return True

        return in_netns(self.netns, lookup)

    def alive(self) -> bool:
        """The interface exists and its daemon answers on the control socket."""
        if not self.exists():
            return False
        try:
            self._uapi("get=1\n\n")
        except ApplyError:
            return False
        return True

    def _private_key_hex(self) -> str:
        try:
            text = self.private_key_file.read_text().strip()
            raw = base64.b64decode(text, validate=True)
        except (OSError, binascii.Error, ValueError) as exc:
            raise ApplyError(f"WireGuard private key {self.private_key_file}: unreadable") from exc
        if len(raw) != 32:
            raise ApplyError(f"WireGuard private key {self.private_key_file}: not 32 bytes")
        return raw.hex()

    def ensure(self, config: WireGuardConfig) -> bool:
        """Make the interface, its key, port, mark and routing exist; then reconcile peers.
        True when anything had to be (re)created (tamper restored or first start)."""
        created = False
        if not self.alive():
            if self.exists():  # a daemon-less interface (its wireguard-go died): start over
                self._run(["ip", "link", "del", self.name], "ip link del")
            self.socket_path.unlink(missing_ok=True)
            self._run(["wireguard-go", self.name], "wireguard-go")  # daemonises once the interface is up
            deadline = time.monotonic() + TIMEOUT_S
            while not self.socket_path.exists():
                if time.monotonic() > deadline:
                    raise ApplyError(f"wireguard-go did not open {self.socket_path}")
                time.sleep(0.01)
            created = True
        iface, _ = self.dump()
        want_key = self._private_key_hex()
        settings: list[str] = []
        if iface.get("private_key") != want_key:
            settings.append(f"private_key={want_key}")
        if iface.get("listen_port") != str(config.listen_port):
            settings.append(f"listen_port={config.listen_port}")
        if iface.get("fwmark") != str(SOCKET_MARK):
            settings.append(f"fwmark={SOCKET_MARK}")
        if settings:
            self._set(settings)
        self._ensure_link_and_routes(created)
        self.reconcile(config)
        return created

    def _ensure_link_and_routes(self, created: bool) -> None:
        if created:
            self._run(["ip", "link", "set", self.name, "mtu", str(MTU), "up"], "ip link set up")
            self._run(["sysctl", "-q", "-w", f"net.ipv4.conf.{self.name}.rp_filter=0"], "sysctl rp_filter")
        for fam in ("-4", "-6"):
            rules = self._run(["ip", fam, "rule", "show", "priority", str(RULE_PRIORITY)], "ip rule show")
            if f"lookup {ROUTE_TABLE}" not in rules:
                self._run(["ip", fam, "rule", "add", "priority", str(RULE_PRIORITY), "fwmark", hex(STEER_MARK),
                           "lookup", str(ROUTE_TABLE)], "ip rule add")
            self._run(["ip", fam, "route", "replace", "default", "dev", self.name, "table", str(ROUTE_TABLE)],
                      "ip route replace")

    def problems(self, config: WireGuardConfig) -> list[str]:
        """What differs from ``config`` (tamper detection); empty when all is in place."""
        if not self.exists():
            return [f"WireGuard interface {self.name} is missing"]
        try:
            iface, have = self.dump()
        except ApplyError:
            return [f"WireGuard interface {self.name}: wireguard-go is not answering"]
        out: list[str] = []
        try:
            if iface.get("private_key") != self._private_key_hex():
                out.append(f"WireGuard interface {self.name}: private key differs from {self.private_key_file}")
        except ApplyError as exc:
            out.append(str(exc))
        if iface.get("listen_port") != str(config.listen_port):
            out.append(f"WireGuard interface {self.name}: listen port {iface.get('listen_port')}")
        want = {p.public_key: p for p in config.peers}
        for key in sorted(set(want) - set(have)):
            out.append(f"WireGuard peer {want[key].workload} is missing")
        for key in sorted(set(have) - set(want)):
            out.append(f"unexpected WireGuard peer {key}")
        for fam in ("-4", "-6"):
            routes = self._run(["ip", fam, "route", "show", "table", str(ROUTE_TABLE)], "ip route show")
            if f"dev {self.name}" not in routes:
                out.append(f"route table {ROUTE_TABLE} ({fam}) does not lead into {self.name}")
        return out

    def remove(self) -> None:
        """Delete the interface (wireguard-go exits with it) and the steering rule and routes."""
        if self.exists():
            self._run(["ip", "link", "del", self.name], "ip link del")
        for fam in ("-4", "-6"):  # exactly our rule: another rule at the same priority is not ours
            run_command(nsenter_argv(self.netns, ["ip", fam, "rule", "del", "priority", str(RULE_PRIORITY),
                                                  "fwmark", hex(STEER_MARK), "lookup", str(ROUTE_TABLE)]),
                        TIMEOUT_S)  # absent already: nothing to do


class Tunnel:
    """What every Linux backend with ``Capability.ENCRYPT`` does beside its own ruleset, in one
    place: after the ruleset (whose guards drop encrypted traffic outside the tunnel) is loaded,
    bring the device to the HostPolicy's ``WireGuardConfig`` (one peer at a time), re-set peer
    endpoints when this host was re-addressed, remove the device when no encrypted rule is left;
    and report the device's drift for the backend's ``verify``. Backends differ only in how they
    render the steering and guard rules (nftables: ``route`` chain + ``ct mark``; iptables: the
    mangle table's ``MARK``/``CONNMARK``)."""

    def __init__(self, device: WireGuardDevice) -> None:
        self.device = device
        self._local: tuple[IPAddress, ...] | None = None  # own addresses when the tunnel was last set

    @property
    def interface(self) -> str:
        return self.device.name

    def apply(self, config: WireGuardConfig | None, local_addresses: tuple[IPAddress, ...]) -> None:
        if config is None:
            if self.device.exists():
                self.device.remove()
            self._local = None
            return
        created = self.device.ensure(config)
        if not created and self._local not in (None, local_addresses):
            # re-addressed: wireguard-go keeps sending from the source address it last used
            self.device.refresh_endpoints(config)
        self._local = local_addresses

    def apply_peer_delta(self, old: WireGuardConfig, delta: PeerDelta) -> None:
        """One UAPI request per peer removed, replaced or added (a rotated key: the old key's peer
        removed, the new one added); every other session is untouched, the ruleset too."""
        have = {p.workload: p for p in old.peers}
        for name in delta.removed:
            gone = have.get(name)
            if gone is not None:
                self.device.remove_peer(gone.public_key)
        for peer in delta.upserted:
            was = have.get(peer.workload)
            if was is not None and was.public_key != peer.public_key:
                self.device.remove_peer(was.public_key)
            self.device.add_peer(peer)

    def problems(self, config: WireGuardConfig | None) -> list[str]:
        if config is None:
            exists = self.device.exists()
            return [f"WireGuard interface {self.device.name} exists but no rule encrypts"] if exists else []
        return self.device.problems(config)

    def remove(self) -> None:
        self.device.remove()
        self._local = None
