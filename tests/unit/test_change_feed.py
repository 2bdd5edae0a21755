"""The change feed's reader: bounded memory and linear time whatever the monitor prints.

nftables 1.0.x's ``nft monitor`` prints an element of a concatenated interval map as an endless
hex number (no newline, ever). The old reader kept the open line and re-split all of it on every
read: the agent grew by hundreds of MiB and burned a core at rest (the e2e idle test caught it).
"""

from __future__ import annotations

import struct
import sys
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.agent.fake import wait_until
from stockade.agent.watch import CommandFeed, LineScan, NetlinkFeed
from stockade.backends.base import NetlinkGroup
from stockade.backends.nfnetlink import NFT_NEWGEN, NFTA_GEN_PROC_PID


def _whole(lines: list[bytes]) -> tuple[bool, list[bytes]]:
    """What the lines mean when read all at once: any change line, the error lines."""
    changed = any(ln.strip() and not ln.startswith(b"#") for ln in lines)
    errors = [ln[:512] for ln in lines if ln.lower().startswith((b"error", b"netlink"))]
    return changed, errors


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"add rule inet stockade x", b"# new generation 4", b"", b"\r", b"  ",
                                 b"netlink: Error: ENOBUFS", b"Error: x", b"add element " + b"9" * 700]),
                max_size=8),
       st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_chunking_gives_what_reading_the_whole_gives(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(ln + b"\n" for ln in lines)
    scan, changed, errors, at = LineScan(), False, [], 0
    for cut in [*cuts, len(data)]:
        c, e, runaway = scan.feed(data[at : at + cut])
        changed, errors, at = changed or c, errors + e, at + cut
        assert not runaway
        if at >= len(data):
            break
    assert (changed, errors) == _whole(lines)


def test_a_line_without_end_is_a_runaway_in_bounded_memory() -> None:
    scan = LineScan(max_line=64 << 10)
    scan.feed(b"add element inet stockade m { 17 . 1000-0x")
    flagged = []
    for _ in range(200):  # 12.8 MiB of one line, as nft 1.0.6's monitor prints it
        _changed, _errors, runaway = scan.feed(b"0" * 65536)
        flagged.append(runaway)
        assert len(scan._head) <= 512  # the memory kept per line
    assert flagged[0] and sum(flagged) >= 99  # every further 64 KiB of it says so again
    assert scan.feed(b"0\nadd rule inet stockade y\n")[0]  # and the lines after it still count


def test_a_long_line_under_the_bound_is_one_change() -> None:
    scan = LineScan(max_line=1 << 20)
    assert scan.feed(b"add element inet stockade peers { " + b"10.0.0.1, " * 20_000) == (False, [], False)
    assert scan.feed(b"10.0.0.2 }\n") == (True, [], False)


RUNAWAY = (
    "import os, sys, time\n"
    "marker = sys.argv[1]\n"
    "if not os.path.exists(marker):\n"
    "    open(marker, 'w').close()\n"
    "    sys.stdout.write('add element inet stockade m { 17 . 1000-0x'); sys.stdout.flush()\n"
    "    while True:\n"
    "        sys.stdout.write('0' * 65536); sys.stdout.flush()\n"
    "time.sleep(1.5); print('add rule inet stockade inbound x', flush=True); time.sleep(60)\n"
)


def test_a_runaway_monitor_is_restarted_and_its_next_changes_arrive(tmp_path: object) -> None:
    marker = f"{tmp_path}/ran-away"
    pokes: list[float] = []
    feed = CommandFeed([sys.executable, "-c", RUNAWAY, marker])
    feed.start(lambda: pokes.append(time.monotonic()))
    try:
        assert wait_until(lambda: feed.runaways == 1, 10.0), "the endless line was not caught"
        assert wait_until(lambda: len(pokes) >= 2, 10.0), "the change after the restart never arrived"
        assert feed.alive and feed.runaways == 1
    finally:
        feed.stop()
    assert wait_until(lambda: not feed.alive, 5.0)


def test_a_monitor_that_keeps_running_away_is_left_stopped(tmp_path: object) -> None:
    script = "import sys\nwhile True:\n    sys.stdout.write('0' * 65536); sys.stdout.flush()\n"
    ended = threading.Event()
    feed = CommandFeed([sys.executable, "-c", script])
    feed.start(ended.set)
    try:
        assert wait_until(lambda: feed.runaways >= 2 and not feed.alive, 15.0), feed.runaways
        assert ended.is_set()
        time.sleep(1.5)
        assert feed.runaways == 2 and not feed.alive  # no restart loop: the watcher polls and retries later
    finally:
        feed.stop()


def _msg(msg_type: int, attrs: bytes = b"") -> bytes:
    body = b"\x00\x00\x00\x03" + attrs  # nfgenmsg, then the attributes
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def _tid(tid: int) -> bytes:
    return struct.pack("=HH", 8, NFTA_GEN_PROC_PID) + struct.pack("!I", tid)


def test_only_a_transaction_committed_by_one_of_our_threads_is_no_change() -> None:
    """nf_tables' NEWGEN ends each transaction and names the committing thread: our own (an apply,
    a delta, a restore: each read back by itself) wakes nobody; anything unsure is a change."""
    feed = NetlinkFeed(NetlinkGroup(12, 7, None, commit_type=NFT_NEWGEN, commit_tid_attr=NFTA_GEN_PROC_PID))
    elem = _msg((10 << 8) | 12)  # NEWSETELEM
    own, other = threading.get_native_id(), 2**31 - 5  # no thread of ours has that id
    assert feed._sort(elem, False) == (False, True)  # a change, its commit not read yet
    assert feed._sort(_msg(NFT_NEWGEN, _tid(own)), True) == (False, False) and feed.own_commits == 1
    assert feed._sort(elem + _msg(NFT_NEWGEN, _tid(own)), False) == (False, False)
    assert feed._sort(elem + _msg(NFT_NEWGEN, _tid(other)), False) == (True, False)  # another process
    assert feed._sort(_msg(NFT_NEWGEN), True) == (True, False)  # no thread id: can't tell whose
    assert feed._sort((elem + _msg(NFT_NEWGEN, _tid(own)))[:-3], False) == (True, False)  # cut short
    assert feed._sort(_msg(NFT_NEWGEN, _tid(own)) + elem, False) == (False, True)  # the next one began
