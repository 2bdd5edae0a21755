"""eBPF taking over from a conntrack-based backend keeps the connections the policy allows.

The eBPF datapath tracks flows in its own map (``stk_flows``), not in the kernel's conntrack. A
connection established before its programs were attached is unknown to it, and a packet of an
unknown flow is judged as a new connection in its own direction. When the local side speaks next
(a client's request, an echo) that is fine: the policy allows the connection in that direction.
When the *remote* side speaks next it is not: a server's banner or push at the provider's egress
(peer = the client, port = the client's ephemeral port), or a pushed message arriving for a
consumer's outbound connection, would be dropped by every retransmission, and the connection
dies. So when eBPF takes over a namespace whose connections are tracked by conntrack (the
nftables or iptables backend was in force: a make-before-break switch), it records every
conntrack connection as a flow of an *older policy epoch*: the program re-checks such a flow
against the policy in force on its next packet, exactly as after a policy change, so a connection
the policy does not allow (any more) is revoked, never picked up (the last test).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from stockade.agent.enforcer import Enforcer
from stockade.backends.common import in_netns
from stockade.backends.registry import get_backend
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.lab import HostSpec, Lab
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from tests.kernel.test_ebpf_backend import ebpf_skip_reason

pytestmark = pytest.mark.kernel

SERVER = (ipaddress.ip_address("10.70.245.1"), ipaddress.ip_address("fd70:245::1"))
CLIENT = (ipaddress.ip_address("10.70.245.2"), ipaddress.ip_address("fd70:245::2"))
INBOUND, OUTBOUND = 7100, 9100  # the server's service; the client's service
LISTENERS: list[socket.socket] = []


def policy(inbound: bool = True) -> HostPolicy:
    rules = [HostRule(Action.ALLOW, Direction.OUTBOUND, "ruleset/t/1", "client",
                      (ServiceEntry(Proto.TCP, OUTBOUND, OUTBOUND),))]
    if inbound:
        rules.insert(0, HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/t/0", "client",
                                 (ServiceEntry(Proto.TCP, INBOUND, INBOUND),)))
    return HostPolicy(
        workload="server", mode=EnforcementMode.FULL, local_addresses=SERVER, rules=tuple(rules),
        sets=(AddressSet("client", Family.V4, (ipaddress.ip_network(f"{CLIENT[0]}/32"),)),
              AddressSet("client", Family.V6, (ipaddress.ip_network(f"{CLIENT[1]}/128"),))),
        failsafe=Failsafe(management=()),
    )


def _listen(netns: str, family: int, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        s.listen(4)
        return s
    return in_netns(netns, make)


def connection(lab: Lab, src: str, dst_addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
               port: int) -> tuple[socket.socket, socket.socket]:
    """An established TCP connection from namespace ``src`` to ``dst_addr:port``: (connecting
    side, accepting side), one byte already exchanged each way."""
    family = socket.AF_INET if dst_addr.version == 4 else socket.AF_INET6
    dst = "client" if src == "server" else "server"
    listener = _listen(lab.netns(dst), family, port)  # kept listening, as a service does
    LISTENERS.append(listener)
    c = in_netns(lab.netns(src), lambda: socket.socket(family, socket.SOCK_STREAM))
    c.settimeout(3.0)
    c.connect((str(dst_addr), port))
    listener.settimeout(3.0)
    a, _ = listener.accept()
    a.settimeout(3.0)
    c.sendall(b"1")
    assert a.recv(1) == b"1"
    a.sendall(b"2")
    assert c.recv(1) == b"2"
    return c, a


def speaks(sender: socket.socket, receiver: socket.socket, timeout: float = 3.0) -> bool:
    """Does a message ``sender`` sends now reach ``receiver`` (TCP retransmits within ``timeout``)?"""
    sender.sendall(b"next")
    receiver.settimeout(timeout)
    try:
        return receiver.recv(4) == b"next"
    except OSError:
        return False


@pytest.fixture
def lab() -> Iterator[Lab]:
    if reason := ebpf_skip_reason():
        pytest.skip(reason)
    with Lab([HostSpec("server", SERVER), HostSpec("client", CLIENT)]) as lab:
        try:
            yield lab
        finally:
            while LISTENERS:
                LISTENERS.pop().close()
            for name in ("ebpf", "nftables", "iptables"):
                with contextlib.suppress(Exception):  # cleanup: the namespace is deleted next
                    get_backend(name, netns=lab.netns("server")).remove()


@pytest.mark.parametrize("old", ["nftables", "iptables", "none"])
def test_connections_whose_remote_side_speaks_next_survive_the_switch_to_ebpf(lab: Lab, old: str) -> None:
    """Per family: the server's banner on an inbound connection, and the remote service's push
    on the server's outbound connection, both established under ``old``, arrive after the switch.
    ``none``: no firewall at all before (conntrack not tracking): the agent's first start with
    eBPF on a live host, where the socket table says which connections exist."""
    ns = lab.netns("server")
    enforcer = Enforcer(get_backend(old, netns=ns)) if old != "none" else None
    if enforcer is not None:
        enforcer.enforce(policy())
    pairs = [(fam, connection(lab, "client", SERVER[fam], INBOUND), connection(lab, "server", CLIENT[fam], OUTBOUND))
             for fam in (0, 1)]
    try:
        if enforcer is not None:
            enforcer.switch_backend(get_backend("ebpf", netns=ns))
        else:
            Enforcer(get_backend("ebpf", netns=ns)).enforce(policy())
        for fam, (client, accepted), (local, remote) in pairs:
            assert speaks(accepted, client), f"{old} -> ebpf: the server's banner (family {fam}) was dropped"
            assert speaks(remote, local), f"{old} -> ebpf: the pushed reply (family {fam}) was dropped"
            assert speaks(client, accepted) and speaks(local, remote)  # and both stay usable both ways
    finally:
        for _, a, b in pairs:
            for s in (*a, *b):
                s.close()


def test_a_connection_the_policy_no_longer_allows_is_not_picked_up(lab: Lab) -> None:
    """Established under ``nftables`` while the policy allowed it; the policy then stops allowing
    it (conntrack's "established" keeps it alive under nftables); eBPF takes over: the seeded flow
    is re-checked against the policy in force and dropped, in both directions."""
    ns = lab.netns("server")
    enforcer = Enforcer(get_backend("nftables", netns=ns))
    enforcer.enforce(policy())
    pairs = [connection(lab, "client", SERVER[fam], INBOUND) for fam in (0, 1)]
    try:
        enforcer.enforce(policy(inbound=False))
        for client, accepted in pairs:  # conntrack's "established" lets it live under nftables ...
            assert speaks(accepted, client) and speaks(client, accepted)
        enforcer.switch_backend(get_backend("ebpf", netns=ns))
        for client, accepted in pairs:  # ... but the eBPF takeover judges it by the policy in force
            assert not speaks(accepted, client, timeout=1.0)
            assert not speaks(client, accepted, timeout=1.0)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
