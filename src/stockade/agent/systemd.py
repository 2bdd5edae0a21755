"""The agent's systemd unit: rendered from the command-line options, written by ``stockade agent install``.

The shipped file ``packaging/systemd/stockade-agent.service`` is :func:`render_unit` with
default options (a test keeps them equal). The unit runs the agent as root (it programs
the firewall), restarts it whenever it stops, and starts it before the network comes up
so the cached policy is in force before any interface is (``Type=notify``: the agent
sends ``READY=1`` through ``$NOTIFY_SOCKET`` once the cache is enforced, see :func:`notify`).
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from stockade.agent.state import DEFAULT_STATE_DIR

UNIT_NAME = "stockade-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class UnitOptions:
    python: str = DEFAULT_PYTHON  # the interpreter stockade is installed for
    controller: str | None = None
    backend: str = "nftables"
    state_dir: Path = DEFAULT_STATE_DIR
    ca_cert: Path | None = None
    hostname: str | None = None


def exec_start(opts: UnitOptions) -> str:
    """The ``ExecStart=`` command line. The activation code is never in it: the first run
    enrols by hand (or with the code ``stockade agent install --activation-code-file`` stashed
    in the state dir) and later runs use the stored credential."""
    # ``-m stockade.agent`` is ``stockade agent`` without the rest of the CLI's imports.
    argv = [opts.python, "-m", "stockade.agent", "--backend", opts.backend, "--state-dir", str(opts.state_dir)]
    if opts.controller:
        argv += ["--controller", opts.controller]
    if opts.ca_cert is not None:
        argv += ["--ca-cert", str(opts.ca_cert)]
    if opts.hostname:
        argv += ["--hostname", opts.hostname]
    return shlex.join(argv)


def render_unit(opts: UnitOptions) -> str:
    # systemd creates /var/lib/<name> (0700) itself when the state dir is there.
    state = ""
    if opts.state_dir.parent == Path("/var/lib"):
        state = f"StateDirectory={opts.state_dir.name}\nStateDirectoryMode=0700\n"
    return f"""\
[Unit]
Description=Stockade microsegmentation agent
# Enforce the cached policy before interfaces come up; reach the controller once they are.
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
After=local-fs.target
Conflicts=shutdown.target

[Service]
# READY=1 is sent once the cached policy is enforced, so network-pre.target waits for it.
Type=notify
NotifyAccess=main
ExecStart={exec_start(opts)}
Restart=always
RestartSec=1
# Stopping the agent leaves the rules in force; `stockade agent uninstall` removes them.
KillMode=mixed
TimeoutStopSec=10
{state}UMask=0077
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
MemoryMax=256M

[Install]
WantedBy=multi-user.target
"""


def install_unit(opts: UnitOptions, unit_dir: Path = UNIT_DIR) -> Path:
    """Write the unit (mode 0644) and return its path. Enabling it is the caller's business."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_unit(opts))
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def remove_unit(unit_dir: Path = UNIT_DIR) -> bool:
    path = unit_dir / UNIT_NAME
    if path.exists():
        path.unlink()
        return True
    return False


def notify(state: str = "READY=1") -> bool:
    """Tell systemd (``$NOTIFY_SOCKET``) about our state; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
