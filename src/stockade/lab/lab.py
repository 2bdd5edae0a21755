"""The kernel lab: throw-away network namespaces on one bridge, with servers and probers.

::

    with Lab([HostSpec("web", (v4, v6), tcp_ports=(80,), udp_ports=(53,)), ...]) as lab:
        results = lab.probe(probe_matrix(...))

Each host is a namespace ``stk<run>-<host>`` whose ``eth0`` sits on a bridge in the
namespace ``stk<run>-br``. One agent process per host (``nsagent.py``) serves the
host's TCP/UDP ports and runs that host's probes in parallel; all hosts probe at
once. ``close()`` (also run by ``__exit__``, at interpreter exit and on SIGTERM)
kills the agents and deletes every namespace, even after a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from stockade.lab import netns
from stockade.lab.netns import LabError
from stockade.lab.probes import Probe, ProbeResult, probe_to_wire, result_from_wire
from stockade.model.addresses import IPAddress

AGENT_SCRIPT = Path(__file__).with_name("nsagent.py")
DEFAULT_TIMEOUT = 0.4


@dataclass(frozen=True)
class HostSpec:
    """One lab host: its addresses and the ports its servers listen on."""

    name: str
    addresses: tuple[IPAddress, ...]
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    sctp_ports: tuple[int, ...] = ()  # INIT -> INIT-ACK over raw sockets (nsagent.py)


class _Agent:
    """A running ``nsagent.py`` in one namespace, spoken to in JSON lines."""

    def __init__(self, host: HostSpec, ns: str) -> None:
        self.host = host
        argv = netns.ns_exec_argv(
            ns,
            [
                sys.executable, "-I", str(AGENT_SCRIPT),
                "--name", host.name,
                "--tcp", ",".join(str(p) for p in host.tcp_ports),
                "--udp", ",".join(str(p) for p in host.udp_ports),
                "--sctp", ",".join(str(p) for p in host.sctp_ports),
            ],
        )
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        if self.proc.stdin is None or self.proc.stdout is None:
            raise LabError(f"agent {self.host.name}: no pipes")
        return self.proc.stdin, self.proc.stdout

    def send(self, request: dict[str, Any]) -> None:
        stdin, _ = self._pipes()
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except OSError as exc:
            raise LabError(f"agent {self.host.name} is gone: {exc}; {self._stderr()}") from exc

    def receive(self) -> dict[str, Any]:
        _, stdout = self._pipes()
        line = stdout.readline()
        if not line:
            raise LabError(f"agent {self.host.name} exited: {self._stderr()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise LabError(f"agent {self.host.name}: {answer['error']}")
        return answer

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read().strip()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


_LIVE_LABS: set[Lab] = set()
_LIVE_LOCK = threading.Lock()


def _close_all_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE_LABS)
    for lab in labs:
        lab.close()


atexit.register(_close_all_labs)


class Lab:
    """Network namespaces joined by a bridge, with servers on chosen ports and a prober."""

    def __init__(self, hosts: Sequence[HostSpec], *, run_id: str | None = None, blackhole: bool = True) -> None:
        """``blackhole=False``: the lab's ranges get no blackhole route in the root namespace. Only for labs
        whose probes all run between lab namespaces (they have no path out) and whose addresses may be
        anybody's (``import --verify`` samples the real peers of a ruleset: blackholing their /24s would cut
        this machine off from them while the lab runs)."""
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise LabError(f"duplicate lab host names: {names}")
        owner: dict[IPAddress, str] = {}
        for h in hosts:
            for a in h.addresses:
                if a in owner:
                    raise LabError(f"address {a} given to both {owner[a]} and {h.name}")
                owner[a] = h.name
        self.hosts: dict[str, HostSpec] = {h.name: h for h in hosts}
        self.run_id = run_id or netns.new_run_id()
        self.bridge_netns = f"{netns.NAME_PREFIX}{self.run_id}-br"
        self._netns = {h.name: f"{netns.NAME_PREFIX}{self.run_id}-{i}" for i, h in enumerate(hosts)}
        self._agents: dict[str, _Agent] = {}
        self.blackholed = netns.lab_networks([a for h in hosts for a in h.addresses]) if blackhole else []
        self._started = False
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __hash__(self) -> int:
        return id(self)

    def start(self) -> None:
        if self._started:
            raise LabError("lab already started")
        self._started = True
        netns.sweep_stale()
        with _LIVE_LOCK:
            _LIVE_LABS.add(self)
        _install_sigterm_handler()
        try:
            netns.write_state(self.run_id, [self.bridge_netns, *self._netns.values()])
            netns.blackhole(self.blackholed, add=True)
            netns.create_bridge_namespace(self.bridge_netns)
            for i, (name, ns) in enumerate(self._netns.items()):
                netns.create_host_namespace(ns, self.bridge_netns, f"p{i}", self.hosts[name].addresses)
            for name, ns in self._netns.items():
                self._agents[name] = _Agent(self.hosts[name], ns)
            for agent in self._agents.values():
                agent.receive()  # {"ready": true}
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every agent and delete every namespace. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        for agent in self._agents.values():
            with contextlib.suppress(Exception):
                agent.stop()
        for ns in [*self._netns.values(), self.bridge_netns]:
            with contextlib.suppress(Exception):
                netns.delete_namespace(ns)
        with contextlib.suppress(Exception):
            netns.remove_state(self.run_id)
        with contextlib.suppress(Exception):
            if not netns.other_labs_alive(self.run_id):
                netns.clear_blackholes()  # ours and any an earlier lab had to leave for a lab then running
        with _LIVE_LOCK:
            _LIVE_LABS.discard(self)

    # ---- queries ---------------------------------------------------------------------
    def netns(self, host: str) -> str:
        """The namespace name of ``host`` (for backends: ``NftablesBackend(netns=...)``)."""
        return self._netns[host]

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.bridge_netns, *self._netns.values())

    @property
    def agent_pids(self) -> tuple[int, ...]:
        return tuple(a.proc.pid for a in self._agents.values())

    def run_in(
        self, host: str, argv: Sequence[str], *, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host``'s namespace (argv list, no shell)."""
        return netns.run_in_netns(self._netns[host], argv, check=check, input=input)

    # ---- actions ---------------------------------------------------------------------
    def _agent(self, host: str) -> _Agent:
        self._require_running()
        try:
            return self._agents[host]
        except KeyError:
            raise LabError(f"no lab host {host!r}") from None

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise LabError("lab is not running")

    def probe(self, probes: Sequence[Probe], *, timeout: float = DEFAULT_TIMEOUT) -> tuple[ProbeResult, ...]:
        """Run every probe, each host's batch in parallel, all hosts at once; results in order."""
        self._require_running()
        batches: dict[str, list[dict[str, Any]]] = {}
        for i, p in enumerate(probes):
            if p.dst_host not in self.hosts:
                raise LabError(f"probe to unknown lab host {p.dst_host!r}")
            batches.setdefault(p.src_host, []).append(probe_to_wire(i, p, timeout))
        agents = [(self._agent(host), batch) for host, batch in batches.items()]
        for agent, batch in agents:
            agent.send({"op": "probe", "probes": batch})
        results: list[ProbeResult | None] = [None] * len(probes)
        for agent, _ in agents:
            for wire in agent.receive()["results"]:
                index = int(wire["id"])
                results[index] = result_from_wire(probes[index], wire)
        missing = [str(probes[i]) for i, r in enumerate(results) if r is None]
        if missing:
            raise LabError(f"no result for probes: {missing[:5]}")
        return tuple(r for r in results if r is not None)

    def flush_conntrack(self, hosts: Sequence[str] | None = None) -> None:
        """Forget tracked connections, so a new ruleset sees every probe as a new flow."""
        agents = [self._agent(h) for h in (hosts if hosts is not None else list(self.hosts))]
        for agent in agents:
            agent.send({"op": "flush_conntrack"})
        for agent in agents:
            agent.receive()


_previous_sigterm: Any = None
_sigterm_installed = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _close_all_labs()
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
    raise SystemExit(128 + signum)


def _install_sigterm_handler() -> None:
    """On SIGTERM, tear labs down before exiting (atexit does not run on a signal)."""
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _previous_sigterm = signal.getsignal(signal.SIGTERM)
    if _previous_sigterm not in (signal.SIG_DFL, None) and not callable(_previous_sigterm):
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True
