"""Real TCP through the nftables backend: a client and a server netns joined by a veth pair.

Full mode lets the allowed port through and drops the other (IPv4 and IPv6, so neighbour
discovery must pass the failsafe); a failed apply leaves the probes unchanged; a set delta
removing the client blocks it and adding it back lets it in; visibility blocks nothing but
counts the would-be drop and logs it to NFLOG with the rule id; outbound rules are enforced
at the client.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from stockade.backends.nfnetlink import open_socket
from stockade.backends.nftables.backend import NftablesBackend
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.errors import ApplyError
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

pytestmark = pytest.mark.kernel

SRV4, SRV6 = "10.77.0.1", "fd77::1"
CLI4, CLI6 = "10.77.0.2", "fd77::2"
PORTS = (80, 81)

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port)); s.listen(64)
        while True:
            c, _ = s.accept(); c.close()
    for p in map(int, sys.argv[1:]):
        threading.Thread(target=serve, args=(p,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    """
)

PROBE = textwrap.dedent(
    """
    import json, socket, sys
    out = {}
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=0.4).close(); out[target] = True
        except OSError:
            out[target] = False
    print(json.dumps(out))
    """
)


@dataclass(frozen=True)
class Pair:
    srv: str
    cli: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = uuid.uuid4().hex[:8]
    p = Pair(f"stk-srv-{tag}", f"stk-cli-{tag}")
    server: subprocess.Popen[str] | None = None
    try:
        for ns in (p.srv, p.cli):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", p.srv, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", p.cli)
        for ns, a4, a6 in ((p.srv, SRV4, SRV6), (p.cli, CLI4, CLI6)):
            ip("-n", ns, "addr", "add", f"{a4}/24", "dev", "eth0")
            ip("-n", ns, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", p.srv, sys.executable, "-c", SERVER, *map(str, PORTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield p
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (p.srv, p.cli):
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


def probe(p: Pair) -> dict[str, bool]:
    targets = [f"{a}:{port}" for a in (SRV4, SRV6) for port in PORTS]
    proc = subprocess.run(
        ["ip", "netns", "exec", p.cli, sys.executable, "-c", PROBE, *targets],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, bool] = json.loads(proc.stdout)
    return result


ALL_OPEN = {f"{a}:{port}": True for a in (SRV4, SRV6) for port in PORTS}
ONLY_80 = {f"{a}:{port}": port == 80 for a in (SRV4, SRV6) for port in PORTS}


def server_policy(mode: EnforcementMode, deny_81: bool = False) -> HostPolicy:
    rules = [HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "pclients", (ServiceEntry(Proto.TCP, 80, 80),))]
    if deny_81:
        rules.append(
            HostRule(Action.DENY, Direction.INBOUND, "deny/no-81", "pclients", (ServiceEntry(Proto.TCP, 81, 81),))
        )
    return HostPolicy(
        workload="srv",
        mode=mode,
        local_addresses=(ipaddress.ip_address(SRV4), ipaddress.ip_address(SRV6)),
        rules=tuple(rules),
        sets=(
            AddressSet("pclients", Family.V4, (ipaddress.ip_network(CLI4),)),
            AddressSet("pclients", Family.V6, (ipaddress.ip_network(CLI6),)),
        ),
        failsafe=Failsafe(),
    )


def test_full_mode_allows_only_the_allowed_port(pair: Pair) -> None:
    assert probe(pair) == ALL_OPEN
    backend = NftablesBackend(netns=pair.srv)
    good = backend.render(server_policy(EnforcementMode.FULL))
    backend.apply(good)
    assert probe(pair) == ONLY_80

    # a failing apply leaves the old ruleset working
    bad_chains = tuple(
        replace(c, rules=(*c.rules, "tcp dport 81 acept")) if c.name == "inbound" else c for c in good.chains
    )
    with pytest.raises(ApplyError):
        backend.apply(replace(backend.render(server_policy(EnforcementMode.VISIBILITY)), chains=bad_chains))
    assert probe(pair) == ONLY_80
    assert backend.verify(good).ok

    # peer churn through set deltas, no reload
    v4 = ipaddress.ip_network(CLI4)
    backend.apply_delta((SetDelta("pclients", Family.V4, (), (v4,)),))
    assert probe(pair) == {**ONLY_80, f"{SRV4}:80": False}
    backend.apply_delta((SetDelta("pclients", Family.V4, (v4,), ()),))
    assert probe(pair) == ONLY_80

    backend.remove()
    assert probe(pair) == ALL_OPEN


def test_selective_and_visibility(pair: Pair) -> None:
    backend = NftablesBackend(netns=pair.srv)
    backend.apply(backend.render(server_policy(EnforcementMode.SELECTIVE)))
    assert probe(pair) == ALL_OPEN  # selective: default allow
    backend.apply(backend.render(server_policy(EnforcementMode.SELECTIVE, deny_81=True)))
    assert probe(pair) == ONLY_80  # the deny is enforced

    backend.apply(backend.render(server_policy(EnforcementMode.VISIBILITY, deny_81=True)))
    assert probe(pair) == ALL_OPEN  # visibility: nothing dropped ...
    listing = backend.runner.list_table("stockade") or ""
    counted = [
        line.strip()
        for line in listing.splitlines()
        if 'comment "deny/no-81"' in line and "counter packets 0 " not in line
    ]
    # ... but the would-be drop was counted, v4 and v6, in the rule's one verdict chain
    assert len(counted) == 1, listing
    packets = int(counted[0].split("counter packets ")[1].split()[0])
    assert packets >= 2, listing


def test_outbound_enforced_at_the_client(pair: Pair) -> None:
    hp = HostPolicy(
        workload="cli",
        mode=EnforcementMode.FULL,
        local_addresses=(ipaddress.ip_address(CLI4), ipaddress.ip_address(CLI6)),
        rules=(
            HostRule(Action.ALLOW, Direction.OUTBOUND, "ruleset/web/1", "pservers", (ServiceEntry(Proto.TCP, 80, 80),)),
        ),
        sets=(
            AddressSet("pservers", Family.V4, (ipaddress.ip_network(SRV4),)),
            AddressSet("pservers", Family.V6, (ipaddress.ip_network(SRV6),)),
        ),
        failsafe=Failsafe(),
    )
    backend = NftablesBackend(netns=pair.cli)
    backend.apply(backend.render(hp))
    assert probe(pair) == ONLY_80
    backend.apply(backend.render(replace(hp, mode=EnforcementMode.IDLE)))
    assert probe(pair) == ALL_OPEN


# ---- NFLOG: visibility mode logs would-be drops to the configured group ---------------------

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULNL_CFG_CMD_BIND = 1
NFULA_PREFIX = 10


def nflog_socket(netns: str, group: int) -> socket.socket:
    sock = open_socket(netns)
    sock.bind((0, 0))
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, group) + struct.pack(
        "=HHB3x", 5, NFULA_CFG_CMD, NFULNL_CFG_CMD_BIND
    )
    msg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, 0x1 | 0x4, 1, 0) + body)
    sock.settimeout(2.0)
    return sock


def nflog_prefixes(sock: socket.socket, want: set[str]) -> set[str]:
    """Prefixes of logged packets, read until every wanted one is seen or nothing more comes."""
    seen: set[str] = set()
    try:
        while not want <= seen:
            data = sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, msg_type = struct.unpack_from("=IH", data, off)
                if msg_type == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                    attr = off + 20
                    while attr + 4 <= off + length:
                        alen, atype = struct.unpack_from("=HH", data, attr)
                        if alen < 4:
                            break
                        if atype & 0x7FFF == NFULA_PREFIX:
                            seen.add(data[attr + 4 : attr + alen].rstrip(b"\0").decode())
                        attr += (alen + 3) & ~3
                off += (length + 3) & ~3
    except TimeoutError:
        pass
    return seen


def test_visibility_logs_would_be_drops_to_nflog(pair: Pair) -> None:
    backend = NftablesBackend(netns=pair.srv, log_group=7)
    backend.apply(backend.render(server_policy(EnforcementMode.VISIBILITY, deny_81=True)))
    sock = nflog_socket(pair.srv, 7)
    try:
        assert probe(pair) == ALL_OPEN  # nothing dropped
        subprocess.run(
            ["ip", "netns", "exec", pair.cli, sys.executable, "-c", PROBE, f"{SRV4}:82"],
            capture_output=True,
            check=True,
        )
        want = {"stk:pb:deny/no-81", "stk:pb:default"}
        assert nflog_prefixes(sock, want) >= want
    finally:
        sock.close()
