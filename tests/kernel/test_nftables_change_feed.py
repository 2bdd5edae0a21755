"""The nftables change feed in a real namespace, with what the lookup layout loads.

The agent used to run ``nft monitor`` as its feed. nftables 1.0.6's monitor prints an element of a
concatenated interval map (``inet_proto . inet_service : verdict``, the lookup tiers) as an endless
number in text mode (the agent's reader grew by hundreds of MiB and burned a core) and segfaults in
JSON mode. The feed now joins nf_tables' netlink group itself; these tests load such maps, tamper
with elements, flush and delete the table, and check every change is heard and the feed lives on.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from stockade.agent.watch import NetlinkFeed, feed_for
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.netlink import ElementChange, NftNetlink

MAP = """table inet stkfeed {
\tchain c1 { }
\tmap m { type inet_proto . inet_service : verdict; flags interval;
\t\telements = { 6 . 22 : jump c1, 17 . 1000-65535 : jump c1, 6 . 8000-8080 : jump c1 } }
\tset peers { type ipv4_addr; flags interval; elements = { 10.1.0.0/16 } }
\tchain inbound {
\t\ttype filter hook input priority 0; policy accept;
\t\tip saddr @peers meta l4proto . th dport vmap @m
\t}
}
"""
CHANGES = [
    MAP,
    "add element inet stkfeed m { 17 . 53 : jump c1 }\n",
    "add element inet stkfeed peers { 192.0.2.66 }\n",  # a tamper: an address slipped into a set
    "delete element inet stkfeed peers { 10.1.0.0/16 }\n",
    "flush table inet stkfeed\n",
    "delete table inet stkfeed\n" + MAP,
    "delete table inet stkfeed\n",
    "add table ip other\n",  # another table: heard too (the read-back says whether it matters)
    "delete table ip other\n",
]


def _nft(netns: str, text: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text, text=True, check=True)


def test_every_change_is_heard_and_the_feed_lives_on(netns: str) -> None:
    feed = feed_for(NftablesBackend(netns=netns).change_monitor())
    assert isinstance(feed, NetlinkFeed)
    pokes = threading.Semaphore(0)
    feed.start(pokes.release)  # joined when start returns: nothing after it is missed
    try:
        for _ in range(3):
            for change in CHANGES:
                _nft(netns, change)
                assert pokes.acquire(timeout=5.0), f"not heard: {change!r}"
                while pokes.acquire(timeout=0.05):
                    pass
                assert feed.alive
        time.sleep(0.6)
        assert not pokes.acquire(blocking=False), "a poke without a change"
    finally:
        feed.stop()
    assert not feed.alive


def test_a_change_in_another_namespace_is_not_heard(netns: str) -> None:
    other = f"stkfeed-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", other], check=True)
    pokes = threading.Semaphore(0)
    feed = feed_for(NftablesBackend(netns=netns).change_monitor())
    assert feed is not None
    feed.start(pokes.release)
    try:
        _nft(other, MAP)
        assert not pokes.acquire(timeout=0.5)
        _nft(netns, MAP)
        assert pokes.acquire(timeout=5.0)
    finally:
        feed.stop()
        subprocess.run(["ip", "netns", "delete", other], check=False)


def test_the_agents_own_transactions_wake_nobody_and_a_foreign_one_does(netns: str) -> None:
    """Every set delta the node agent applies in a pod used to wake that pod's watch into one more
    read-back (~55 pods per pod created or deleted): the feed now skips transactions committed by one
    of this process's threads (nf_tables' NEWGEN names the committing thread). A change by another
    process (here ``nft``), right after, is heard as before."""
    _nft(netns, MAP)
    feed = feed_for(NftablesBackend(netns=netns).change_monitor())
    assert isinstance(feed, NetlinkFeed)
    pokes = threading.Semaphore(0)
    feed.start(pokes.release)
    nl = NftNetlink(netns)
    appliers = ThreadPoolExecutor(2)  # the agent's own deltas, from worker threads as the pods' appliers
    try:
        for i in range(5):
            change = ElementChange("peers", True, (ipaddress.ip_network(f"192.0.2.{i}/32"),), ())
            appliers.submit(nl.change_elements, "stkfeed", (change,)).result()
        assert not pokes.acquire(timeout=0.6), "the agent's own delta woke the watch"
        assert feed.own_commits == 5
        _nft(netns, "add element inet stkfeed peers { 198.51.100.7 }\n")  # a tamper
        assert pokes.acquire(timeout=5.0), "a foreign change not heard"
        assert feed.alive
    finally:
        appliers.shutdown()
        nl.close()
        feed.stop()
