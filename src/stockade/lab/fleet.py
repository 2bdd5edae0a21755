"""Real agents in a running lab: the link to the controller and one ``stockade agent`` per host.

The demo (``stockade demo``) and the end-to-end tests need the whole product, not a lab that
enforces policy behind the controller's back: each workload's namespace runs the real agent
(``python -m stockade.agent --netns NS``), which enrols with an activation code, pulls and
enforces its policy, and reports the flows its NFLOG group sees to the controller
(``POST /api/v1/agents/{id}/flows`` with its own credential). That is what fills the map.

Namespaces cannot reach the root namespace's loopback, so :class:`ControllerLink` joins the
root namespace to the lab bridge with a veth pair carrying the controller's lab addresses
(the policy's failsafe ``controller`` entries: every host's ruleset lets the agent reach them).
The controller listens on those addresses too.

The activation code goes to each agent in ``$STOCKADE_ACTIVATION_CODE`` (never on a command
line, which every user can read); ``code_argument=True`` adds ``--activation-code`` for agents
that predate the variable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stockade.lab.lab import Lab
from stockade.lab.netns import LabError, run_ip
from stockade.model.addresses import IPAddress

CODE_ENV = "STOCKADE_ACTIVATION_CODE"


class ControllerLink:
    """A veth pair: the root-namespace end holds the controller's lab addresses, the other is on the bridge."""

    def __init__(self, lab: Lab, addresses: Sequence[IPAddress]) -> None:
        self.name = f"stkc{lab.run_id}"[:15]
        run_ip(["link", "add", self.name, "type", "veth", "peer", "name", "ctl0", "netns", lab.bridge_netns])
        try:
            run_ip(["-n", lab.bridge_netns, "link", "set", "ctl0", "master", "br0", "up"])
            for a in addresses:
                if a.version == 4:
                    run_ip(["addr", "add", f"{a}/24", "dev", self.name])
                else:
                    run_ip(["-6", "addr", "add", f"{a}/64", "dev", self.name, "nodad"])
            run_ip(["link", "set", self.name, "up"])
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        run_ip(["link", "del", self.name], check=False)


@dataclass(frozen=True)
class AgentSpec:
    """One agent to run: the lab host (= workload name) and its activation code."""

    host: str
    code: str


class AgentFleet:
    """``stockade agent`` in each chosen lab host's namespace, logging to ``state_root/NAME.log``."""

    def __init__(self, lab: Lab, controller_url: str, ca_cert: Path | None, state_root: Path,
                 agents: Sequence[AgentSpec], *, code_argument: bool = False,
                 env: Mapping[str, str] | None = None) -> None:
        self.lab, self.controller_url, self.ca_cert = lab, controller_url, ca_cert
        self.state_root, self.specs, self.code_argument = state_root, tuple(agents), code_argument
        self.env = dict(env if env is not None else os.environ)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, spec: AgentSpec) -> list[str]:
        return [sys.executable, "-m", "stockade.agent", "--netns", self.lab.netns(spec.host),
                "--controller", self.controller_url, "--state-dir", str(self.state_root / spec.host),
                "--hostname", spec.host,
                *(["--ca-cert", str(self.ca_cert)] if self.ca_cert is not None else []),
                *(["--activation-code", spec.code] if self.code_argument else [])]

    def __enter__(self) -> AgentFleet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for spec in self.specs:
                if spec.host not in self.lab.hosts:
                    raise LabError(f"no lab host {spec.host!r} for an agent")
                with self.log_path(spec.host).open("ab") as log:
                    self.procs[spec.host] = subprocess.Popen(
                        self.argv(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        env={**self.env, CODE_ENV: spec.code})
        except BaseException:
            self.stop()
            raise

    def log_path(self, host: str) -> Path:
        return self.state_root / f"{host}.log"

    def dead(self) -> dict[str, int]:
        """Agents that have exited, with their exit codes."""
        return {h: rc for h, p in self.procs.items() if (rc := p.poll()) is not None}

    def log_tail(self, host: str, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path(host).read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        """SIGTERM every agent, then SIGKILL what is still running after 10 s. Never raises."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self.procs.clear()


__all__ = ["CODE_ENV", "AgentFleet", "AgentSpec", "ControllerLink"]
