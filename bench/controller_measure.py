"""bench/controller.py's measuring: CPU and RSS from /proc, percentiles, py-spy per replica, and
each replica's garbage collections (recorded in the server through ``gc.callbacks``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def record_collections(path: Path) -> None:
    """The garbage collector's pauses in this process, per generation (count, seconds, longest),
    written to ``path`` twice a second for the bench to diff around a scenario."""
    import gc
    import threading

    stats = {g: [0, 0.0, 0.0, 0.0] for g in range(3)}  # count, seconds, longest, CPU-seconds (its thread's)
    started = [0.0, 0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0], started[1] = time.perf_counter(), time.thread_time()
        else:
            took = time.perf_counter() - started[0]
            s = stats[info["generation"]]
            s[0], s[1], s[2] = s[0] + 1, s[1] + took, max(s[2], took)
            s[3] += time.thread_time() - started[1]

    def writer() -> None:
        while True:
            time.sleep(0.5)
            path.write_text(json.dumps(stats))

    gc.callbacks.append(callback)
    threading.Thread(target=writer, daemon=True).start()


def read_collections(path: Path) -> dict[int, list[float]]:
    try:
        return {int(g): [*v, 0.0][:4] for g, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        return {g: [0, 0.0, 0.0, 0.0] for g in range(3)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the given processes (from /proc; one that has exited counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def profilers(pids: list[int], out: str | None, scenario: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on every replica for one scenario (``--profile DIR``; collapsed stacks, stopped by SIGINT)."""
    if out is None:
        return []
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    Path(out).mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "--nonblocking", "-p", str(pid), "-r", "100", "-f", "raw", "-o",
                              f"{out}/{scenario}-replica{i}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i, pid in enumerate(pids)]


def stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(30)
