"""Run inside a lab namespace: a continuous probe stream across a backend switch.

Args: server v4, server v6, ports (allowed-echo, allowed-new, blocked). Opens one persistent TCP
connection per family to the echo port and keeps it busy; every round also opens new connections
to the allowed port (must succeed) and the blocked port (must fail). Prints ``ready``, then
``tick N`` after every round; stops when stdin closes and prints the counts as JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import threading

BANNER_TIMEOUT = 5.0  # seconds for the server process to send its banner once connected


def main() -> None:
    v4, v6 = sys.argv[1], sys.argv[2]
    echo, allowed, blocked = (int(p) for p in sys.argv[3:6])
    addrs = [v4, v6]
    persistent = [socket.create_connection((a, echo), timeout=2.0) for a in addrs]
    stats: dict[str, object] = {"rounds": 0, "persistent_ok": 0, "persistent_fail": [], "allowed_ok": 0,
                                "allowed_fail": [], "blocked_refused": 0, "blocked_got_through": []}
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    n = 0
    while not stop.is_set():
        n += 1
        for a, s in zip(addrs, persistent, strict=True):
            try:
                s.sendall(b"ping\n")
                data = s.recv(16)
                if data != b"ping\n":
                    raise OSError(f"echo {data!r}")
                stats["persistent_ok"] = int(stats["persistent_ok"]) + 1  # type: ignore[call-overload]
            except OSError as exc:
                stats["persistent_fail"].append(f"round {n} {a}: {exc}")  # type: ignore[union-attr]
        for a in addrs:
            step = "connect"
            try:
                # The handshake is the kernel's alone: no SYN-ACK within 1 s means a packet was
                # dropped (the SYN is retransmitted only after 1 s). The banner comes from the lab's
                # server process, which a loaded machine may not schedule for a while: it is given
                # longer, so that a slow scheduler is not mistaken for a firewall gap.
                with socket.create_connection((a, allowed), timeout=1.0) as c:
                    step = "banner"
                    c.settimeout(BANNER_TIMEOUT)
                    if not c.recv(64):
                        raise OSError("no banner")
                stats["allowed_ok"] = int(stats["allowed_ok"]) + 1  # type: ignore[call-overload]
            except OSError as exc:
                stats["allowed_fail"].append(f"round {n} {a} ({step}): {exc}")  # type: ignore[union-attr]
            try:
                with socket.create_connection((a, blocked), timeout=0.15):
                    stats["blocked_got_through"].append(f"round {n} {a}")  # type: ignore[union-attr]
            except OSError:
                stats["blocked_refused"] = int(stats["blocked_refused"]) + 1  # type: ignore[call-overload]
        stats["rounds"] = n
        print(f"tick {n}", flush=True)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
