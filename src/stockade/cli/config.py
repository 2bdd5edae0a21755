"""Where the CLI finds its controller, credential and CA: flags, then ``STOCKADE_*`` variables, then
the file ``stockade login`` writes.

The file is ``$XDG_CONFIG_HOME/stockade/cli.json`` (default ``~/.config/stockade/cli.json``), mode
0600, holding ``{"controller": URL, "api_key": KEY, "ca_cert": PATH}``. Only the API key is secret;
it is never printed. ``STOCKADE_CONFIG`` names another file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ENVIRONMENT = {
    "STOCKADE_CONTROLLER": "controller URL for client commands (default https://127.0.0.1:8443)",
    "STOCKADE_API_KEY": "API key for client commands (`stockade login` stores one instead)",
    "STOCKADE_CA_CERT": "CA certificate that signed the controller's TLS certificate",
    "STOCKADE_CONFIG": "the CLI credentials file (default ~/.config/stockade/cli.json)",
    "STOCKADE_PASSWORD": "password for `stockade login` (otherwise prompted)",
    "STOCKADE_ACTIVATION_CODE": "activation code for `stockade agent` (never on the command line)",
    "STOCKADE_DEBUG": "show Python tracebacks instead of one-line errors",
    "STOCKADE_WIREGUARD": "the agent's WireGuard datapath: auto (the kernel module, else wireguard-go; default), "
                          "kernel (no fallback: fails closed) or userspace",
}


def config_path() -> Path:
    named = os.environ.get("STOCKADE_CONFIG")
    if named:
        return Path(named)
    base = Path(os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config")))
    return base / "stockade" / "cli.json"


@dataclass(frozen=True)
class StoredLogin:
    controller: str
    api_key: str
    ca_cert: str | None


def read_login() -> StoredLogin | None:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("api_key"), str):
        return None
    ca = data.get("ca_cert")
    return StoredLogin(str(data.get("controller", "")), data["api_key"], ca if isinstance(ca, str) else None)


def write_login(login: StoredLogin) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"controller": login.controller, "api_key": login.api_key, "ca_cert": login.ca_cert}, f)
    os.replace(tmp, path)
    return path


def forget_login() -> bool:
    try:
        config_path().unlink()
    except FileNotFoundError:
        return False
    return True
