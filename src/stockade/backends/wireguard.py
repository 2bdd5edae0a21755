"""The WireGuard side of a Linux host: one interface, its peers, and the routing that steers
encrypted rules' traffic into it. Shared by the Linux backends that declare ``Capability.ENCRYPT``.

Why this shape (measured on this machine, see bench/wireguard.py and docs/architecture.md):

* **The kernel module where present, wireguard-go otherwise** (``STOCKADE_WIREGUARD`` forces
  one; see :mod:`stockade.backends.wgconf`, which also holds the two configurators): a kernel
  device is configured with the ``wg`` tool (genetlink), wireguard-go over its UAPI socket.
  wireguard-go's control sockets live in ``/var/run/wireguard/<interface>.sock``, shared by every
  network namespace, so interface names are unique per host (the agent derives them from the
  workload). :attr:`WireGuardDevice.datapath` says which one runs (the agent reports it).
* **Peers one at a time.** Replacing the configuration (``wg setconf``) resets every session;
  one peer's change (a UAPI ``set=1`` with one ``public_key=`` block, or one ``wg set NAME peer``)
  touches only that peer, so established tunnels with the others keep their keys and counters.
* **Marks + policy routing, not per-peer routes.** A per-peer route sends *all* traffic to that
  peer through the tunnel; encryption here is per rule, so the nftables ``route`` chain marks only
  packets of encrypted rules (and of connections they accepted: ``ct mark``), and an ``ip rule``
  sends the mark to a table whose only route is the WireGuard interface. wireguard-go's own UDP
  packets carry ``SOCKET_MARK`` (its ``fwmark``) and are never re-steered.
* **Fail closed.** The table's rules drop marked packets leaving by any other interface and
  packets of encrypted connections arriving by any other interface, so a dead wireguard-go or a
  deleted interface drops the traffic (never sends it in the clear) until ``ensure`` restores it.

The private key is read from a file on the host (mode 0600, made by the agent) and written only
to the UAPI socket (or named as a file to ``wg``); it never appears in an argv, a log line or
the HostPolicy.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from stockade.backends.common import in_netns, nsenter_argv, run_command
from stockade.backends.wgconf import (
    Configurator,
    Datapath,
    DatapathChoice,
    PeerState,
    UapiConfigurator,
    WgToolConfigurator,
    create_kernel_link,
    datapath_of,
    endpoint_text,
    no_module,
    read_private_key,
    validate_ifname,
)
from stockade.compiler.ir import PeerDelta, WireGuardConfig, WireGuardPeer
from stockade.errors import ApplyError
from stockade.model.addresses import IPAddress
from stockade.model.workloads import validate_public_key

__all__ = ["Datapath", "DatapathChoice", "PeerState", "Tunnel", "WireGuardDevice", "validate_public_key"]

DEFAULT_PORT = 51820
STEER_MARK = 0x5745  # packets of encrypted rules: routed into the tunnel
SOCKET_MARK = 0x5747  # the WireGuard socket's own UDP packets (its fwmark): never steered
ROUTE_TABLE = 0x5745
RULE_PRIORITY = 1000
MTU = 1420
TIMEOUT_S = 10.0


class WireGuardDevice:
    """One WireGuard interface (kernel module or wireguard-go) in one network namespace (None: this one).

    ``choice`` picks the datapath (default: ``STOCKADE_WIREGUARD``, else auto). ``wg_tool``
    configures a wireguard-go device with the ``wg`` tool too, as a kernel device always is (the
    tests and the benchmark use it to run the kernel path's configurator here)."""

    def __init__(self, name: str, netns: str | None, private_key_file: Path,
                 choice: DatapathChoice | None = None, *, wg_tool: bool = False) -> None:
        self.name = validate_ifname(name)
        self.netns = netns
        self.private_key_file = private_key_file
        self.choice = DatapathChoice.from_env() if choice is None else choice
        self.wg_tool = wg_tool
        self.datapath: Datapath | None = None  # known once the device was created or found
        self._uapi = UapiConfigurator(self.name)

    @property
    def socket_path(self) -> Path:
        return self._uapi.socket_path

    @property
    def config(self) -> Configurator:
        """The configurator for the datapath in use (a kernel device: always the ``wg`` tool)."""
        if self.datapath is Datapath.KERNEL or self.wg_tool:
            return WgToolConfigurator(self.name, self.netns)
        return self._uapi

    # ---- peers, one at a time ---------------------------------------------------------------
    def add_peer(self, peer: WireGuardPeer) -> None:
        """Add or update one peer (its allowed addresses replaced); other sessions untouched."""
        self.config.set_peer(peer)

    def remove_peer(self, public_key: str) -> None:
        self.config.remove_peer(public_key)

    def refresh_endpoints(self, config: WireGuardConfig) -> None:
        """Set every peer's endpoint again, one peer at a time: the device forgets the source
        address it stuck to (gone when this host was re-addressed); sessions are kept."""
        conf = self.config
        for peer in config.peers:
            conf.set_endpoint(peer)

    def reconcile(self, config: WireGuardConfig) -> tuple[int, int]:
        """Bring the peers to ``config`` one peer at a time; (added or changed, removed)."""
        conf = self.config
        _, have = conf.dump()
        want = {p.public_key: p for p in config.peers}
        removed = sorted(set(have) - set(want))
        changed = []
        for key, peer in sorted(want.items()):
            state = have.get(key)
            allowed = frozenset(str(n) for n in peer.allowed)
            if state is None or state.allowed != allowed or state.endpoint != endpoint_text(peer):
                changed.append(peer)
        conf.change_peers(changed, removed)  # one request (per batch), each peer changed on its own
        return len(changed), len(removed)

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

    def _found_datapath(self) -> Datapath:
        """What the existing interface runs on: ``ip -d link`` says ``wireguard`` for the module."""
        return datapath_of(self._run(["ip", "-d", "-o", "link", "show", "dev", self.name], "ip link show"))

    def _allowed(self, datapath: Datapath) -> bool:
        return self.choice is DatapathChoice.AUTO or (self.choice is DatapathChoice.KERNEL) == (
            datapath is Datapath.KERNEL)

    def alive(self) -> bool:
        """The interface exists on an allowed datapath and answers its configurator."""
        if not self.exists():
            return False
        try:
            if self.datapath is None:  # found, not made by this process (an agent restart)
                self.datapath = self._found_datapath()
            self.config.dump()
        except ApplyError:
            return False
        return self._allowed(self.datapath)

    def _create(self) -> Datapath:
        """Make the interface: the kernel module first (unless forced to userspace), wireguard-go
        when the kernel has no module (unless forced to the kernel: then a clear error, and the
        ruleset, already loaded, keeps the encrypted rules' traffic dropped)."""
        if self.choice is not DatapathChoice.USERSPACE:
            error = create_kernel_link(self.name, self.netns)
            if error is None:
                return Datapath.KERNEL
            if self.choice is DatapathChoice.KERNEL or not no_module(error):
                forced = " (STOCKADE_WIREGUARD=kernel: no fallback to wireguard-go)" \
                    if self.choice is DatapathChoice.KERNEL else ""
                raise ApplyError(f"WireGuard interface {self.name}: the kernel module is not usable: "
                                 f"ip link add type wireguard: {error}{forced}; "
                                 "the encrypted rules' traffic stays dropped")
        self.socket_path.unlink(missing_ok=True)
        self._run(["wireguard-go", self.name], "wireguard-go")  # daemonises once the interface is up
        deadline = time.monotonic() + TIMEOUT_S
        while not self.socket_path.exists():
            if time.monotonic() > deadline:
                raise ApplyError(f"wireguard-go did not open {self.socket_path}")
            time.sleep(0.01)
        return Datapath.USERSPACE

    def ensure(self, config: WireGuardConfig) -> bool:
        """Make the interface, its key, port, mark and routing exist; then reconcile peers.
        True when anything had to be (re)created (tamper restored or first start)."""
        created = False
        if not self.alive():
            if self.exists():  # a daemon-less interface (its wireguard-go died), or the other datapath
                self._run(["ip", "link", "del", self.name], "ip link del")
            self.datapath = None
            self.datapath = self._create()
            created = True
        conf = self.config
        iface, _ = conf.dump()
        want_key = read_private_key(self.private_key_file).hex()
        conf.set_interface(self.private_key_file if iface.private_key_hex != want_key else None,
                           config.listen_port if iface.listen_port != config.listen_port else None,
                           SOCKET_MARK if iface.fwmark != SOCKET_MARK else None)
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
            if self.datapath is None:
                self.datapath = self._found_datapath()
            iface, have = self.config.dump()
        except ApplyError:
            runs = self.datapath.value if self.datapath else "the device"
            return [f"WireGuard interface {self.name}: {runs} is not answering"]
        if not self._allowed(self.datapath):
            return [f"WireGuard interface {self.name} runs on {self.datapath.value}, "
                    f"but STOCKADE_WIREGUARD={self.choice.value}"]
        out: list[str] = []
        try:
            if iface.private_key_hex != read_private_key(self.private_key_file).hex():
                out.append(f"WireGuard interface {self.name}: private key differs from {self.private_key_file}")
        except ApplyError as exc:
            out.append(str(exc))
        if iface.listen_port != config.listen_port:
            out.append(f"WireGuard interface {self.name}: listen port {iface.listen_port}")
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
        self.datapath = None
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

    @property
    def datapath(self) -> Datapath | None:
        """The WireGuard implementation in use (None: no tunnel is up)."""
        return self.device.datapath

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


def tunnel_datapath(tunnel: Tunnel | None) -> str:
    """A backend's tunnel's WireGuard implementation ("kernel", "wireguard-go"; "": none up)."""
    dp = tunnel.datapath if tunnel is not None else None
    return dp.value if dp is not None else ""


def tunnel_peer_delta(tunnel: Tunnel | None, old: WireGuardConfig, delta: PeerDelta) -> None:
    """A backend's peer delta: peers set / removed one at a time over the device's control path;
    the ruleset is not touched. No device: an ApplyError (the caller falls back to a full apply)."""
    if tunnel is None:
        raise ApplyError("a peer delta, but this backend has no WireGuard device")
    tunnel.apply_peer_delta(old, delta)
