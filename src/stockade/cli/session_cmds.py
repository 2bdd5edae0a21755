"""Getting a credential for the client commands, and shell completion.

* ``stockade login [--controller URL] [--user admin] [--ca-cert PEM]`` - asks for the password (or reads
  ``STOCKADE_PASSWORD``), logs in, creates an API key for this machine with the user's own role and
  scope, ends the console session, and stores the key in the CLI credentials file (mode 0600; see
  :mod:`stockade.cli.config`). Every client command then works without ``--api-key``.
* ``stockade logout`` - revokes that key at the controller and deletes the file.
* ``stockade key create NAME --role R [--scope k=v]`` - a further key (printed once), for CI or scripts.
* ``stockade completion bash|zsh|fish`` - the completion script for a shell (click's own).
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import click
import httpx

from stockade.cli import main
from stockade.cli.config import StoredLogin, config_path, forget_login, read_login, write_login
from stockade.cli.controller_cmds import DEFAULT_DATA_DIR, _client, client_options
from stockade.cli.errors import EXIT_USAGE, CliError, fail_response


def _verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    if ca_cert is None and (DEFAULT_DATA_DIR / "tls" / "ca.pem").exists():
        ca_cert = DEFAULT_DATA_DIR / "tls" / "ca.pem"
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"--ca-cert {ca_cert}: not a readable PEM CA certificate ({exc})", EXIT_USAGE) from None


@main.command("login")
@click.option("--controller", "controller_url", envvar="STOCKADE_CONTROLLER", default="https://127.0.0.1:8443",
              show_default=True, help="[env STOCKADE_CONTROLLER]")
@click.option("--user", "username", default="admin", show_default=True)
@click.option("--ca-cert", envvar="STOCKADE_CA_CERT", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="[env STOCKADE_CA_CERT] the controller's CA (its path is printed at start)")
@click.option("--password", envvar="STOCKADE_PASSWORD", default=None, hide_input=True,
              help="[env STOCKADE_PASSWORD] otherwise asked for (never pass it on a shared machine's command line)")
def login(controller_url: str, username: str, ca_cert: Path | None, password: str | None) -> None:
    """Log in once and store an API key for the client commands (policy, flows, suggest ...)."""
    if password is None:
        password = click.prompt(f"Password for {username}", hide_input=True)
    base = controller_url.rstrip("/")
    origin = str(httpx.URL(base).copy_with(path="/", query=None)).rstrip("/")
    with httpx.Client(base_url=base + "/api/v1", verify=_verify(ca_cert), timeout=30,
                      headers={"Origin": origin}) as client:
        r = client.post("/auth/login", json={"username": username, "password": password})
        if r.status_code != 200:
            fail_response(r)
        me: dict[str, Any] = r.json()
        name = f"cli-{socket.gethostname()[:40]}-{int(time.time())}".replace(".", "-")
        k = client.post("/api-keys", json={"name": name, "role": me["role"], "scope": me.get("scope", [])})
        client.post("/auth/logout")
        if k.status_code != 201:
            fail_response(k)
        key = k.json()
    ca = str(ca_cert.resolve()) if ca_cert is not None else None
    path = write_login(StoredLogin(base, key["key"], ca))
    click.echo(f"logged in to {base} as {username} ({me['role']}); API key {key['id']} stored in {path}")


@main.command("logout")
def logout() -> None:
    """Revoke the stored API key at the controller and delete the credentials file."""
    stored = read_login()
    if stored is None:
        click.echo(f"not logged in ({config_path()} absent)")
        return
    key_id = stored.api_key.split("_")[1] if stored.api_key.count("_") >= 2 else None
    if key_id:
        with _client(stored.controller, stored.api_key, Path(stored.ca_cert) if stored.ca_cert else None) as client:
            r = client.delete(f"/api-keys/{key_id}")
        if r.status_code not in (204, 401, 404):
            fail_response(r)
    forget_login()
    click.echo(f"logged out of {stored.controller}; key revoked and {config_path()} deleted")


@main.group("key")
def key() -> None:
    """API keys for scripts and CI (owners)."""


@key.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["owner", "admin", "ruleset-manager", "read-only"]), required=True)
@click.option("--scope", multiple=True, help="label key=value the key is limited to (ruleset-manager)")
@client_options
def key_create(name: str, role: str, scope: tuple[str, ...], controller_url: str | None, api_key: str | None,
               ca_cert: Path | None) -> None:
    """Create an API key; its secret is printed once (store it in your secret manager)."""
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.post("/api-keys", json={"name": name, "role": role, "scope": list(scope)})
    if r.status_code != 201:
        fail_response(r)
    out = r.json()
    click.echo(f"API key {out['id']} ({role}) created; secret (shown once):")
    click.echo(out["key"])


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: e.g. `stockade completion bash > /etc/bash_completion.d/stockade`,
    or `eval "$(stockade completion zsh)"` in ~/.zshrc."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        raise CliError(f"no completion for {shell}", EXIT_USAGE)
    click.echo(cls(main, {}, "stockade", "_STOCKADE_COMPLETE").source())
