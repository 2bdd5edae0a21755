"""eBPF taking over a namespace: the connections conntrack already tracks become flows.

The eBPF datapath keeps its own flow map (``stk_flows``) and never consults the kernel's
conntrack. A connection established before its programs were attached is unknown to it, and a
packet of an unknown flow is judged as opening a connection in its own direction: fine when the
local side speaks next (the policy allows the connection that way), fatal when the remote side
does (a server's banner leaves the provider with the client's ephemeral port as destination; a
pushed message reaches a consumer from the remote service's port). Every retransmission is
dropped the same way and the connection dies, though the policy allows it.

So on its first apply in a namespace, before and again right after attaching, the backend reads
conntrack's table (:mod:`stockade.backends.conntrack`; the nftables or iptables backend it
replaces in a make-before-break switch kept it) and the kernel's TCP socket table
(:mod:`stockade.backends.sockets`: the agent's first start on a host no firewall tracked), and
records each connection of this host as a flow of **epoch 0**, an epoch no policy ever has: the
program re-checks such a flow against the policy in force on its next packet (exactly as after a
policy change), keeps it when the policy allows the connection in its original direction and
revokes it otherwise. Seeding therefore never widens: it only spares allowed connections from
being judged backwards. Entries the program already recorded are never overwritten
(``BPF_NOEXIST``).
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections.abc import Iterable

from stockade.backends.conntrack import Tracked, tracked_connections
from stockade.backends.ebpf.syscall import BpfError, BpfMap
from stockade.backends.sockets import tcp_connections
from stockade.errors import BackendError

log = logging.getLogger("stockade.ebpf")

BPF_NOEXIST = 1
EEXIST = 17
DIR_IN, DIR_OUT, ACT_ALLOW = 0, 1, 1  # stockade.bpf.c
STALE_EPOCH = 0  # the loader's epochs start at 1: a flow of epoch 0 is re-checked on its next packet
CLOCK_MONOTONIC_COARSE = 6  # bpf_ktime_get_coarse_ns()'s clock
_KEY = struct.Struct("=BBHHH16s16s")  # struct flow_key (ports in network order)
_VAL = struct.Struct("=QIIBBBBI")  # struct flow_val

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def flow_entry(conn: Tracked, local: frozenset[Address], now_ns: int) -> tuple[bytes, bytes] | None:
    """The (key, value) of ``stk_flows`` for one tracked connection of this host; None for one
    that is not this host's (forwarded, or between two local addresses: loopback is not attached)."""
    if (conn.dst in local) == (conn.src in local):
        return None
    direction = DIR_IN if conn.dst in local else DIR_OUT
    family = 4 if conn.src.version == 4 else 6
    key = _KEY.pack(family, conn.proto, 0, struct.unpack("=H", struct.pack("!H", conn.sport))[0],
                    struct.unpack("=H", struct.pack("!H", conn.dport))[0],
                    conn.src.packed.ljust(16, b"\0"), conn.dst.packed.ljust(16, b"\0"))
    return key, _VAL.pack(now_ns, STALE_EPOCH, 0, direction, ACT_ALLOW, 0, 0, 0)


def seed(flows: BpfMap, conns: Iterable[Tracked], local: frozenset[Address]) -> int:
    """Record ``conns`` (this host's) as stale flows unless the program already has them."""
    now = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    added = 0
    for conn in conns:
        entry = flow_entry(conn, local, now)
        if entry is None:
            continue
        try:
            flows.update(*entry, flags=BPF_NOEXIST)
            added += 1
        except BpfError as exc:
            if exc.errno != EEXIST:
                raise
    return added


def seed_flows(flows: BpfMap, netns: str | None, local: Iterable[Address]) -> int:
    """This host's connections in ``netns`` as stale flows; how many were added. A source that
    cannot be read loses only the connections it would have spared (logged)."""
    mine, added = frozenset(local), 0
    for what, source in (("conntrack", tracked_connections), ("the TCP socket table", tcp_connections)):
        try:
            added += seed(flows, source(netns), mine)
        except BackendError as exc:
            log.warning("eBPF takeover: %s not read (%s); connections established before it are judged as new "
                        "by their next packet", what, exc)
    return added
