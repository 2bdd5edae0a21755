"""A small WireGuard lab (kernel tests and bench/wireguard.py): host namespaces on a bridge, each with a Linux
backend that encrypts (nftables, iptables+ipset in either variant, or eBPF: ``WG_BACKENDS``) and its own wireguard-go
interface, echo servers, in-process probes and an underlay capture.

Everything runs in namespaces of its own (random names, a private address range that is never
routed from the root namespace), so nothing leaves the machine and parallel runs do not collide.
Sockets are opened inside a namespace by a short-lived thread (``in_netns``) and used from here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stockade.backends.common import in_netns
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.wireguard import STEER_MARK, DatapathChoice, WireGuardDevice
from stockade.compiler.compile import Compiler
from stockade.compiler.delta import peer_delta
from stockade.compiler.ir import HostDelta, HostPolicy, SetDelta
from stockade.lab.netns import create_bridge_namespace, create_host_namespace, delete_namespace
from stockade.model.addresses import IPAddress
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.workloads import EnforcementMode, Interface, WireGuardIdentity, Workload

PORTS = (80, 5432, 6000, 7000)
# the Linux backends that encrypt, as the lab names them
WG_BACKENDS = ("nftables", "iptables-nft", "iptables-legacy", "ebpf")
# "<backend>/wg": the devices configured with the `wg` tool (the kernel module's configurator) instead
# of wireguard-go's UAPI socket, so the kernel path's peer handling runs here without the module
WG_TOOL = "/wg"
SO_MARK = 36
IP_TRANSPARENT = 19  # a source address the host does not own (FREEBIND binds, but sendto then refuses)
IPV6_TRANSPARENT = 75


def genkey(directory: Path, name: str) -> tuple[Path, str]:
    """A private key file (0600) and its public key, as the agent makes them."""
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    path = directory / f"{name}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(priv + "\n")
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout.strip()
    return path, pub


@dataclass
class Host:
    name: str
    netns: str
    port: str  # veth on the bridge side
    v4: IPAddress
    v6: IPAddress
    key_file: Path
    public_key: str
    backend: NftablesBackend | IptablesBackend | EbpfBackend
    device: WireGuardDevice

    def identity(self) -> WireGuardIdentity:
        return WireGuardIdentity(self.public_key, self.v4, 51820)

    def enforce(self, hp: HostPolicy) -> None:
        """Render and apply ``hp`` with this host's backend."""
        if isinstance(self.backend, EbpfBackend):  # each backend takes its own artifact type
            self.backend.apply(self.backend.render(hp))
            return
        if isinstance(self.backend, NftablesBackend):
            self.backend.apply(self.backend.render(hp))
        else:
            self.backend.apply(self.backend.render(hp))

    def apply_delta(self, old: HostPolicy, new: HostPolicy, set_deltas: tuple[SetDelta, ...]) -> bool:
        """What the agent does with a delta: set members, then peers over the control socket, the
        ruleset never reloaded. True when peers changed."""
        if set_deltas:
            self.backend.apply_delta(set_deltas)
        peers = peer_delta(old.wireguard, new.wireguard)
        if peers and old.wireguard is not None:
            self.backend.apply_peer_delta(old.wireguard, peers)
        return bool(peers)


class Capture:
    """Every frame on the bridge namespace's interfaces, read by a thread (AF_PACKET)."""

    def __init__(self, netns: str) -> None:
        self.sock = in_netns(netns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                self.frames.append(self.sock.recv(65535))

    def clear(self) -> None:
        self.frames = []

    def seen(self, marker: bytes) -> bool:
        return any(marker in f for f in list(self.frames))

    def wireguard_packets(self, version: int | None = None) -> int:
        """UDP frames to or from port 51820 (IPv4 and IPv6, or only ``version``)."""
        n = 0
        for f in list(self.frames):
            ethertype = int.from_bytes(f[12:14], "big")
            if version is not None and ethertype != (0x0800 if version == 4 else 0x86DD):
                continue
            if ethertype == 0x0800 and f[23] == 17:
                ihl = (f[14] & 0x0F) * 4
                ports = f[14 + ihl:18 + ihl]
            elif ethertype == 0x86DD and f[20] == 17:
                ports = f[54:58]
            else:
                continue
            if 51820 in (int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")):
                n += 1
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class Servers:
    """TCP echo servers and UDP receivers on every port of ``PORTS`` in one namespace (dual stack);
    ``datagrams`` holds every UDP payload received."""

    def __init__(self, netns: str) -> None:
        def listeners() -> list[socket.socket]:
            out = []
            for port in PORTS:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET6, kind)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    s.bind(("::", port))
                    if kind == socket.SOCK_STREAM:
                        s.listen(64)
                    s.setblocking(False)
                    out.append(s)
            return out

        self.socks = in_netns(netns, listeners)
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select(self.socks, [], [], 0.05)
            for s in r:
                with contextlib.suppress(OSError):
                    if s.type == socket.SOCK_DGRAM:
                        self.datagrams.append(s.recv(4096))
                        continue
                    conn, _ = s.accept()
                    threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(2)
        with contextlib.suppress(OSError):
            data = conn.recv(4096)
            conn.sendall(data)


def probe(netns: str, src: IPAddress, dst: IPAddress, port: int, marker: bytes, *,
          timeout: float = 0.6, mark: int | None = None) -> bool:
    """Connect from ``src`` in ``netns`` to ``dst:port``, send ``marker``, true when it echoes back."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        s.bind((str(src), 0))
        return s

    s = in_netns(netns, make)
    s.settimeout(timeout)
    try:
        s.connect((str(dst), port))
        s.sendall(marker)
        return s.recv(4096) == marker
    except OSError:
        return False
    finally:
        s.close()


def send_udp(netns: str, src: IPAddress, dst: IPAddress, port: int, payload: bytes, *,
             mark: int | None = None) -> None:
    """One datagram from ``src`` (any address: IP_TRANSPARENT, so a namespace can forge one);
    an error sending is raised, so a forgery that never left cannot pass for one that was dropped."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        s.bind((str(src), 0))
        return s

    s = in_netns(netns, make)
    with s:
        s.sendto(payload, (str(dst), port))


def marker() -> bytes:
    return b"STKPLAIN-" + secrets.token_hex(8).encode()


@dataclass
class WgLab:
    """Hosts ``h0..hN`` on one bridge; ``apply`` compiles a policy and enforces it everywhere."""

    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    compiler: Compiler | None = None
    capture: Capture | None = None
    servers: list[Servers] = field(default_factory=list)
    backend: str = "nftables"  # one of WG_BACKENDS
    policies: dict[str, HostPolicy] = field(default_factory=dict)  # what each host has in force
    reloads: int = 0  # full applies by ``change``
    peer_deltas: int = 0  # peer deltas applied over the control socket by ``change``

    def workloads(self, labels: Mapping[str, frozenset[Label]], keyed: set[str] | None = None) -> tuple[Workload, ...]:
        out = []
        for name, h in self.hosts.items():
            ident = h.identity() if keyed is None or name in keyed else None
            out.append(Workload(name, labels[name], (Interface("eth0", (h.v4, h.v6)),),
                                EnforcementMode.FULL, self.backend.split("-")[0], "", ident))
        return tuple(out)

    def apply(self, policy: Policy) -> None:
        self.compiler = Compiler(policy)
        for name, h in self.hosts.items():
            self.policies[name] = self.compiler.host_policy(name)
            h.enforce(self.policies[name])

    def change(self, workloads: list[Workload | str]) -> list[HostDelta]:
        """An inventory change through the incremental compiler; affected hosts take it as the
        agent does: a full reload when rules changed, else set and peer deltas (counted)."""
        assert self.compiler is not None
        deltas = self.compiler.apply_changes(workloads)
        for d in deltas:
            h = self.hosts.get(d.workload)
            if h is None or d.policy is None:
                continue
            old = self.policies.get(d.workload)
            if d.rules_changed or old is None or old.rules_key() != d.policy.rules_key():
                h.enforce(d.policy)
                self.reloads += 1
            elif h.apply_delta(old, d.policy, d.set_deltas):
                self.peer_deltas += 1
            self.policies[d.workload] = d.policy
        return deltas


def make_backend(name: str, netns: str, device: WireGuardDevice) -> NftablesBackend | IptablesBackend | EbpfBackend:
    """``name`` from :data:`WG_BACKENDS`, enforcing in ``netns`` with ``device`` as its tunnel."""
    if name == "nftables":
        return NftablesBackend(table="stockade", netns=netns, wireguard=device)
    if name.startswith("iptables-"):
        return IptablesBackend(name.removeprefix("iptables-"), netns=netns, wireguard=device)
    if name == "ebpf":
        return EbpfBackend(netns=netns, wireguard=device)
    raise ValueError(f"no WireGuard lab backend {name!r} (one of {', '.join(WG_BACKENDS)})")


@contextlib.contextmanager
def wg_lab(count: int, tmp: Path, backend: str = "nftables", *,
           choice: DatapathChoice | None = None) -> Iterator[WgLab]:
    """``backend`` from :data:`WG_BACKENDS`, optionally with :data:`WG_TOOL`; ``choice``: the
    devices' datapath (default: ``STOCKADE_WIREGUARD``, else auto)."""
    run = secrets.token_hex(3)
    third = secrets.randbelow(200) + 20
    backend, _, configurator = backend.partition("/")
    if configurator not in ("", WG_TOOL[1:]):
        raise ValueError(f"no WireGuard configurator {configurator!r} (only {WG_TOOL!r})")
    lab = WgLab(bridge=f"stkwgbr-{run}", backend=backend)
    made: list[str] = []
    try:
        create_bridge_namespace(lab.bridge)
        made.append(lab.bridge)
        for i in range(count):
            name = f"h{i}"
            netns = f"stkwg-{run}-{i}"
            v4 = ipaddress.ip_address(f"10.79.{third}.{10 + i}")
            v6 = ipaddress.ip_address(f"fd79:{third:x}::{10 + i:x}")
            port = f"wgp{run}{i}"
            create_host_namespace(netns, lab.bridge, port, [v4, v6])
            made.append(netns)
            key_file, pub = genkey(tmp, name)
            device = WireGuardDevice(f"wg{run}{i}", netns, key_file, choice, wg_tool=bool(configurator))
            lab.hosts[name] = Host(name, netns, port, v4, v6, key_file, pub, make_backend(backend, netns, device),
                                   device)
            lab.servers.append(Servers(netns))
        lab.capture = Capture(lab.bridge)
        yield lab
    finally:
        if lab.capture is not None:
            lab.capture.close()
        for s in lab.servers:
            s.close()
        for h in lab.hosts.values():
            if isinstance(h.backend, EbpfBackend):  # its pins outlive the namespace otherwise
                with contextlib.suppress(Exception):
                    h.backend.remove()
            h.backend.close()
            with contextlib.suppress(Exception):
                h.device.remove()
        for ns in made:
            delete_namespace(ns)


def kill_wireguard_go(netns: str) -> None:
    """Tamper: kill the (only) process running in the host namespace, wireguard-go."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and subprocess.run(
            ["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.strip():
        time.sleep(0.01)


__all__ = [
    "STEER_MARK", "WG_BACKENDS", "WG_TOOL", "WgLab", "kill_wireguard_go", "make_backend", "marker", "probe", "send_udp",
    "wg_lab",
]
