"""Benchmark: CPU of the agent's NFLOG reader per logged message (issue 22, flow-logging cost).

Run as root: ``python bench/nflog_reader.py 100000 new /path/to/other/nflog.py ...``. A fresh
network namespace logs every UDP packet to ports 9000-9004 on loopback to NFLOG group 5; for
each reader named (``new``: this tree's ``NflogReader``; a path: the ``NflogReader`` of that
file, e.g. ``git show <commit>:src/stockade/agent/nflog.py``) one process reads the group into
a ``FlowBuffer`` while N packets are sent as fast as one Python sender can, and the reader's CPU
(utime + stime) divided by the messages it got is printed, with the messages and ENOBUFS
overruns. The load average is printed with every line: the machine may be shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

GROUP = 5
RULESET = ("table inet t {\n chain out {\n  type filter hook output priority 0;\n"
           f'  udp dport 9000-9004 log prefix "stk:a:ruleset/t/0" group {GROUP}\n }}\n}}\n')
READER = r"""
import importlib.util, sys, time
from stockade.agent.flows import FlowBuffer
if sys.argv[2] != "new":
    spec = importlib.util.spec_from_file_location("other_nflog", sys.argv[2])
    mod = sys.modules["other_nflog"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    Reader = mod.NflogReader
else:
    from stockade.agent.nflog import NflogReader as Reader
reader, buffer, want = Reader(int(sys.argv[1])), FlowBuffer(), int(sys.argv[3])
print("ready", flush=True)
got, deadline = 0, time.monotonic() + 20
while got < want and time.monotonic() < deadline:
    for p in reader.read(0.5):
        count = getattr(p, "count", 1)
        buffer._merge((p.key, p.side, p.verdict, p.rule_id), count, p.time, p.time)
        got += count
print(got, reader.overruns, flush=True)
"""
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[1])):
    s.sendto(b"x" * 32, ("127.0.0.1", 9000 + i % 5))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    if os.geteuid() != 0 or len(sys.argv) < 3:
        print("usage (root): nflog_reader.py MESSAGES new|PATH...", file=sys.stderr)
        return 1
    messages, ns = int(sys.argv[1]), f"stk-nflogb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=RULESET, text=True, check=True)
        for kind in sys.argv[2:]:
            reader = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", READER, str(GROUP), kind,
                                       str(messages)], stdout=subprocess.PIPE, text=True)
            try:
                assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
                before = cpu_seconds(reader.pid)
                subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SEND, str(messages)], check=True)
                got, overruns = (int(x) for x in reader.stdout.readline().split())
                cpu = cpu_seconds(reader.pid) - before
            finally:
                reader.kill()
                reader.wait()
            print(f"{kind[-40:]:<40} {messages:,} sent, {got:,} read, {overruns} overruns: "
                  f"{cpu * 1e6 / max(got, 1):.2f} us CPU per message (load {os.getloadavg()[0]:.1f})")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
