"""Change feeds: tell the tamper watcher *when* the firewall changed, so it need not poll fast.

A backend whose kernel reports changes is a :class:`~stockade.backends.base.ChangeFeedSource`:
it names where (the enforcer asks it once). Two kinds:

* :class:`NetlinkFeed` joins a netlink multicast group in the backend's namespace. For nftables
  that is ``NFNLGRP_NFTABLES``, the group ``nft monitor`` listens to: one message per change to
  any table (rule, set element, chain, table, flush) and a new generation per transaction. The
  messages are not decoded: each read is one poke.
* :class:`CommandFeed` runs a command that prints one line per change (a backend without a
  netlink group). Its reader keeps a bounded prefix of each line (:class:`LineScan`).

Every poke makes the watcher compare a read-back with the expected state (the feed says *that*
something changed, the read-back says *whether* it is ours). With a live feed the watcher still
reads back every second as a safety net (a feed that silently stops delivering cannot stretch a
restore past ~1 s); without one (no feed for the backend, or the feed died) it polls at the fast
interval and restarts the feed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pty
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from stockade.backends.base import NetlinkGroup
from stockade.backends.common import in_netns
from stockade.backends.nfnetlink import NETLINK_ADD_MEMBERSHIP, SO_RCVBUFFORCE, SOL_NETLINK

log = logging.getLogger("stockade.agent")


class ChangeFeed(Protocol):
    def start(self, on_change: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...

    @property
    def alive(self) -> bool: ...


MAX_LINE = 64 << 10  # a change line longer than this is a printer that does not stop
_KEEP = 512  # bytes of each line kept: enough to tell a comment, an error or a change, and to log it
_RESTART_GAP = 1.0  # a feed that runs away again within this many seconds is left dead


class LineScan:
    """Tells change lines from comments and error lines in a stream, in bounded memory.

    Only the first ``_KEEP`` bytes of a line are kept, so a line costs O(its length) once and memory
    stays bounded whatever the command prints. A line still open after ``max_line`` bytes is a
    *runaway*: nftables 1.0.x's ``nft monitor`` prints some concatenated interval elements
    (``inet_proto . inet_service`` ranges) as an endless hex number (measured here: 1 MiB in 3 s,
    never a newline); accumulating that line until its end grew the agent by hundreds of MiB and
    cost a core in re-splitting it.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._head = b""  # the first _KEEP bytes of the open line
        self._length = 0  # bytes of the open line so far

    def feed(self, chunk: bytes) -> tuple[bool, list[bytes], bool]:
        """(a change line ended in ``chunk``, error lines that ended in it, the open line ran away)."""
        *complete, rest = chunk.split(b"\n")
        changed, errors = False, []
        for segment in complete:
            head = (self._head + segment[: _KEEP]) if len(self._head) < _KEEP else self._head
            length = self._length + len(segment)
            self._head, self._length = b"", 0
            text = head.strip()
            if head.lower().startswith((b"error", b"netlink")):  # e.g. ENOBUFS after a burst
                errors.append(head)
            if (text or length > len(head)) and not head.startswith(b"#"):
                changed = True  # errors too: one poke makes the watcher read back
        if len(self._head) < _KEEP:
            self._head += rest[: _KEEP - len(self._head)]
        self._length += len(rest)
        if self._length > self.max_line:
            self._head, self._length = b"", 0
            return changed, errors, True
        return changed, errors, False


class CommandFeed:
    """Runs ``argv`` (argv list, no shell); each non-comment line it prints is a change.

    The command's stdout is a pseudo-terminal, not a pipe: C programs (``nft``) fully buffer
    stdout into a pipe, so a change would sit in a 4 KiB buffer instead of reaching us. A command
    that prints a line longer than ``max_line`` (:class:`LineScan`) is counted as a change,
    stopped and started again at once (a fresh monitor prints only what comes next); one that runs
    away again within a second is left dead, and the watcher polls until it restarts the feed.
    """

    def __init__(self, argv: Sequence[str], *, max_line: int = MAX_LINE) -> None:
        self.argv = list(argv)
        self.max_line = max_line
        self.runaways = 0  # lines over max_line seen so far
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._last_runaway = float("-inf")

    def start(self, on_change: Callable[[], None]) -> None:
        with self._lock:
            self._stopping = False
            self._spawn(on_change)

    def _spawn(self, on_change: Callable[[], None]) -> None:
        master, slave = pty.openpty()
        try:
            self._proc = subprocess.Popen(
                self.argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, close_fds=True
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._thread = threading.Thread(target=self._read, args=(master, self._proc, on_change),
                                        name="stockade-change-feed", daemon=True)
        self._thread.start()

    def _read(self, master: int, proc: subprocess.Popen[bytes], on_change: Callable[[], None]) -> None:
        scan = LineScan(self.max_line)
        runaway = False
        try:
            while not runaway:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command exited and the terminal closed
                    break
                if not chunk:
                    break
                changed, errors, runaway = scan.feed(chunk)
                for line in errors:
                    log.warning("change feed: %s", line.decode(errors="replace").strip())
                if changed or runaway:
                    on_change()  # one poke per read: a burst of lines is one change (errors too)
        finally:
            os.close(master)
        if runaway and self._restart(proc, on_change):
            return
        on_change()  # the feed ended: let the watcher notice (and poll fast)

    def _restart(self, proc: subprocess.Popen[bytes], on_change: Callable[[], None]) -> bool:
        """Stop a runaway command and start it again; False when it ran away too soon again."""
        self.runaways += 1
        _end(proc)
        now = time.monotonic()
        with self._lock:
            again = now - self._last_runaway < _RESTART_GAP
            self._last_runaway = now
            log.warning("change feed %s printed a line over %d bytes; %s", self.argv[-1], self.max_line,
                        "left stopped (it ran away again within 1 s)" if again else "restarted it")
            if self._stopping or again or proc is not self._proc:
                return False
            try:
                self._spawn(on_change)
            except OSError as exc:
                log.warning("change feed could not restart (%s)", exc)
                return False
        return True

    @property
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2.0)
        if proc.poll() is None:
            proc.kill()
            proc.wait(2.0)


class NetlinkFeed:
    """Joins ``spec``'s multicast group in its namespace; every read of announcements is one poke.

    A full receive buffer (``ENOBUFS``: the kernel dropped announcements) is a poke too: something
    changed. Any other socket error ends the feed (poked once more, ``alive`` turns False) and the
    watcher polls until it starts a new one.

    With ``spec.commit_type`` (nf_tables: NEWGEN, which ends every transaction and names the thread
    that committed it), a transaction committed by one of this process's own threads is no poke:
    the agent's applies, deltas and restores each read back what they wrote (their own baseline).
    Before, every set delta the node agent applied in a pod (~55 pods per pod created or deleted)
    woke that pod's watch into one more read-back and comparison. Anything else pokes as before: a
    commit by another process or thread id (``/proc/self/task/<id>`` absent, so an agent that does
    not see the host's thread ids pokes for every change), a commit message without the id, a
    message that can't be parsed, and changes whose commit message did not follow within
    ``COMMIT_WAIT``.
    """

    COMMIT_WAIT = 0.1

    def __init__(self, spec: NetlinkGroup, *, rcvbuf: int = 1 << 20) -> None:
        self.spec = spec
        self.rcvbuf = rcvbuf
        self.overruns = 0  # ENOBUFS seen
        self.own_commits = 0  # transactions of this process's threads (no poke)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.spec.protocol)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self.spec.group)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self, on_change: Callable[[], None]) -> None:
        sock = in_netns(self.spec.netns, self._open)  # joined before start returns: no change is missed
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, args=(sock, on_change),
                                        name="stockade-change-feed", daemon=True)
        self._thread.start()

    def _read(self, sock: socket.socket, on_change: Callable[[], None]) -> None:
        pending = False  # changes heard whose commit message has not been read yet
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([sock], [], [], self.COMMIT_WAIT if pending else 0.5)
                if not ready:
                    if pending:  # no commit message followed: a change all the same
                        pending = False
                        on_change()
                    continue
                poke = self.spec.commit_type is None
                try:
                    while data := sock.recv(1 << 16, socket.MSG_DONTWAIT):  # a burst is one change
                        if self.spec.commit_type is not None:
                            foreign, pending = self._sort(data, pending)
                            poke = poke or foreign
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.overruns += 1
                    poke, pending = True, False
                if poke:
                    on_change()
        except OSError as exc:
            log.warning("change feed (netlink group %d) ended: %s", self.spec.group, exc)
        finally:
            sock.close()
            on_change()  # the feed ended: let the watcher notice (and poll fast)

    def _sort(self, data: bytes, pending: bool) -> tuple[bool, bool]:
        """(a foreign change was committed, changes still wait for their commit message) after the
        messages of one read."""
        foreign, off = False, 0
        while off < len(data):
            if off + 16 > len(data):
                return True, False  # cut short: can't tell whose
            length, msg_type = struct.unpack_from("=IH", data, off)
            if length < 16 or off + length > len(data):
                return True, False
            if msg_type == self.spec.commit_type:
                tid = _commit_tid(data[off + 20 : off + length], self.spec.commit_tid_attr)  # after nfgenmsg
                if tid is not None and os.path.exists(f"/proc/self/task/{tid}"):
                    self.own_commits += 1
                else:
                    foreign = True
                pending = False
            else:
                pending = True
            off += (length + 3) & ~3
        return foreign, pending

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)


def _commit_tid(attrs: bytes, kind: int) -> int | None:
    """The big-endian u32 attribute ``kind`` of a commit message's attributes (None: absent)."""
    off = 0
    while off + 4 <= len(attrs):
        length, got = struct.unpack_from("=HH", attrs, off)
        if length < 4:
            return None
        if got & 0x3FFF == kind and length == 8:
            return int(struct.unpack_from("!I", attrs, off + 4)[0])
        off += (length + 3) & ~3
    return None


def feed_for(change_monitor: Sequence[str] | NetlinkGroup | None) -> ChangeFeed | None:
    """A feed following the backend's change monitor (``Enforcer.change_monitor``); None without one."""
    if isinstance(change_monitor, NetlinkGroup):
        return NetlinkFeed(change_monitor)
    return CommandFeed(change_monitor) if change_monitor else None
