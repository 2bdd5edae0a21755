"""Agent commands: ``stockade agent`` (run), ``stockade agent install`` and ``stockade agent uninstall``.

``stockade agent --controller URL --activation-code CODE`` enrols on first run and then runs
on the stored credential; ``--netns NS`` runs the whole agent inside a named network
namespace (labs and end-to-end tests run several agents on one machine that way).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import click

from stockade.agent.agent import Agent, AgentOptions
from stockade.agent.enforcer import Enforcer
from stockade.agent.hostinfo import HostReport, read_host
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.netns import enter_netns
from stockade.agent.state import DEFAULT_STATE_DIR, StateDir
from stockade.agent.systemd import UNIT_DIR, UNIT_NAME, UnitOptions, install_unit, remove_unit
from stockade.backends.registry import BACKENDS, get_backend
from stockade.cli import main
from stockade.cli.policy_cmds import run_or_exit
from stockade.errors import StockadeError

log = logging.getLogger("stockade.agent")
_backend_choice = click.Choice(sorted(BACKENDS))


def _backend_options(table: str | None) -> dict[str, Any]:
    return {"table": table} if table else {}


def _host_reader(hostname: str | None) -> Any:
    if hostname is None:
        return read_host

    def reader() -> HostReport:
        return replace(read_host(), hostname=hostname)

    return reader


def _enter(netns: str | None) -> None:
    if netns:
        run_or_exit(lambda: enter_netns(netns))


@main.group(invoke_without_command=True)
@click.option("--controller", default=None, help="Controller URL, e.g. https://10.0.0.1:8443 (first run).")
@click.option("--activation-code", default=None, help="Activation code from a pairing profile (first run).")
@click.option("--backend", "backend_name", default="nftables", show_default=True, type=_backend_choice)
@click.option("--table", default=None, help="Table the backend owns (default: the backend's own).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The controller's CA certificate (PEM), pinned for every connection.")
@click.option("--netns", default=None, help="Run inside this named network namespace (/run/netns/NAME).")
@click.option("--hostname", default=None, help="Report this hostname (default: the system's).")
@click.option("--long-poll", type=float, default=20.0, show_default=True, help="Long-poll timeout, seconds.")
@click.option("--tamper-interval", type=float, default=0.5, show_default=True,
              help="Seconds between read-back comparisons of the firewall.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.pass_context
def agent(
    ctx: click.Context,
    controller: str | None,
    activation_code: str | None,
    backend_name: str,
    table: str | None,
    state_dir: Path,
    ca_cert: Path | None,
    netns: str | None,
    hostname: str | None,
    long_poll: float,
    tamper_interval: float,
    log_level: str,
) -> None:
    """Run the agent: enforce the cached policy, enrol, follow the controller, stay enforced."""
    if ctx.invoked_subcommand is not None:
        return
    _enter(netns)  # first: setns only moves the calling thread
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    state = StateDir(state_dir)
    if ca_cert is not None:
        pem = ca_cert.read_text()
        run_or_exit(lambda: state.save_ca(pem))
    backend = run_or_exit(lambda: get_backend(backend_name, **_backend_options(table)))
    options = AgentOptions(
        controller=controller,
        activation_code=activation_code,
        long_poll_seconds=long_poll,
        tamper_interval=tamper_interval,
    )
    runtime = Agent(options, state, Enforcer(backend), HttpControllerClient, host_reader=_host_reader(hostname))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping (rules stay in force)", signum)
        runtime.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime.start()
    runtime.wait()
    runtime.stop()


@agent.command()
@click.option("--controller", required=True, help="Controller URL the agent enrols with.")
@click.option("--activation-code", default=None,
              help="Stored in the state dir (0600), not in the unit; used once at first start.")
@click.option("--backend", "backend_name", default="nftables", show_default=True, type=_backend_choice)
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--hostname", default=None)
@click.option("--executable", default=None, help="Path of the stockade command (default: found on PATH).")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--start/--no-start", default=False, help="Also systemctl daemon-reload + enable --now.")
def install(
    controller: str,
    activation_code: str | None,
    backend_name: str,
    state_dir: Path,
    ca_cert: Path | None,
    hostname: str | None,
    executable: str | None,
    unit_dir: Path,
    start: bool,
) -> None:
    """Write the systemd unit for this agent (and stash the activation code for its first start)."""
    state = StateDir(state_dir)
    if activation_code:
        state.save_activation_code(activation_code)
    if ca_cert is not None:
        pem = ca_cert.read_text()
        run_or_exit(lambda: state.save_ca(pem))
    exe = executable or shutil.which("stockade") or "/usr/local/bin/stockade"
    # The CA is pinned from the state dir from now on; the unit needs no --ca-cert.
    opts = UnitOptions(executable=exe, controller=controller, backend=backend_name, state_dir=state_dir,
                       hostname=hostname)
    path = install_unit(opts, unit_dir)
    click.echo(f"wrote {path}")
    if start:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", UNIT_NAME)


@agent.command()
@click.option("--backend", "backend_name", default="nftables", show_default=True, type=_backend_choice)
@click.option("--table", default=None)
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--netns", default=None, help="The namespace the agent ran in.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR, show_default=True)
def uninstall(backend_name: str, table: str | None, state_dir: Path, netns: str | None, unit_dir: Path) -> None:
    """Stop the service, remove the rules, tell the controller, delete the credential and the unit."""
    if (unit_dir / UNIT_NAME).exists():
        _systemctl("disable", "--now", UNIT_NAME)
    _enter(netns)
    state = StateDir(state_dir)
    backend = run_or_exit(lambda: get_backend(backend_name, **_backend_options(table)))
    run_or_exit(backend.remove)
    click.echo("removed the firewall rules")
    try:
        cred = state.load_credential()
    except StockadeError as exc:
        click.echo(f"warning: unreadable credential ({exc}); not telling the controller", err=True)
        cred = None
    if cred is not None:
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


def _systemctl(*args: str) -> None:
    if shutil.which("systemctl") is None:
        return
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        click.echo(f"warning: systemctl {' '.join(args)}: {proc.stderr.strip()}", err=True)
