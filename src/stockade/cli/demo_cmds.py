"""``stockade demo``: the whole product on the bundled example estate, on the embedded default.

1. Offline: validate and compile the example, explain a few connections (reference evaluator).
2. Control plane: start a real controller (SQLite in a fresh data dir, TLS with its own CA),
   load the example through the REST API as policy-as-code, provision it as version 1.
3. Enforcement (when run as root with nftables): bring the estate up in network namespaces,
   enforce every workload's compiled policy with nftables and probe every pair for real.
4. Keep serving (console and API) until Ctrl-C, unless ``--no-serve``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from stockade.cli import main
from stockade.cli.policy_cmds import load, run_demo, run_or_exit
from stockade.paths import example_estate


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _policy_yaml(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.y*ml") if not p.name.startswith("."))
    return "\n---\n".join(f.read_text() for f in files)


class _ServerThread(threading.Thread):
    """uvicorn in a background thread (it installs no signal handlers off the main thread)."""

    def __init__(self, app: Any, host: str, port: int, ssl_files: tuple[str, str] | None) -> None:
        super().__init__(daemon=True, name="stockade-demo-controller")
        import uvicorn

        kwargs: dict[str, Any] = {}
        if ssl_files is not None:
            kwargs = {"ssl_certfile": ssl_files[0], "ssl_keyfile": ssl_files[1]}
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    proxy_headers=False, **kwargs))

    def run(self) -> None:
        self.server.run()

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.is_alive() or time.monotonic() > deadline:
                raise click.ClickException("the controller did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)


def _api(base: str, ca: Path | None) -> Any:
    import httpx

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca is not None else True
    # a session cookie authenticates this client: its changes must name the controller's origin (CSRF rule)
    return httpx.Client(base_url=base + "/api/v1", verify=verify, timeout=60, headers={"Origin": base})


def _check(response: Any, what: str) -> Any:
    if response.status_code >= 400:
        raise click.ClickException(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json() if response.content else None


def _run_lab(policy_dir: Path) -> None:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        click.echo("lab: skipped (needs root, iproute2 and nftables: run `sudo stockade lab demo`)")
        return
    from stockade.lab.demo import OFFICE_CLIENT, controller_hosts
    from stockade.lab.demo import run_demo as run_lab_demo
    from stockade.lab.estate import registry_backend

    policy = load(policy_dir)
    report = run_or_exit(
        lambda: run_lab_demo(
            policy,
            unmanaged=[OFFICE_CLIENT, *controller_hosts(policy)],
            backend=registry_backend("nftables", table="stockade"),
        )
    )
    run = report.run
    allowed = sum(1 for c in run.checks if c.result.succeeded)
    click.echo(
        f"lab: {len(policy.workloads)} workloads enforced by nftables in network namespaces; "
        f"{len(run.checks)} real probes (TCP/UDP/ICMP, v4+v6): {allowed} connected, "
        f"{len(run.checks) - allowed} blocked; {len(run.disagreements)} disagreements with the evaluator"
    )


@main.command()
@click.option("--policy", "path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Policy dir (default: the bundled example estate).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Controller data dir (default: a fresh temporary directory).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8443, show_default=True, help="0 picks a free port.")
@click.option("--insecure-http", is_flag=True, help="Serve plain HTTP instead of TLS.")
@click.option("--lab/--no-lab", default=True, show_default=True,
              help="Enforce the estate in network namespaces and probe it (root only).")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Keep the controller running until Ctrl-C.")
def demo(path: Path | None, data_dir: Path | None, host: str, port: int, insecure_http: bool,
         lab: bool, serve: bool) -> None:
    """Run the demo on the bundled example estate (controller, API, console, and the kernel lab as root)."""
    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.tls import ensure_tls

    policy_dir = path if path is not None else run_or_exit(example_estate)
    click.echo("== 1. the policy, compiled and explained offline ==")
    click.echo(run_or_exit(lambda: run_demo(policy_dir)))

    click.echo("\n== 2. the controller, loaded through its REST API ==")
    data = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="stockade-demo-"))
    settings = ControllerSettings.for_data_dir(data, secure_cookies=not insecure_http)
    app = create_app(settings)
    credential = app.state.controller.first_run_credential
    port = port or _free_port(host)
    ca: Path | None = None
    ssl_files = None
    if not insecure_http:
        files = ensure_tls(data / "tls", (host,))
        ca = files.ca_cert
        ssl_files = (str(files.server_cert), str(files.server_key))
    base = f"{'http' if insecure_http else 'https'}://{host}:{port}"
    server = _ServerThread(app, host, port, ssl_files)
    server.start()
    try:
        server.wait_started()
        with _api(base, ca) as api:
            if credential is None:
                raise click.ClickException(f"{data} already has an owner: use a fresh --data-dir")
            user, password = credential
            _check(api.post("/auth/login", json={"username": user, "password": password}), "login")
            yaml_body = _policy_yaml(policy_dir)
            headers = {"content-type": "application/yaml"}
            result = _check(api.put("/policy/draft", content=yaml_body, headers=headers), "import the policy")
            version = _check(api.post("/policy/provision", json={"message": "demo: the example estate"}), "provision")
            workloads = _check(api.get("/workloads", params={"limit": 500}), "list workloads")
        changes = len(result.get("draft_changes", [])) + len(result.get("inventory_changes", []))
        count = len(workloads.get("items", [])) if isinstance(workloads, dict) else len(workloads)
        click.echo(f"imported {changes} objects; provisioned version {version.get('number')}; {count} workloads")
        click.echo(f"data dir: {data} (SQLite, WAL)")
        if ca is not None:
            click.echo(f"CA:       {ca}")
        click.echo(f"Console:  {base}/   (log in as {user!r} with password {password})")
        click.echo(f"API:      {base}/api/v1   OpenAPI: {base}/api/v1/openapi.json")

        if lab:
            click.echo("\n== 3. enforcement in the kernel lab ==")
            _run_lab(policy_dir)
        if serve:
            click.echo("\nServing; press Ctrl-C to stop.")
            sys.stdout.flush()
            while server.is_alive():
                server.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
