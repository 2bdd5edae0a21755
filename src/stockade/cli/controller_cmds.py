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

import difflib
import json
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from stockade.cli import main
from stockade.cli.config import read_login
from stockade.cli.errors import EXIT_FINDING, EXIT_REFUSED, EXIT_USAGE, CliError, fail_response
from stockade.errors import ValidationError

# On SIGTERM/Ctrl-C requests in flight get this long to finish; a long-poll (held ~2 minutes) is cut
# and its agent polls again (the rules in force stay in force)
GRACEFUL_SHUTDOWN_S = 3

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share"))) / "stockade"


def _syslog_target(value: str | None, fmt: str, ca_file: Path | None) -> Any:
    """``HOST:PORT`` (UDP) or ``udp://``, ``tcp://``, ``tls://HOST:PORT``."""
    if not value:
        return None
    from stockade.controller.services.events import SyslogFormat, SyslogTarget, SyslogTransport

    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "udp", value
    try:
        transport = SyslogTransport(scheme.lower())
    except ValueError:
        raise click.BadParameter(f"unknown transport {scheme!r}: use udp://, tcp:// or tls://",
                                 param_hint="--syslog") from None
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected [udp|tcp|tls://]HOST:PORT", param_hint="--syslog")
    if ca_file is not None and transport is not SyslogTransport.TLS:
        raise click.BadParameter("--syslog-ca only applies to tls://", param_hint="--syslog-ca")
    return SyslogTarget(host.strip("[]"), int(port), SyslogFormat(fmt), transport,
                        str(ca_file) if ca_file else None)


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
@click.option("--syslog", default=None,
              help="forward audit events (RFC 5424) to HOST:PORT over UDP, or udp://, tcp://, tls://HOST:PORT")
@click.option("--syslog-format", type=click.Choice(["json", "cef"]), default="json", show_default=True)
@click.option("--syslog-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CA of a tls:// syslog receiver (default: the system's)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json", "logfmt"]), default="text", show_default=True,
              help="controller log lines (stderr), access log included, each with its request id")
@click.option("--trusted-proxy", multiple=True, metavar="IP|CIDR",
              help="reverse proxy whose X-Forwarded-For/-Proto/-Host headers are believed (repeatable; "
                   "default: none, the headers are ignored)")
@click.option("--allowed-origin", multiple=True, metavar="URL",
              help="extra origin (https://host:port) allowed to make cookie-authenticated changes (repeatable)")
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
    syslog_ca: Path | None,
    log_level: str,
    log_format: str,
    trusted_proxy: tuple[str, ...],
    allowed_origin: tuple[str, ...],
) -> None:
    """Run the Stockade controller (REST API, policy distribution)."""
    import uvicorn

    from stockade.logs import configure_logging

    configure_logging(log_level, log_format)

    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.tls import ensure_tls

    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or f"sqlite:///{data_dir / 'stockade.db'}"
    try:
        settings = ControllerSettings(
            database_url=url,
            offline_after=offline_after,
            offline_grace=offline_grace,
            secure_cookies=not insecure_http,
            syslog=_syslog_target(syslog, syslog_format, syslog_ca),
            trusted_proxies=trusted_proxy,
            allowed_origins=allowed_origin,
        )
    except ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="--trusted-proxy/--allowed-origin") from None
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
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 (anyone on
    # this host); the app itself decides, from --trusted-proxy (stockade.controller.forwarded).
    # access_log=False: stockade.access logs every request (edge.py); uvicorn's own line, though disabled
    # in logging, was still formatted per request (client address, path) before being dropped
    uvicorn.run(app, host=host, port=port, log_config=None, log_level=log_level, timeout_keep_alive=75,
                backlog=4096, proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False,
                **ssl)


CONTROLLER_UNIT = """[Unit]
Description=Stockade controller (REST API, console, policy distribution)
Wants=network-online.target
After=network-online.target{after}

[Service]
Type=exec
ExecStart={python} -m stockade.cli controller --data-dir /var/lib/stockade --host {host} --port {port} \\
    --log-format json{extra}
Restart=on-failure
RestartSec=2
User=stockade
Group=stockade
StateDirectory=stockade
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
CapabilityBoundingSet={caps}
AmbientCapabilities={caps}
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


@main.command("controller-unit")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=int, default=8443, show_default=True)
@click.option("--database-url", default=None, help="PostgreSQL URL (default: SQLite in /var/lib/stockade)")
def controller_unit(host: str, port: int, database_url: str | None) -> None:
    """Print a hardened systemd unit for the controller (runs as user `stockade`; create it first:
    `useradd --system stockade`), e.g. `stockade controller-unit > /etc/systemd/system/stockade-controller.service`."""
    if database_url is not None and ("\n" in database_url or "'" in database_url):
        raise click.BadParameter("no newlines or quotes", param_hint="--database-url")
    caps = "CAP_NET_BIND_SERVICE" if port < 1024 else ""
    extra = f" \\\n    --database-url '{database_url}'" if database_url else ""
    after = " postgresql.service" if database_url and database_url.startswith("postgresql") else ""
    click.echo(CONTROLLER_UNIT.format(python=sys.executable, host=host, port=port, extra=extra, caps=caps,
                                      after=after), nl=False)


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
    click.option("--controller", "controller_url", envvar="STOCKADE_CONTROLLER", default=None,
                 help="controller URL [env STOCKADE_CONTROLLER; default: the `stockade login` file, "
                      "else https://127.0.0.1:8443]"),
    click.option("--api-key", envvar="STOCKADE_API_KEY", default=None,
                 help="API key [env STOCKADE_API_KEY; default: the one `stockade login` stored]"),
    click.option("--ca-cert", envvar="STOCKADE_CA_CERT", type=click.Path(path_type=Path), default=None,
                 help="CA to trust [env STOCKADE_CA_CERT; default: the login file's, else "
                      "<data-dir>/tls/ca.pem when present]"),
]


def client_options(fn: Any) -> Any:
    for opt in reversed(_client_options):
        fn = opt(fn)
    return fn


def _client(controller_url: str | None, api_key: str | None, ca_cert: Path | None) -> httpx.Client:
    stored = read_login()
    if stored is not None and (controller_url is None or controller_url.rstrip("/") == stored.controller):
        controller_url = controller_url or stored.controller
        api_key = api_key or stored.api_key
        if ca_cert is None and stored.ca_cert:
            ca_cert = Path(stored.ca_cert)
    controller_url = controller_url or "https://127.0.0.1:8443"
    if not api_key:
        raise CliError("no API key", EXIT_USAGE,
                       "run `stockade login`, or pass --api-key / set STOCKADE_API_KEY")
    verify: ssl.SSLContext | bool = True
    if ca_cert is None and (DEFAULT_DATA_DIR / "tls" / "ca.pem").exists():
        ca_cert = DEFAULT_DATA_DIR / "tls" / "ca.pem"
    if ca_cert is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_cert))
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"--ca-cert {ca_cert}: not a readable PEM CA certificate ({exc})", EXIT_USAGE) from None
    return httpx.Client(base_url=controller_url.rstrip("/") + "/api/v1", verify=verify, timeout=60,
                        headers={"Authorization": f"Bearer {api_key}"})


def _fail(response: httpx.Response) -> NoReturn:
    fail_response(response)


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


# API kind name -> the ``kind:`` of its YAML document (Settings holds the failsafe and has no name)
_YAML_KIND = {"label_key": "LabelKey", "workload": "Workload", "label_group": "LabelGroup", "ip_list": "IPList",
              "service": "Service", "ruleset": "Ruleset", "deny_rule": "DenyRule", "failsafe": "Settings"}


def _documents(text: str) -> dict[tuple[str, str], str]:
    """The documents of a ``dump_policy`` text keyed by (YAML kind, name)."""
    out: dict[tuple[str, str], str] = {}
    for chunk in text.split("\n---\n"):
        kind = re.search(r"^kind: (\S+)$", chunk, re.M)
        name = re.search(r"^name: (.+)$", chunk, re.M)
        if kind:
            out[(kind.group(1), name.group(1).strip() if name else "")] = chunk.strip("\n-") + "\n"
    return out


def _object_diffs(changes: list[dict[str, Any]], remote: str, local: str) -> list[str]:
    """A unified diff per changed object: the controller's document against the local one."""
    theirs, ours = _documents(remote), _documents(local)
    out: list[str] = []
    for c in changes:
        kind = _YAML_KIND.get(c["kind"], c["kind"])
        key = (kind, "" if kind == "Settings" else c["name"])
        before = theirs.get(key, "").splitlines(keepends=True)
        after = ours.get(key, "").splitlines(keepends=True)
        label = f"{c['kind']}/{c['name']}"
        out.append("".join(difflib.unified_diff(before, after, f"controller: {label}", f"local: {label}")))
    return [d for d in out if d]


def _put_draft(path: Path, dry_run: bool, controller_url: str | None, api_key: str | None,
               ca_cert: Path | None, *, as_json: bool = False) -> int:
    text = _read_policy_text(path)
    with _client(controller_url, api_key, ca_cert) as client:
        remote = ""
        if dry_run:
            current = client.get("/policy/draft")
            if current.status_code != 200:
                _fail(current)
            remote = current.text
        r = client.put("/policy/draft", params={"dry_run": str(dry_run).lower()}, content=text.encode(),
                       headers={"Content-Type": "application/yaml"})
    if r.status_code != 200:
        _fail(r)
    result = r.json()
    changes = result["draft_changes"] + result["inventory_changes"]
    diffs = _object_diffs(changes, remote, text) if dry_run else []
    if as_json:
        click.echo(json.dumps({"draft_changes": result["draft_changes"],
                               "inventory_changes": result["inventory_changes"], "diff": diffs}, indent=2))
        return len(changes)
    _print_changes("draft", result["draft_changes"])
    _print_changes("inventory", result["inventory_changes"])
    for d in diffs:
        click.echo(d, nl=False)
    verb = "would change" if dry_run else "changed"
    click.echo(f"{len(changes)} object(s) {verb}")
    return len(changes)


@policy_group.command("diff")
@click.option("-f", "--file", "path", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="the changes and per-object diffs as JSON")
@client_options
def policy_diff(path: Path, as_json: bool, controller_url: str | None, api_key: str | None,
                ca_cert: Path | None) -> None:
    """Show what applying DIR would change in the controller's draft: each changed object as a unified
    diff (controller -> local). Exit 0 when there is no difference, 1 when there is one."""
    if _put_draft(path, True, controller_url, api_key, ca_cert, as_json=as_json):
        sys.exit(EXIT_FINDING)


@policy_group.command("apply")
@click.option("-f", "--file", "path", type=click.Path(exists=True, path_type=Path), required=True)
@client_options
def policy_apply(path: Path, controller_url: str | None, api_key: str | None, ca_cert: Path | None) -> None:
    """Replace the controller's draft policy with DIR (workloads and label keys are upserted)."""
    _put_draft(path, False, controller_url, api_key, ca_cert)


@policy_group.command("export")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="directory to write policy.yaml into (created if absent)")
@click.option("--version", "version", default="draft", show_default=True, help="draft, active or a number")
@click.option("--force", is_flag=True, help="overwrite an existing policy.yaml")
@client_options
def policy_export(out_dir: Path, version: str, force: bool, controller_url: str | None, api_key: str | None,
                  ca_cert: Path | None) -> None:
    """Write the controller's policy (draft, active or version N) and inventory as a YAML directory that
    `stockade check` accepts and `stockade policy apply -f` round-trips without a difference."""
    target = out_dir / "policy.yaml"
    if target.exists() and not force:
        raise CliError(f"{target} exists", EXIT_USAGE, "pass --force to overwrite it")
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.get("/policy/draft", params={"version": version})
    if r.status_code != 200:
        _fail(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(r.text)
    click.echo(f"wrote {target} ({r.text.count(chr(10) + '---' + chr(10)) + 1} documents)")


@policy_group.command("provision")
@click.option("-m", "--message", required=True)
@click.option("--proceed", is_flag=True,
              help="confirm: provision even if the draft newly blocks or newly allows recorded flows, or widens a rule")
@client_options
def policy_provision(message: str, proceed: bool, controller_url: str | None, api_key: str | None,
                     ca_cert: Path | None) -> None:
    """Freeze the controller's draft as a new policy version."""
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.post("/policy/provision", json={"message": message}, params={"proceed": str(proceed).lower()})
    if r.status_code == 409 and r.json().get("error") == "ImpactRefusedError":  # issue 14: say which flag
        raise CliError(r.json()["message"], EXIT_REFUSED,
                       "review it with `stockade policy impact`, then run again with --proceed to provision anyway")
    if r.status_code != 201:
        _fail(r)
    v = r.json()
    affected = len(v["affected_workloads"])
    click.echo(f"version {v['number']}: {len(v['diff'])} change(s), {affected} workload(s) affected")
