"""Controller commands: ``stockade controller`` (run it) and ``stockade policy apply|diff|provision``.

``stockade controller`` serves the API over TLS on 127.0.0.1:8443 by default, with a CA and
server certificate it generates in ``<data-dir>/tls``; the SQLite database lives in the data
dir (default ``~/.local/share/stockade``) unless ``--database-url`` names PostgreSQL. On first
run it prints the ``admin`` owner's password once. ``--insecure-http`` serves plain HTTP (tests,
or behind a TLS-terminating proxy).

The policy commands talk to a running controller (``--controller`` / ``STOCKADE_CONTROLLER``,
``--api-key`` / ``STOCKADE_API_KEY``, ``--ca-cert`` / ``STOCKADE_CA_CERT``): ``diff -f DIR``
shows what ``apply -f DIR`` would change in the draft; ``apply`` writes it; ``provision -m``
freezes the draft as a new version. Files are checked locally first, so errors name file:line.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path
from typing import Any

import click
import httpx

from stockade.cli import main
from stockade.errors import ValidationError

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share"))) / "stockade"


def _syslog_target(value: str | None, fmt: str) -> Any:
    if not value:
        return None
    from stockade.controller.services.events import SyslogFormat, SyslogTarget

    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--syslog")
    return SyslogTarget(host.strip("[]"), int(port), SyslogFormat(fmt))


@main.command("controller")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--database-url", default=None, help="SQLAlchemy URL, e.g. postgresql://user@host/db")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8443, show_default=True)
@click.option("--insecure-http", is_flag=True, help="serve plain HTTP instead of TLS")
@click.option("--tls-name", multiple=True, help="extra host name or address for the server certificate")
@click.option("--offline-after", type=float, default=90.0, show_default=True, help="seconds without heartbeat")
@click.option("--offline-grace", type=float, default=None,
              help="seconds after going offline before a workload leaves peers' sets (default: never)")
@click.option("--syslog", default=None, help="forward audit events to HOST:PORT over UDP")
@click.option("--syslog-format", type=click.Choice(["json", "cef"]), default="json", show_default=True)
def controller(
    data_dir: Path,
    database_url: str | None,
    host: str,
    port: int,
    insecure_http: bool,
    tls_name: tuple[str, ...],
    offline_after: float,
    offline_grace: float | None,
    syslog: str | None,
    syslog_format: str,
) -> None:
    """Run the Stockade controller (REST API, policy distribution)."""
    import uvicorn

    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.tls import ensure_tls

    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or f"sqlite:///{data_dir / 'stockade.db'}"
    settings = ControllerSettings(
        database_url=url,
        offline_after=offline_after,
        offline_grace=offline_grace,
        secure_cookies=not insecure_http,
        syslog=_syslog_target(syslog, syslog_format),
    )
    app = create_app(settings)
    ctl = app.state.controller
    scheme = "http" if insecure_http else "https"
    shown = f"[{host}]" if ":" in host else host
    base = f"{scheme}://{shown}:{port}"
    ssl: dict[str, Any] = {}
    if not insecure_http:
        files = ensure_tls(data_dir / "tls", (host, *tls_name))
        ssl = {"ssl_certfile": str(files.server_cert), "ssl_keyfile": str(files.server_key)}
        click.echo(f"CA certificate: {files.ca_cert} (SHA-256 {files.ca_fingerprint()})")
    if ctl.first_run_credential is not None:
        user, password = ctl.first_run_credential
        click.echo(f"First run: owner account {user!r} with password {password}  (shown once; change it)")
    click.echo(f"Database: {url.split('@')[-1]}")
    click.echo(f"Console:  {base}/")
    click.echo(f"API:      {base}/api/v1")
    click.echo(f"OpenAPI:  {base}/api/v1/openapi.json")
    click.echo(f"Metrics:  {base}/metrics")
    sys.stdout.flush()
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=75,
                backlog=4096, **ssl)


# ---- policy as code against a running controller ---------------------------------------------


def _policy_group() -> click.Group:
    existing = main.commands.get("policy")
    if isinstance(existing, click.Group):
        return existing

    @main.group("policy")
    def policy() -> None:
        """Policy as code against a running controller's draft."""

    return policy


policy_group = _policy_group()

_client_options = [
    click.option("--controller", "controller_url", envvar="STOCKADE_CONTROLLER",
                 default="https://127.0.0.1:8443", show_default=True),
    click.option("--api-key", envvar="STOCKADE_API_KEY", required=True),
    click.option("--ca-cert", envvar="STOCKADE_CA_CERT", type=click.Path(path_type=Path), default=None,
                 help="CA to trust (default: <data-dir>/tls/ca.pem when present)"),
]


def client_options(fn: Any) -> Any:
    for opt in reversed(_client_options):
        fn = opt(fn)
    return fn


def _client(controller_url: str, api_key: str, ca_cert: Path | None) -> httpx.Client:
    verify: ssl.SSLContext | bool = True
    if ca_cert is None and (DEFAULT_DATA_DIR / "tls" / "ca.pem").exists():
        ca_cert = DEFAULT_DATA_DIR / "tls" / "ca.pem"
    if ca_cert is not None:
        verify = ssl.create_default_context(cafile=str(ca_cert))
    return httpx.Client(base_url=controller_url.rstrip("/") + "/api/v1", verify=verify, timeout=60,
                        headers={"Authorization": f"Bearer {api_key}"})


def _fail(response: httpx.Response) -> None:
    try:
        body = response.json()
    except ValueError:
        raise click.ClickException(f"{response.status_code}: {response.text[:500]}") from None
    lines = [f"{response.status_code} {body.get('error', '')}: {body.get('message', '')}"]
    lines += [f"  {i['field']}: {i['message']}" for i in body.get("issues", [])]
    raise click.ClickException("\n".join(lines))


def _read_policy_text(path: Path) -> str:
    from stockade.policyfile import dump_policy, load_policy

    try:
        return dump_policy(load_policy(path))
    except ValidationError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        raise SystemExit(1) from None


def _print_changes(title: str, changes: list[dict[str, Any]]) -> None:
    mark = {"added": "+", "removed": "-", "modified": "~"}
    for c in changes:
        fields = f" ({', '.join(c['fields'])})" if c.get("fields") else ""
        click.echo(f"{mark.get(c['change'], '?')} {title} {c['kind']} {c['name']}{fields}")


def _put_draft(path: Path, dry_run: bool, controller_url: str, api_key: str, ca_cert: Path | None) -> None:
    text = _read_policy_text(path)
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.put("/policy/draft", params={"dry_run": str(dry_run).lower()}, content=text.encode(),
                       headers={"Content-Type": "application/yaml"})
    if r.status_code != 200:
        _fail(r)
    result = r.json()
    _print_changes("draft", result["draft_changes"])
    _print_changes("inventory", result["inventory_changes"])
    total = len(result["draft_changes"]) + len(result["inventory_changes"])
    verb = "would change" if dry_run else "changed"
    click.echo(f"{total} object(s) {verb}")


@policy_group.command("diff")
@click.option("-f", "--file", "path", type=click.Path(exists=True, path_type=Path), required=True)
@client_options
def policy_diff(path: Path, controller_url: str, api_key: str, ca_cert: Path | None) -> None:
    """Show what applying DIR would change in the controller's draft."""
    _put_draft(path, True, controller_url, api_key, ca_cert)


@policy_group.command("apply")
@click.option("-f", "--file", "path", type=click.Path(exists=True, path_type=Path), required=True)
@client_options
def policy_apply(path: Path, controller_url: str, api_key: str, ca_cert: Path | None) -> None:
    """Replace the controller's draft policy with DIR (workloads and label keys are upserted)."""
    _put_draft(path, False, controller_url, api_key, ca_cert)


@policy_group.command("provision")
@click.option("-m", "--message", required=True)
@click.option("--proceed", is_flag=True, help="provision even if recorded flows would be newly blocked")
@client_options
def policy_provision(message: str, proceed: bool, controller_url: str, api_key: str, ca_cert: Path | None) -> None:
    """Freeze the controller's draft as a new policy version."""
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.post("/policy/provision", json={"message": message}, params={"proceed": str(proceed).lower()})
    if r.status_code != 201:
        _fail(r)
    v = r.json()
    affected = len(v["affected_workloads"])
    click.echo(f"version {v['number']}: {len(v['diff'])} change(s), {affected} workload(s) affected")
