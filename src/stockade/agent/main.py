"""Agent commands: run (``stockade agent``), ``install`` and ``uninstall``.

``stockade agent --controller URL --activation-code-file FILE`` (or the code in the environment
variable ``STOCKADE_ACTIVATION_CODE``) enrols on first run and then runs on the stored credential.
The code is never an argument: command lines are world-readable (``ps``, ``/proc/*/cmdline``).
``--netns NS`` runs the whole agent inside a named network namespace (labs and end-to-end tests
run several agents on one machine that way). ``stockade agent rotate-key`` replaces the agent's
host key (the running agent picks it up).

Start-up latency matters (after a reboot the host is open until the cache is back), so the
run path imports only the state dir, the backend and the enforcer, enforces the cached
policy, and only then imports the runtime (httpx, pyroute2: ~0.2 s more). Those imports
are inside :func:`_run` on purpose, not to dodge a cycle. ``python -m stockade.agent``
skips the rest of the CLI's imports as well; the systemd unit uses it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

import click

from stockade.agent import wireguard_key
from stockade.agent.enforcer import Enforcer, enforce_cache
from stockade.agent.netns import enter_netns
from stockade.agent.state import DEFAULT_STATE_DIR, StateDir
from stockade.agent.systemd import UNIT_DIR, UNIT_NAME, UnitOptions, install_unit, remove_unit
from stockade.agent.systemd import notify as notify_systemd
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.wireguard import DEFAULT_PORT as WIREGUARD_PORT
from stockade.backends.wireguard import WireGuardDevice
from stockade.errors import StockadeError, ValidationError
from stockade.logs import configure_logging

log = logging.getLogger("stockade.agent")
DEFAULT_BACKEND = "nftables"
CODE_ENV = "STOCKADE_ACTIVATION_CODE"
T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _or_exit(action: Callable[[], T]) -> T:
    """Run ``action``; a Stockade error becomes a one-line message and exit status 1."""
    try:
        return action()
    except ValidationError as exc:
        _fail("; ".join(str(i) for i in exc.issues))
    except StockadeError as exc:
        _fail(str(exc))


ENCRYPTING_BACKENDS = frozenset({"nftables", "iptables", "ebpf"})  # declare Capability.ENCRYPT; take a WireGuard device


def make_backend(name: str, table: str | None, state_dir: Path | None = None) -> Any:
    """The configured backend, from the registry; the default one without importing it.

    ``stockade.backends.registry`` imports every backend (eBPF, iptables, F5, Windows...):
    about 0.15 s of CPU, which would delay enforcing the cache at boot by more than the rest
    of start-up together. So the default backend's class is imported directly (a test keeps
    it the registry's), and the registry is imported, here, only for another name.
    """
    options: dict[str, Any] = {"table": table} if table else {}
    if state_dir is not None and name in ENCRYPTING_BACKENDS:  # the host's own WireGuard interface and key
        options["wireguard"] = WireGuardDevice(wireguard_key.interface_name(state_dir), None,
                                               wireguard_key.key_path(state_dir))
    if name == DEFAULT_BACKEND:
        return NftablesBackend(**options)
    from stockade.backends.registry import get_backend

    return get_backend(name, **options)


def read_activation_code(path: str | None) -> str | None:
    """The code from ``path`` ("-": standard input) or, without one, from $STOCKADE_ACTIVATION_CODE
    (removed from the environment once read, so no child process inherits it)."""
    env = os.environ.pop(CODE_ENV, None)
    if path is None:
        return env.strip() or None if env else None
    try:
        text = sys.stdin.read(4096) if path == "-" else Path(path).read_text()[:4096]
    except OSError as exc:
        _fail(f"--activation-code-file: {exc}")
    code = text.strip()
    if not code:
        _fail(f"--activation-code-file: {path} is empty")
    return code


CODE_FILE_HELP = (f"File holding the activation code ('-': standard input); first run only. Or set ${CODE_ENV}. "
                  "Never given as an argument: command lines are visible to every user (ps).")


@click.group(invoke_without_command=True)
@click.option("--controller", default=None,
              help="Controller URL, e.g. https://10.0.0.1:8443 (first run); replicas: URLs separated by commas.")
@click.option("--activation-code-file", "code_file", default=None, help=CODE_FILE_HELP)
@click.option("--backend", "backend_name", default=DEFAULT_BACKEND, show_default=True,
              help="Enforcement backend (see `stockade backends`).")
@click.option("--table", default=None, help="Table the backend owns (default: the backend's own).")
@click.option("--switch-from", "switch_from", default=None,
              help="Backend enforcing now (e.g. iptables): at start the cached policy is put in force with "
                   "--backend first, verified, and only then the old backend's rules are removed (no gap).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The controller's CA certificate (PEM), pinned for every connection.")
@click.option("--netns", default=None, help="Run inside this named network namespace (/run/netns/NAME).")
@click.option("--hostname", default=None, help="Report this hostname (default: the system's).")
@click.option("--long-poll", type=float, default=None,
              help="Long-poll timeout cap, seconds (default: the hold the controller advertises, 20 s until it "
                   "does).")
@click.option("--tamper-interval", type=float, default=0.5, show_default=True,
              help="Seconds between read-back comparisons of the firewall.")
@click.option("--wireguard-rotate-hours", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Make and register a new WireGuard key this often (0: only on `rotate-wireguard-key`).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--log-format", type=click.Choice(["text", "json", "logfmt"]), default="text", show_default=True,
              help="log lines on stderr: plain text, JSON lines or logfmt (control characters escaped)")
@click.pass_context
def agent(
    ctx: click.Context,
    controller: str | None,
    code_file: str | None,
    backend_name: str,
    table: str | None,
    switch_from: str | None,
    state_dir: Path,
    ca_cert: Path | None,
    netns: str | None,
    hostname: str | None,
    long_poll: float | None,
    tamper_interval: float,
    wireguard_rotate_hours: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run the agent: enforce the cached policy, enrol, follow the controller, stay enforced."""
    if ctx.invoked_subcommand is not None:
        return
    activation_code = read_activation_code(code_file)
    if netns:
        _or_exit(lambda: enter_netns(netns))  # first: setns only moves the calling thread
    if log_format == "text":
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    else:
        configure_logging(log_level, log_format, sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with contextlib.suppress(AttributeError, ValueError, OSError):  # stderr without a file descriptor
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack
    state = StateDir(state_dir)
    if ca_cert is not None:
        pem = ca_cert.read_text()
        _or_exit(lambda: state.save_ca(pem))
    wanted = start_backend(state, backend_name)  # the controller's setting, cached, wins over --backend
    backend = _or_exit(lambda: make_backend(wanted, table, state_dir))
    run = RunOptions(backend_name, lambda name: make_backend(name, table, state_dir), wireguard_rotate_hours * 3600)
    previous = previous_backend(state, wanted, switch_from)
    if previous is not None:
        try:
            old = make_backend(previous, table, state_dir)
        except StockadeError as exc:
            log.error("cannot switch from backend %s (%s): starting on %s", previous, exc, wanted)
        else:
            _run(state, Enforcer(old), controller, activation_code, hostname, long_poll, tamper_interval,
                 run, switch_to=backend)
            return
    enforcer = Enforcer(backend)
    _run(state, enforcer, controller, activation_code, hostname, long_poll, tamper_interval, run)


@dataclass(frozen=True)
class RunOptions:
    """How the running agent follows the controller's backend setting."""

    default_backend: str  # --backend: what enforces when the workload's setting is null
    backend_factory: Callable[[str], Any]  # name -> a fresh backend (StockadeError: unavailable here)
    rotate_seconds: float = 0.0


def start_backend(state: StateDir, backend_name: str) -> str:
    """The backend to start on: the controller's setting in the cached policy when it names one
    (so a restart does not switch away from it and back), else ``--backend``."""
    try:
        cached = state.load_policy()
    except StockadeError:
        return backend_name
    return cached.policy.backend if cached is not None and cached.policy.backend else backend_name


def previous_backend(state: StateDir, backend_name: str, switch_from: str | None) -> str | None:
    """The backend to switch away from at start: ``--switch-from``, else the one the state dir says is
    in force when it differs from ``--backend`` (changing --backend and restarting switches with no gap)."""
    previous = switch_from or state.load_backend()
    return previous if previous and previous != backend_name else None


def _run(
    state: StateDir,
    enforcer: Enforcer,
    controller: str | None,
    activation_code: str | None,
    hostname: str | None,
    long_poll: float | None,
    tamper_interval: float,
    run: RunOptions,
    switch_to: Any | None = None,
) -> None:
    cached = enforce_cache(state, enforcer)  # before the slow imports below
    if switch_to is not None:
        old = enforcer.backend.name
        try:
            enforcer.switch_backend(switch_to)  # make-before-break, before any watcher binds
            log.info("switched enforcement from %s to %s (make-before-break)", old, switch_to.name)
        except StockadeError as exc:
            log.error("backend switch failed, %s stays in force: %s", old, exc)
    state.save_backend(enforcer.backend.name)
    notify_systemd("READY=1")  # Type=notify: network-pre.target may proceed, the cache is in force
    from stockade.agent.agent import Agent, AgentOptions
    from stockade.agent.hostinfo import HostReport, read_host
    from stockade.agent.http_client import HttpControllerClient
    from stockade.agent.signing import process_instance
    from stockade.backends.registry import available_backends

    state.save_instance(process_instance())  # CLI commands on this host sign as this process

    def host_reader() -> HostReport:
        report = read_host()
        return replace(report, hostname=hostname) if hostname else report

    options = AgentOptions(
        controller=controller,
        activation_code=activation_code,
        long_poll_seconds=long_poll,
        tamper_interval=tamper_interval,
        wireguard_rotate_interval=run.rotate_seconds,
        default_backend=run.default_backend,
        available_backends=available_backends(),
    )
    runtime = Agent(options, state, enforcer, HttpControllerClient, host_reader=host_reader, cache=cached,
                    backend_factory=run.backend_factory)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping (rules stay in force)", signum)
        runtime.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime.start()
    runtime.wait()
    runtime.stop()
    # Everything is persisted and the rules stay in force: skip the interpreter's teardown, which frees
    # the prover's BDD managers object by object and took seconds per agent (an init system or a lab
    # stopping many agents at once waited on it)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@agent.command()
@click.option("--controller", required=True, help="Controller URL the agent enrols with.")
@click.option("--activation-code-file", "code_file", default=None,
              help=f"File with the activation code ('-': standard input), or set ${CODE_ENV}. Stored in the "
                   "state dir (0600), not in the unit; used once at first start.")
@click.option("--backend", "backend_name", default=DEFAULT_BACKEND, show_default=True,
              help="Enforcement backend (see `stockade backends`).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--hostname", default=None)
@click.option("--python", "python", default=sys.executable, show_default=True,
              help="Interpreter the unit runs `-m stockade.agent` with.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--start/--no-start", default=False, help="Also systemctl daemon-reload + enable --now.")
def install(
    controller: str,
    code_file: str | None,
    backend_name: str,
    state_dir: Path,
    ca_cert: Path | None,
    hostname: str | None,
    python: str,
    unit_dir: Path,
    start: bool,
) -> None:
    """Write the systemd unit for this agent (and stash the activation code for its first start)."""
    state = StateDir(state_dir)
    activation_code = read_activation_code(code_file)
    if activation_code:
        state.save_activation_code(activation_code)
    if ca_cert is not None:
        pem = ca_cert.read_text()
        _or_exit(lambda: state.save_ca(pem))  # pinned from the state dir: the unit needs no --ca-cert
    opts = UnitOptions(python=python, controller=controller, backend=backend_name, state_dir=state_dir,
                       hostname=hostname)
    path = install_unit(opts, unit_dir)
    click.echo(f"wrote {path}")
    if start:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", UNIT_NAME)


@agent.command()
@click.option("--backend", "backend_name", default=DEFAULT_BACKEND, show_default=True,
              help="Enforcement backend (see `stockade backends`).")
@click.option("--table", default=None)
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--netns", default=None, help="The namespace the agent ran in.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR, show_default=True)
def uninstall(backend_name: str, table: str | None, state_dir: Path, netns: str | None, unit_dir: Path) -> None:
    """Stop the service, remove the rules, tell the controller, delete the credential and the unit."""
    from stockade.agent.http_client import HttpControllerClient

    if (unit_dir / UNIT_NAME).exists():
        _systemctl("disable", "--now", UNIT_NAME)  # a running agent would put the rules back
    if netns:
        _or_exit(lambda: enter_netns(netns))
    state = StateDir(state_dir)
    backend = _or_exit(lambda: make_backend(backend_name, table, state_dir))  # its WireGuard interface too
    _or_exit(backend.remove)
    click.echo("removed the firewall rules")
    try:
        cred = state.load_credential()
    except StockadeError as exc:
        click.echo(f"warning: unreadable credential ({exc}); not telling the controller", err=True)
        cred = None
    if cred is not None:
        from stockade.agent.signing import adopt_instance

        adopt_instance(state.load_instance())
        client = HttpControllerClient(cred.controller, state.load_ca())
        client.use_credential(cred, state.load_ca())
        try:
            client.unenroll()
            click.echo(f"controller {cred.controller}: agent {cred.agent_id} unenrolled")
        except StockadeError as exc:
            click.echo(f"warning: could not tell the controller ({exc}); revoke agent {cred.agent_id} there",
                       err=True)
        finally:
            client.close()
    state.wipe()
    click.echo(f"deleted credential and cache in {state_dir}")
    if remove_unit(unit_dir):
        click.echo(f"removed {unit_dir / UNIT_NAME}")
        _systemctl("daemon-reload")


@agent.command("rotate-key")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
def rotate_key(state_dir: Path) -> None:
    """Replace this agent's host key: the controller takes the new key on a request signed with the
    old one; the running agent picks the new key file up. Run it if the key file may have been read."""
    from stockade.agent.http_client import HttpControllerClient
    from stockade.agent.signing import adopt_instance
    from stockade.agent.transport import ControllerUnreachableError
    from stockade.agent_signature import new_private_key

    state = StateDir(state_dir)
    cred = _or_exit(state.load_credential)
    if cred is None:
        _fail(f"not enrolled: no credential in {state_dir}")
    adopt_instance(state.load_instance())  # sign as the agent process running here, if any
    # a rotation whose outcome was unknown is retried with the same key (the controller takes the
    # same key again as a no-op), so a lost answer never leaves the agent with a key nobody knows
    key = _or_exit(state.load_next_key) or new_private_key()
    _or_exit(lambda: state.save_next_key(key))
    client = HttpControllerClient(cred.controller, state.load_ca())
    client.use_credential(cred, state.load_ca())
    try:
        client.rotate_key(key)
    except ControllerUnreachableError as exc:
        _fail(f"{exc}; the outcome is unknown: run `stockade agent rotate-key` again")
    except StockadeError as exc:
        state.drop_next_key()  # refused: the old key stays
        _fail(str(exc))
    finally:
        client.close()
    state.promote_next_key()
    click.echo(f"agent {cred.agent_id}: new host key in {state.key_path}; the old key no longer works")


@agent.command("rotate-wireguard-key")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
def rotate_wireguard_key(state_dir: Path) -> None:
    """Make a new WireGuard key on this host and register its public half. The running agent's
    read-back sees the key file change and loads it (sessions re-handshake once); run it on a
    schedule (a systemd timer or cron) or on demand."""
    from stockade.agent.http_client import HttpControllerClient
    from stockade.agent.signing import adopt_instance

    state = StateDir(state_dir)
    cred = _or_exit(state.load_credential)
    if cred is None:
        _fail(f"not enrolled: no credential in {state_dir}")
    adopt_instance(state.load_instance())
    public = _or_exit(lambda: wireguard_key.rotate(state_dir))
    client = HttpControllerClient(cred.controller, state.load_ca())
    client.use_credential(cred, state.load_ca())
    try:
        client.register_wireguard_key(public, None, WIREGUARD_PORT)
    except StockadeError as exc:
        _fail(f"{exc}; the new key is in place locally: run `stockade agent rotate-wireguard-key` again")
    finally:
        client.close()
    click.echo(f"agent {cred.agent_id}: new WireGuard key {public} registered")


def _systemctl(*args: str) -> None:
    if shutil.which("systemctl") is None:
        return
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        click.echo(f"warning: systemctl {' '.join(args)}: {proc.stderr.strip()}", err=True)
