"""Kernel: the agent's NFLOG reader with kernel-side batching loses nothing and delays nothing.

The reader asks the kernel for up to 256 messages per netlink datagram (issue 22: fewer reader
wake-ups, logging must cost <= 10%) with a 0.1 s flush timeout, and coalesces the packets of
one flow per read. A flow lost or delayed beyond the flow-report interval (2 s) would be a
bug, so: a single logged packet must arrive within the flush timeout (not after the kernel's
default 1 s, nor never), and a burst of 2,000 packets in 5 flows must arrive as exactly
5 x 400 with no overrun, in far fewer LoggedPackets than packets.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from stockade.agent.nflog import LoggedPacket, NflogReader
from stockade.evaluator import Verdict
from stockade.model.services import Proto
from tests.e2e.harness import bound, load_note

pytestmark = pytest.mark.kernel
GROUP = 5
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ports, count = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2])
for _ in range(count):
    for port in ports:
        s.sendto(b"x" * 32, ("127.0.0.1", port))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"stk-nflog-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        ruleset = ("table inet stk_nflog_test {\n chain out {\n  type filter hook output priority 0;\n"
                   f'  udp dport 9000-9004 log prefix "stk:a:ruleset/t/0" group {GROUP}\n }}\n}}\n')
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, text=True, check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def send(ns: str, ports: list[int], count: int) -> None:
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SEND, ",".join(map(str, ports)), str(count)],
                   check=True)


def collect(reader: NflogReader, want: int, timeout: float) -> list[LoggedPacket]:
    out: list[LoggedPacket] = []
    deadline = time.monotonic() + timeout
    while sum(p.count for p in out) < want and time.monotonic() < deadline:
        out += reader.read(0.05)
    return out


def test_a_single_logged_packet_arrives_within_the_flush_timeout(netns: str) -> None:
    with NflogReader(GROUP, netns=netns) as reader:
        send(netns, [9000], 1)
        sent = time.monotonic()
        packets = collect(reader, 1, 5.0)
        waited = time.monotonic() - sent
    print(f"one packet arrived after {waited * 1e3:.0f} ms ({load_note()})")
    assert [(p.key.proto, p.key.port, p.verdict, p.rule_id, p.count) for p in packets] == [
        (Proto.UDP, 9000, Verdict.ALLOWED, "ruleset/t/0", 1)]
    assert waited <= bound(0.5)  # flushed by the 0.1 s timeout; the kernel's default would be 1 s


def test_a_burst_arrives_complete_and_coalesced(netns: str) -> None:
    ports = [9000, 9001, 9002, 9003, 9004]
    with NflogReader(GROUP, netns=netns) as reader:
        send(netns, ports, 400)
        packets = collect(reader, 2000, bound(5.0))
        time.sleep(0.15)  # one more flush timeout: nothing beyond the 2,000 may come
        packets += reader.read(0.05)
        overruns, received = reader.overruns, reader.received
    per_flow = Counter[int | None]()
    for p in packets:
        per_flow[p.key.port] += p.count
    assert overruns == 0
    assert dict(per_flow) == {port: 400 for port in ports} and received == 2000
    assert len(packets) <= 2000 // 10, len(packets)  # coalesced per read, not one per packet
