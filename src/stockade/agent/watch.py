"""Change feeds: tell the tamper watcher *when* the firewall changed, so it need not poll fast.

A backend whose kernel reports changes is a :class:`~stockade.backends.base.ChangeFeedSource`:
it names a command (the enforcer asks it once) that prints one line per change. For nftables,
``nft monitor`` (inside the backend's namespace) prints one line per change to any table
(rule, set element, chain, table), including ``nft flush`` and netlink set-element batches.
Every such line pokes the watcher, which then compares a read-back with the expected state
(the feed says *that* something changed, the read-back says *whether* it is ours). With a
live feed the watcher still reads back every second as a safety net (a feed that silently
stops delivering cannot stretch a restore past ~1 s); without one (no feed for the backend,
or the feed process died) it polls at the fast interval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pty
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger("stockade.agent")


class ChangeFeed(Protocol):
    def start(self, on_change: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...

    @property
    def alive(self) -> bool: ...


class CommandFeed:
    """Runs ``argv`` (argv list, no shell); each non-comment line it prints is a change.

    The command's stdout is a pseudo-terminal, not a pipe: C programs (``nft``) fully buffer
    stdout into a pipe, so a change would sit in a 4 KiB buffer instead of reaching us.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_change: Callable[[], None]) -> None:
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
        self._thread = threading.Thread(target=self._read, args=(master, on_change),
                                        name="stockade-change-feed", daemon=True)
        self._thread.start()

    @staticmethod
    def _read(master: int, on_change: Callable[[], None]) -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command exited and the terminal closed
                    break
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for ln in lines:
                    if ln.lower().startswith((b"error", b"netlink")):  # e.g. ENOBUFS after a burst
                        log.warning("change feed: %s", ln.decode(errors="replace").strip())
                if any(ln.strip() and not ln.startswith(b"#") for ln in lines):
                    on_change()  # one poke per read: a burst of lines is one change (errors too)
        finally:
            os.close(master)
            on_change()  # the feed ended: let the watcher notice (and poll fast)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2.0)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(2.0)


def feed_for(change_monitor: Sequence[str] | None) -> ChangeFeed | None:
    """A feed running the backend's change monitor (``Enforcer.change_monitor``); None without one."""
    return CommandFeed(change_monitor) if change_monitor else None
