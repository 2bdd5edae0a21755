"""The nftables lookup layout: verdict maps per tier, their peer deltas, and UDP flow logging once.

* the port dispatch sends every (address, protocol, port) to the FIRST rule of the tier that
  covers it (checked against a brute-force walk on random rules);
* in a real namespace, a peer set used by several rules of several tiers changes by element
  changes only (no reload: the chains' listing is untouched) and the kernel then holds
  exactly what a fresh render holds; the traffic follows;
* a one-way UDP flow (every packet conntrack-NEW) is logged to NFLOG once, not per packet;
  a second flow is logged again; dropped flows likewise; the flows remembered for that are
  not in ``read_back`` (traffic is not tampering).
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import socket
import struct
import subprocess
import sys
import time

import pytest

from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.lookup import port_groups, rule_chain
from stockade.backends.nftables.render import Layout
from stockade.backends.nftables.runner import normalise_counters
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.model.addresses import Family, merge_ranges
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from tests.kernel.test_nftables_traffic import (
    CLI4,
    CLI6,
    NFNL_SUBSYS_ULOG,
    NFULA_PREFIX,
    NFULNL_MSG_PACKET,
    SRV4,
    Pair,
    nflog_socket,
    pair,  # noqa: F401  (fixture)
    probe,
)

n = ipaddress.ip_network


# ---- pure: the partition means first match ---------------------------------------------------


def _random_rules(rng: random.Random) -> tuple[list[HostRule], dict[str, tuple[tuple[int, int], ...]]]:
    members = {}
    for p in range(4):
        ranges = []
        for _ in range(rng.randint(0, 4)):
            lo = rng.randint(0, 60)
            ranges.append((lo, lo + rng.randint(0, 8)))
        members[f"p{p}"] = merge_ranges(ranges)
    rules = []
    for i in range(rng.randint(1, 7)):
        entries = []
        for _ in range(rng.randint(1, 2)):
            proto = rng.choice((Proto.TCP, Proto.UDP, Proto.ANY, Proto.TCP))
            if proto is Proto.ANY:
                entries.append(ServiceEntry(proto))
            else:
                lo = rng.randint(1, 30)
                entries.append(ServiceEntry(proto, lo, lo + rng.randint(0, 5)))
        rules.append(HostRule(Action.ALLOW, Direction.INBOUND, f"r/{i}", f"p{rng.randint(0, 3)}", tuple(entries)))
    return rules, members


def _first_match(rules: list[HostRule], members: dict[str, tuple[tuple[int, int], ...]],
                 addr: int, proto: Proto, port: int) -> str | None:
    for r in rules:
        if not any(lo <= addr <= hi for lo, hi in members[r.peer]):
            continue
        for e in r.services:
            last = e.last if e.last is not None else e.first
            if e.proto is Proto.ANY or (e.proto is proto and e.first is not None and last is not None
                                        and e.first <= port <= last):
                return r.rule_id
    return None


def test_port_dispatch_gives_each_packet_to_the_first_rule() -> None:
    rng = random.Random(22)
    for _ in range(150):
        rules, members = _random_rules(rng)
        groups = port_groups(rules, Family.V4)
        for a, b in itertools.pairwise(groups):  # disjoint: the kernel requires it
            assert (a.proto, a.port_hi) < (b.proto, b.port_lo)
        by_chain = {rule_chain(r): r.rule_id for r in rules}
        for _ in range(300):
            addr, port = rng.randint(0, 75), rng.randint(0, 40)
            proto = rng.choice((Proto.TCP, Proto.UDP))
            number = 6 if proto is Proto.TCP else 17
            hits = [g for g in groups if g.proto == number and g.port_lo <= port <= g.port_hi]
            assert len(hits) <= 1
            got = None
            for peer, chain in hits[0].rules if hits else ():
                if any(lo <= addr <= hi for lo, hi in members[peer]):
                    got = by_chain[chain]
                    break
            assert got == _first_match(rules, members, addr, proto, port)


# ---- a policy whose peer set is used by several rules and tiers -------------------------------

def shared_peer_policy(clients4: tuple[str, ...], clients6: tuple[str, ...]) -> HostPolicy:
    tcp = lambda lo, hi=None: ServiceEntry(Proto.TCP, lo, hi)  # noqa: E731
    rules = (
        HostRule(Action.OVERRIDE_DENY, Direction.INBOUND, "deny/od-81", "pbad", (tcp(81),)),
        HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/web/0", "pclients", (tcp(80, 81),)),
        HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/web/1", "pclients", (ServiceEntry(Proto.ANY),)),
        HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/web/2", "pother", (tcp(80),)),
        HostRule(Action.DENY, Direction.INBOUND, "deny/no-81", "pclients", (tcp(81),)),
    )
    sets = []
    for name, v4, v6 in (("pbad", ("10.77.0.9",), ()), ("pclients", clients4, clients6),
                         ("pother", ("10.99.0.0/28",), ("fd99::/120",))):
        sets.append(AddressSet(name, Family.V4, tuple(n(a) for a in v4)))
        sets.append(AddressSet(name, Family.V6, tuple(n(a) for a in v6)))
    local = (ipaddress.ip_address(SRV4),)
    return HostPolicy("srv", EnforcementMode.FULL, local, rules, tuple(sorted(sets)), Failsafe())


def test_shared_peer_delta_is_element_changes_only(pair: Pair) -> None:  # noqa: F811
    backend = NftablesBackend(netns=pair.srv)
    backend.apply(backend.render(shared_peer_policy((), ())))
    assert not any(probe(pair).values())
    chains = normalise_counters(backend.runner.list_table("stockade", terse=True) or "")

    backend.apply_delta((SetDelta("pclients", Family.V4, (n(f"{CLI4}/32"),), ()),
                         SetDelta("pclients", Family.V6, (n(f"{CLI6}/128"),), ())))
    hp = shared_peer_policy((CLI4,), (CLI6,))
    assert backend.verify(backend.render(hp)).ok, backend.verify(backend.render(hp)).problems
    assert all(probe(pair).values())  # 80 and 81 by ruleset/web/0 (before the deny tier)
    assert normalise_counters(backend.runner.list_table("stockade", terse=True) or "") == chains  # no reload

    backend.apply_delta((SetDelta("pclients", Family.V4, (), (n(f"{CLI4}/32"),)),))
    hp = shared_peer_policy((), (CLI6,))
    assert backend.verify(backend.render(hp)).ok, backend.verify(backend.render(hp)).problems
    result = probe(pair)
    assert not any(v for k, v in result.items() if k.startswith(SRV4)) and all(
        v for k, v in result.items() if not k.startswith(SRV4)
    )
    backend.close()


# ---- UDP flow logging once ---------------------------------------------------------------


def _count_prefixes(sock: socket.socket, wait: float = 1.0) -> dict[str, int]:
    counts: dict[str, int] = {}
    sock.settimeout(wait)
    try:
        while True:
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
                            prefix = data[attr + 4 : attr + alen].rstrip(b"\0").decode()
                            counts[prefix] = counts.get(prefix, 0) + 1
                        attr += (alen + 3) & ~3
                off += (length + 3) & ~3
    except TimeoutError:
        pass
    return counts


SEND_UDP = (
    "import socket, sys\n"
    "for sport in map(int, sys.argv[3:]):\n"
    "    s = socket.socket(); s.close()\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', sport))\n"
    "    for _ in range(20): s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))\n"
    "    s.close()\n"
)


def udp_policy() -> HostPolicy:
    dns = (ServiceEntry(Proto.UDP, 53, 53),)
    rules = (
        HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/dns/0", "pclients", dns),
        HostRule(Action.DENY, Direction.INBOUND, "deny/no-54", "pclients", (ServiceEntry(Proto.UDP, 54, 54),)),
    )
    sets = (AddressSet("pclients", Family.V4, (n(CLI4),)), AddressSet("pclients", Family.V6, (n(CLI6),)))
    return HostPolicy("srv", EnforcementMode.FULL, (ipaddress.ip_address(SRV4),), rules, sets, Failsafe())


def test_one_way_udp_flow_is_logged_once(pair: Pair) -> None:  # noqa: F811
    backend = NftablesBackend(netns=pair.srv, log_group=9)
    backend.apply(backend.render(udp_policy()))
    baseline = backend.read_back()
    sock = nflog_socket(pair.srv, 9)
    try:
        _count_prefixes(sock, 0.2)
        for port, sports in ((53, ("40001", "40002")), (54, ("40003",))):  # 54: denied
            argv = ["ip", "netns", "exec", pair.cli, sys.executable, "-c", SEND_UDP, SRV4, str(port), *sports]
            subprocess.run(argv, check=True, capture_output=True)
        time.sleep(0.2)
        counts = _count_prefixes(sock)
        assert "expires" in (backend.runner.list_table("stockade") or "")  # the flows are remembered ...
        assert backend.read_back() == baseline  # ... and that is not tampering
    finally:
        sock.close()
        backend.close()
    # 40 allowed packets in two flows, 20 dropped packets in one flow
    assert counts.get("stk:a:ruleset/dns/0") == 2, counts
    assert counts.get("stk:d:deny/no-54") == 1, counts


@pytest.mark.parametrize("layout", list(Layout), ids=[x.value for x in Layout])
def test_both_layouts_enforce_the_same(pair: Pair, layout: Layout) -> None:  # noqa: F811
    backend = NftablesBackend(netns=pair.srv, layout=layout)
    hp = shared_peer_policy((CLI4,), ())
    backend.apply(backend.render(hp))
    assert backend.verify(backend.render(hp)).ok
    result = probe(pair)
    assert all(v for k, v in result.items() if k.startswith(SRV4))
    assert not any(v for k, v in result.items() if not k.startswith(SRV4))
    backend.close()
