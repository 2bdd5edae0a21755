"""The NFLOG decoder: raw flow bytes decide the flow key, one LoggedPacket per flow and read.

Issue 22 (flow logging must cost <= 10%): the reader used to build addresses, a FlowKey and a
LoggedPacket for every logged packet (~12-15 us each). :class:`NflogDecoder` counts packets by
the few bytes that decide their flow (:func:`flow_bytes`) and parses one per distinct flow.
These tests prove that this shortcut means the same as the full parse: the same flow bytes
always give the same :func:`parse_packet` result (a randomized sweep), counts add up, foreign
prefixes stay ignored, the forward hook's side is asked afresh every read, the cache stays
bounded and malformed datagrams neither raise nor loop.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import defaultdict

from stockade.agent import nflog
from stockade.agent.flows import FlowBuffer
from stockade.agent.nflog import (
    NF_INET_FORWARD,
    NF_INET_LOCAL_IN,
    NFULA_PACKET_HDR,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NflogDecoder,
    flow_bytes,
    parse_packet,
)
from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.model.services import Proto
from stockade.visibility.flows import FlowKey

A = ipaddress.ip_address


def v4(proto: int, l4: bytes, *, src: str = "10.0.0.1", dst: str = "10.0.0.2", options: bytes = b"",
       frag: int = 0, ident: int = 0, ttl: int = 64) -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), ident, frag, ttl, proto, 0,
                       A(src).packed, A(dst).packed)
    return head + options + l4


def v6(next_header: int, l4: bytes, *, src: str = "fd00::1", dst: str = "fd00::2", hop: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(l4), next_header, hop, A(src).packed, A(dst).packed) + l4


def ports(sport: int, dport: int, rest: bytes = b"") -> bytes:
    return struct.pack("!HH", sport, dport) + rest


def attr(kind: int, data: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def message(payload: bytes, prefix: bytes = b"stk:a:ruleset/web/0", hook: int = NF_INET_LOCAL_IN) -> bytes:
    attrs = (attr(NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, hook)) + attr(4, struct.pack("!I", 3))
             + attr(NFULA_PREFIX, prefix + b"\0") + attr(8, b"\0" * 16) + attr(NFULA_PAYLOAD, payload))
    body = struct.pack("!BBH", 2, 0, 100) + attrs
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


def syn(sport: int, dport: int = 80, src: str = "10.0.0.1") -> bytes:
    return v4(6, ports(sport, dport, b"\0" * 36), src=src)


def random_packet(rng: random.Random) -> bytes:
    """Packets from small domains (so many share a flow) with everything else random."""
    proto = rng.choice((6, 17, 132, 1, 58, 47, 0, 44, 60))
    l4 = ports(rng.randrange(1, 65536), rng.choice((53, 80, 443)), rng.randbytes(rng.choice((0, 4, 16))))
    if proto in (1, 58):
        l4 = bytes([rng.choice((0, 8, 128))]) + rng.randbytes(rng.choice((0, 3, 7)))
    if proto in (0, 44, 60):  # IPv6 extension headers: hop-by-hop / fragment / destination options
        l4 = bytes([6, 0]) + rng.randbytes(6) + ports(rng.randrange(65536), 80)
    if rng.random() < 0.5 and proto not in (0, 44, 60):
        options = rng.choice((b"", b"", b"\x01\x01\x01\x00"))  # NOPs + end: ihl 6
        frag = rng.choice((0, 0, 0x2000, 0x4000, 0x0010, 0x2010))  # MF, DF, later fragments
        packet = v4(proto, l4, src=rng.choice(("10.0.0.1", "10.0.0.9")), dst=rng.choice(("10.0.0.2", "10.1.0.2")),
                    options=options, frag=frag, ident=rng.randrange(65536), ttl=rng.randrange(1, 256))
    else:
        packet = v6(proto, l4, src=rng.choice(("fd00::1", "fd00::9")), dst=rng.choice(("fd00::2", "fd01::2")),
                    hop=rng.randrange(256))
    return packet[: rng.choice((len(packet),) * 6 + (19, 20, 21, 22, 23, 40, 41, 43, 44))]


def test_the_same_flow_bytes_always_mean_the_same_flow_key() -> None:
    rng = random.Random(22)
    groups: dict[bytes, set[FlowKey | None]] = defaultdict(set)
    cut = 0
    for _ in range(12_000):
        packet = random_packet(rng)
        fb = flow_bytes(packet)
        if fb is not None:
            cut += 1
            groups[fb].add(parse_packet(packet))
    assert cut > 2_000 and len(groups) > 100  # the sweep exercises the shortcut widely
    clashes = {fb: keys for fb, keys in groups.items() if len(keys) != 1}
    assert not clashes, list(clashes.items())[:3]
    assert all(None not in keys for keys in groups.values())  # a cut packet always parses


def test_flow_bytes_cut_the_common_cases_and_leave_the_rest_to_the_full_parse() -> None:
    assert flow_bytes(syn(40000)) == flow_bytes(syn(40001))  # the source port is not in the key
    assert flow_bytes(syn(40000)) != flow_bytes(syn(40000, dport=81))
    assert flow_bytes(syn(40000)) != flow_bytes(syn(40000, src="10.0.0.9"))
    assert flow_bytes(v6(17, ports(1, 53, b"\0" * 4))) is not None
    assert flow_bytes(v4(1, b"\x08\0\0\0")) is not None and flow_bytes(v6(58, b"\x80\0\0\0")) is not None
    assert flow_bytes(v4(6, ports(1, 80), options=b"\x01\x01\x01\x00")) is None  # IP options
    assert flow_bytes(v4(6, ports(1, 80), frag=0x0010)) is None  # a later fragment
    assert flow_bytes(v6(0, bytes([6, 0]) + b"\0" * 6 + ports(1, 80))) is None  # extension header
    assert flow_bytes(v4(47, b"\0" * 8)) is None  # a protocol without ports: full parse


def test_one_logged_packet_per_flow_and_read_with_its_count() -> None:
    decoder = NflogDecoder(clock=lambda: 1000.0)
    datagram = b"".join(message(syn(40000 + i)) for i in range(64))  # one flow, 64 connections
    datagram += b"".join(message(syn(50000 + i, dport=443)) for i in range(3))
    datagram += message(syn(1), prefix=b"someone-else:")  # a foreign prefix
    datagram += message(v4(6, ports(2, 80, b"\0" * 16), options=b"\x01\x01\x01\x00"))  # full-parse path
    second = message(syn(60000)) + message(v4(1, b"\x08\0\0\0"), prefix=b"stk:d:deny/x")
    packets = decoder.decode([datagram, second])
    got: dict[tuple[int | None, Verdict, str, Direction], int] = defaultdict(int)
    for p in packets:
        got[(p.key.port, p.verdict, p.rule_id, p.side)] += p.count
    assert got == {
        (80, Verdict.ALLOWED, "ruleset/web/0", Direction.INBOUND): 66,  # 64 + the second datagram's + the optioned one
        (443, Verdict.ALLOWED, "ruleset/web/0", Direction.INBOUND): 3,
        (8, Verdict.BLOCKED, "deny/x", Direction.INBOUND): 1,
    }
    assert sorted(p.count for p in packets) == [1, 1, 3, 65]  # the optioned packet took the full parse
    assert sum(p.count for p in packets) == 70 == decoder.received
    assert decoder.ignored == 1
    web = next(p for p in packets if p.key.port == 80 and p.count >= 64)
    assert web.key == FlowKey(A("10.0.0.1"), A("10.0.0.2"), Proto.TCP, 80) and web.time == 1000.0
    buffer = FlowBuffer()
    for p in packets:
        buffer.add(p)
    records = {r.key.port: r.count for r in buffer.take(10)}
    assert records == {80: 66, 443: 3, 8: 1}  # the buffer counts packets, not LoggedPackets


def test_the_forward_hook_asks_is_local_on_every_read() -> None:
    local = {A("10.0.0.2")}
    decoder = NflogDecoder(is_local=lambda a: a in local)
    datagram = b"".join(message(syn(40000 + i), hook=NF_INET_FORWARD) for i in range(10))
    first = decoder.decode([datagram])
    assert [(p.side, p.count) for p in first] == [(Direction.INBOUND, 10)]
    local.clear()  # the host lost the address: the cached flow must not keep the old side
    assert [(p.side, p.count) for p in decoder.decode([datagram])] == [(Direction.OUTBOUND, 10)]


def test_the_cache_stays_bounded() -> None:
    decoder = NflogDecoder()
    flows = nflog._CACHE_MAX + 500
    for start in range(0, flows, 1000):
        decoder.decode([b"".join(message(syn(1, dport=1 + i % 65000, src=f"10.{i // 65000}.0.1"))
                                 for i in range(start, min(flows, start + 1000)))])
        assert len(decoder._cache) <= nflog._CACHE_MAX
    assert decoder.received == flows
    again = decoder.decode([message(syn(7, dport=5))])
    assert [(p.key.port, p.count) for p in again] == [(5, 1)]


def test_malformed_datagrams_neither_raise_nor_loop() -> None:
    decoder = NflogDecoder()
    good = message(syn(1))
    zero_length = struct.pack("=IHHII", 0, 4 << 8, 0, 0, 0) + good
    short_attr = good[:20] + struct.pack("=HH", 2, NFULA_PAYLOAD) + good[24:]
    for bad in (b"", b"\0" * 7, good[:30], good[:-5], zero_length, short_attr, good + b"\xff" * 9):
        decoder.decode([bad])
    assert decoder.received <= 3


def test_attributes_in_any_order_decode_the_same() -> None:
    payload = syn(40000)
    reordered = (attr(4, struct.pack("!I", 3)) + attr(NFULA_PAYLOAD, payload) + attr(NFULA_PREFIX, b"stk:a:r/x/1\0")
                 + attr(NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, NF_INET_LOCAL_IN)))
    body = struct.pack("!BBH", 2, 0, 100) + reordered
    odd = struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body
    usual = message(payload, prefix=b"stk:a:r/x/1")
    packets = NflogDecoder().decode([odd, usual])
    assert [(p.key.port, p.rule_id, p.side, p.count) for p in packets] == [(80, "r/x/1", Direction.INBOUND, 2)]
