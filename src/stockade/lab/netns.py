"""Network-namespace plumbing for the kernel lab: namespaces, a bridge, veth pairs.

Everything goes through ``ip`` with argv lists (never a shell). The bridge lives in
a namespace of its own, so the lab never touches the root namespace's links or
firewall. Every lab records its namespaces and its creator's pid in a state file
under ``/run/stockade-lab/``; ``sweep_stale()`` removes labs whose creator died
(killed with SIGKILL, say) so nothing accumulates across runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import string
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from stockade.errors import StockadeError
from stockade.model.addresses import IPAddress

STATE_DIR = Path("/run/stockade-lab")
NAME_PREFIX = "stk"
BRIDGE = "br0"
HOST_LINK = "eth0"


class LabError(StockadeError):
    """The kernel lab could not be built, driven or torn down."""


def new_run_id() -> str:
    """Six random lowercase letters/digits: namespaces are named ``stk<id>-...``."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(6))


def run_ip(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def ns_exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def run_in_netns(
    netns: str, argv: Sequence[str], *, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ns_exec_argv(netns, argv), capture_output=True, text=True, check=False, input=input, timeout=60
    )
    if check and proc.returncode != 0:
        raise LabError(f"in {netns}: {' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def list_namespaces() -> list[str]:
    proc = run_ip(["netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def create_bridge_namespace(netns: str) -> None:
    run_ip(["netns", "add", netns])
    run_ip(["-n", netns, "link", "set", "lo", "up"])
    run_ip(
        [
            "-n", netns, "link", "add", BRIDGE, "type", "bridge",
            "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0",
        ]
    )
    run_ip(["-n", netns, "link", "set", BRIDGE, "up"])


def create_host_namespace(netns: str, bridge_netns: str, port: str, addresses: Sequence[IPAddress]) -> None:
    """A namespace with loopback up and ``eth0`` on the bridge carrying ``addresses``.

    Addresses are host routes (/32, /128) with a default route out of ``eth0``: every
    lab host is on one segment whatever addresses it has, and nothing leaves the lab.
    IPv6 addresses are ``nodad`` (usable at once) and DAD is off for link-locals too.
    """
    run_ip(["netns", "add", netns])
    run_in_netns(
        netns,
        [
            "sysctl", "-q", "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv4.ping_group_range=0 2147483647",
        ],
    )
    run_ip(["-n", netns, "link", "set", "lo", "up"])
    run_ip(["-n", bridge_netns, "link", "add", port, "type", "veth", "peer", "name", HOST_LINK, "netns", netns])
    run_ip(["-n", bridge_netns, "link", "set", port, "master", BRIDGE, "up"])
    run_ip(["-n", netns, "link", "set", HOST_LINK, "up"])
    for addr in addresses:
        if addr.version == 4:
            run_ip(["-n", netns, "addr", "add", f"{addr}/32", "dev", HOST_LINK])
        else:
            run_ip(["-n", netns, "-6", "addr", "add", f"{addr}/128", "dev", HOST_LINK, "nodad"])
    run_ip(["-n", netns, "-4", "route", "add", "default", "dev", HOST_LINK])
    run_ip(["-n", netns, "-6", "route", "add", "default", "dev", HOST_LINK])


def namespace_pids(netns: str) -> list[int]:
    proc = run_ip(["netns", "pids", netns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def delete_namespace(netns: str) -> None:
    """Kill what still runs in ``netns`` (only lab namespaces reach here), then delete it."""
    for _ in range(20):
        pids = namespace_pids(netns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    run_ip(["netns", "del", netns], check=False)


# ---- state files and stale sweep ---------------------------------------------------


def state_path(run_id: str) -> Path:
    return STATE_DIR / f"{run_id}.json"


def write_state(run_id: str, namespaces: Sequence[str]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_path(run_id).write_text(json.dumps({"pid": os.getpid(), "namespaces": list(namespaces)}))


def remove_state(run_id: str) -> None:
    state_path(run_id).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces of labs whose creating process is gone; return their names."""
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            state = json.loads(path.read_text())
            pid = int(state["pid"])
            names = [str(n) for n in state["namespaces"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            continue
        existing = set(list_namespaces())
        for name in names:
            if name in existing and name.startswith(NAME_PREFIX):
                delete_namespace(name)
                removed.append(name)
        path.unlink(missing_ok=True)
    return removed


BLACKHOLE_METRIC = "4243"  # above any connected route (a lab link to the controller still wins); ours alone


def lab_networks(addresses: Sequence[IPAddress]) -> list[str]:
    """The /24 (IPv4) and /64 (IPv6) ranges around the lab's addresses."""
    nets = set()
    for a in addresses:
        prefix = 24 if a.version == 4 else 64
        nets.add(str(ipaddress.ip_network(f"{a}/{prefix}", strict=False)))
    return sorted(nets)


def blackhole(networks: Sequence[str], *, add: bool) -> None:
    """Give (or take back) the lab's ranges a ``blackhole`` route in the root namespace, so a probe to a
    lab address whose namespace is not up fails here instead of leaving through the default route."""
    for net in networks:
        family = "-6" if ":" in net else "-4"
        verb = "replace" if add else "del"
        run_ip([family, "route", verb, "blackhole", net, "metric", BLACKHOLE_METRIC], check=False)


def other_labs_alive(run_id: str) -> bool:
    """Whether a lab other than ``run_id`` has a state file (it may still need the blackhole routes)."""
    return STATE_DIR.is_dir() and any(p.stem != run_id for p in STATE_DIR.glob("*.json"))


def clear_blackholes() -> None:
    """Remove every lab blackhole route (ours: by metric), when no lab is left that could need one."""
    for family in ("-4", "-6"):
        out = run_ip([family, "route", "show", "type", "blackhole"], check=False).stdout
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] == "blackhole" and words[-2:] == ["metric", BLACKHOLE_METRIC]:
                run_ip([family, "route", "del", "blackhole", words[1], "metric", BLACKHOLE_METRIC], check=False)
