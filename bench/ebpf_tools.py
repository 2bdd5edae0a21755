"""The helpers ``bench/ebpf.py`` runs beside its backends: the C UDP sender and receiver (built
with the clang the eBPF backend uses) and the NFLOG listeners that read log messages in the
server namespace during the traffic tests (the agent's reader, a naive one, or an older reader
loaded from a file for A/B rows)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stockade.bpf.build import find_clang

LOG_GROUP = 100

SENDER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
/* sender DST PORT SECONDS: 64-byte UDP datagrams, 64 per sendmmsg, on one connected socket */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("connect"); return 1; }
    char payload[64] = {0};
    struct iovec iov = {payload, sizeof payload};
    struct mmsghdr msgs[64];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < 64; i++) { msgs[i].msg_hdr.msg_iov = &iov; msgs[i].msg_hdr.msg_iovlen = 1; }
    double end = now() + atof(argv[3]);
    long sent = 0;
    while (now() < end) { int n = sendmmsg(fd, msgs, 64, 0); if (n > 0) sent += n; }
    printf("%ld\n", sent);
    return 0;
}
"""
RECEIVER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
/* receiver PORT: counts datagrams; prints packets/s between the first and the last one */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0), big = 1 << 24;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    struct timeval tv = {0, 500000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    printf("ready\n"); fflush(stdout);
    char buf[64][128];
    struct iovec iov[64];
    struct mmsghdr msgs[64] = {0};
    for (int i = 0; i < 64; i++) { iov[i].iov_base = buf[i]; iov[i].iov_len = 128;
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1; }
    long got = 0; double first = 0, last = 0;
    for (;;) {
        int n = recvmmsg(fd, msgs, 64, 0, NULL);
        if (n <= 0) { if (got) break; continue; }
        if (!got) first = now();
        got += n; last = now();
    }
    printf("%.0f\n", got / (last - first > 0 ? last - first : 1));
    return 0;
}
"""


def build_tools(workdir: Path) -> tuple[Path, Path]:
    out = []
    for name, source in (("sender", SENDER_C), ("receiver", RECEIVER_C)):
        src = workdir / f"{name}.c"
        src.write_text(source)
        subprocess.run([find_clang(), "-O2", "-o", str(workdir / name), str(src)], check=True, capture_output=True)
        out.append(workdir / name)
    return out[0], out[1]


NAIVE_LISTENER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((0, 0))
body = struct.pack("!BBH", socket.AF_UNSPEC, 0, int(sys.argv[1])) + struct.pack("=HHB3x", 5, 1, 1)
s.send(struct.pack("=IHHII", 16 + len(body), (4 << 8) | 1, 0x1 | 0x4, 1, 0) + body)
print("ready", flush=True)
count = 0
s.settimeout(0.5)
while True:
    try:
        data = s.recv(1 << 16)
    except TimeoutError:
        continue
    except OSError:  # ENOBUFS: the reader fell behind; the kernel dropped some
        continue
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if kind == (4 << 8):
            count += 1
        off += max(16, (length + 3) & ~3)
"""
# The agent's own reader and buffer (FlowCollector's read loop, the upload replaced by a take()
# every 2 s): what logging costs on a host running the agent.
AGENT_LISTENER = r"""
import sys, time
from stockade.agent.flows import FlowBuffer
from stockade.agent.nflog import NflogReader
reader, buffer = NflogReader(int(sys.argv[1])), FlowBuffer()
print("ready", flush=True)
last = time.monotonic()
while True:
    for p in reader.read(0.5):
        buffer.add(p)
    if time.monotonic() - last >= 2.0:
        buffer.take(5000)
        last = time.monotonic()
"""
# The same with a reader module loaded from a file (``--old-reader``: e.g. the reader of an earlier
# commit, ``git show <commit>:src/stockade/agent/nflog.py > /tmp/old_nflog.py``), packet by packet.
OLD_LISTENER = r"""
import importlib.util, sys, time
from stockade.agent.flows import FlowBuffer
spec = importlib.util.spec_from_file_location("old_nflog", sys.argv[2])
old = sys.modules["old_nflog"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
reader, buffer = old.NflogReader(int(sys.argv[1])), FlowBuffer()
print("ready", flush=True)
last = time.monotonic()
while True:
    for p in reader.read(0.5):
        buffer._merge((p.key, p.side, p.verdict, p.rule_id), getattr(p, "count", 1), p.time, p.time)
    if time.monotonic() - last >= 2.0:
        buffer.take(5000)
        last = time.monotonic()
"""
LISTENERS = {"agent": AGENT_LISTENER, "naive": NAIVE_LISTENER, "oldreader": OLD_LISTENER}


class Listener:
    """The NFLOG reader running in the server namespace: ``agent`` (the agent's NflogReader and
    FlowBuffer), ``naive`` (one recv per message, the kernel's defaults: a netlink message per
    logged packet, whole packets) or ``none`` (no reader bound: the kernel skips the message)."""

    def __init__(self, netns: str, old_reader: str | None = None) -> None:
        self.netns = netns
        self.old_reader = old_reader
        self.kind = "none"
        self._proc: subprocess.Popen[str] | None = None

    def use(self, kind: str) -> None:
        if kind == self.kind:
            return
        self.stop()
        if kind != "none":
            extra = [self.old_reader or ""] if kind == "oldreader" else []
            self._proc = subprocess.Popen(["ip", "netns", "exec", self.netns, sys.executable, "-c", LISTENERS[kind],
                                           str(LOG_GROUP), *extra], stdout=subprocess.PIPE, text=True)
            assert self._proc.stdout is not None and self._proc.stdout.readline().strip() == "ready"
        self.kind = kind

    def pids(self) -> list[int]:
        return [] if self._proc is None else [self._proc.pid]

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self.kind = "none"

