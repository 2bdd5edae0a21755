"""Every client subcommand fails with one line (plus a hint) and its documented exit code, never a traceback:
against a dead controller, a controller whose CA is not the one given, and with a bad key. Then the
policy-as-code journey: login stores a key, diff shows rules and exits 1 on a difference, export
round-trips without a difference, completion scripts, logout revokes the key.

The commands are found by walking the click tree (every command with an ``--api-key`` option), so a new
client command is covered without editing this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
from tests.api.test_cli import ESTATE, Live, _free_port

from stockade.cli import main
from stockade.cli.errors import EXIT_AUTH, EXIT_FINDING, EXIT_TLS, EXIT_UNREACHABLE


def _client_commands() -> list[tuple[list[str], click.Command]]:
    found: list[tuple[list[str], click.Command]] = []

    def walk(path: list[str], cmd: click.Command) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk([*path, name], sub)
        elif any(p.name == "api_key" for p in cmd.params):
            found.append((path, cmd))

    walk([], main)
    return found


# options a command needs together that click cannot declare as required
EXTRA = {"suggest": ["--app", "shop", "--env", "prod"]}


def _argv(path: list[str], cmd: click.Command, tmp: Path) -> list[str]:
    """The command with a plausible value for every required parameter."""
    argv = [*path, *EXTRA.get(" ".join(path), [])]
    for p in cmd.params:
        if not p.required or p.name in ("api_key", "controller_url", "ca_cert"):
            continue
        if isinstance(p.type, click.Choice):
            value = str(p.type.choices[-1])
        elif isinstance(p.type, click.Path):
            value = str(tmp / "out") if p.name in ("out_dir", "output") else str(ESTATE)
        else:
            value = "x1"
        if isinstance(p, click.Argument):
            argv.append(value)
        else:
            argv += [p.opts[0], value]
    return argv


COMMANDS = _client_commands()


def test_the_walk_finds_the_client_commands() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"policy diff", "policy apply", "policy provision", "policy export", "policy impact", "flows",
            "suggest", "key create", "explain"} <= names, names


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stockade.cli", *argv], env=env, capture_output=True, text=True,
                          check=False, timeout=120)


def _assert_one_line(proc: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    err = proc.stderr
    assert "Traceback" not in err and "File \"" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("stockade: error: ") and words in lines[0], err
    assert len(lines) == 1 or lines[1].startswith("hint: "), err
    assert proc.returncode == code, (proc.returncode, err)


def _ca_of(live: Live) -> Path:
    line = next(ln for ln in live.lines if ln.startswith("CA certificate: "))
    return Path(line.removeprefix("CA certificate: ").split(" (SHA")[0])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    live = Live(True, tmp_path_factory.mktemp("ctl") / "data")
    yield live
    live.stop()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    return {**clean, "STOCKADE_CONFIG": str(tmp_path / "cli.json"), "HOME": str(tmp_path)}


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_dead_controller_wrong_ca_and_bad_key(path: list[str], cmd: click.Command, live: Live,
                                              env: dict[str, str], tmp_path: Path) -> None:
    argv = _argv(path, cmd, tmp_path)
    dead = _run([*argv, "--controller", f"http://127.0.0.1:{_free_port()}", "--api-key", "stk_x_y"], env)
    _assert_one_line(dead, EXIT_UNREACHABLE, "cannot reach the controller")

    other_ca = tmp_path / "other-ca.pem"
    from stockade.controller.tls import ensure_tls

    other_ca.write_bytes(ensure_tls(tmp_path / "other", ("127.0.0.1",)).ca_cert.read_bytes())
    wrong_ca = _run([*argv, "--controller", live.base, "--api-key", "stk_x_y", "--ca-cert", str(other_ca)], env)
    _assert_one_line(wrong_ca, EXIT_TLS, "TLS")

    ca = str(_ca_of(live))
    bad_key = _run([*argv, "--controller", live.base, "--api-key", "stk_nokey_nosecret", "--ca-cert", ca], env)
    _assert_one_line(bad_key, EXIT_AUTH, "(401)")


def test_login_diff_export_roundtrip_completion_logout(live: Live, env: dict[str, str], tmp_path: Path) -> None:
    ca = _ca_of(live)
    login = _run(["login", "--controller", live.base, "--ca-cert", str(ca)],
                 {**env, "STOCKADE_PASSWORD": live.password()})
    assert login.returncode == 0, login.stderr
    assert (tmp_path / "cli.json").stat().st_mode & 0o777 == 0o600
    assert "stk_" not in login.stdout, "the secret is never printed"

    # no --api-key, no --controller: the stored login is used
    applied = _run(["policy", "apply", "-f", str(ESTATE)], env)
    assert applied.returncode == 0, applied.stderr
    allowed = _run(["explain", "--remote", "draft", "--from", "app-prod-1", "--to", "db-prod-1", "--port", "5432/tcp",
                    "--exit-code"], env)
    assert allowed.returncode == 0 and "verdict: allowed" in allowed.stdout, allowed.stdout + allowed.stderr
    assert "rule 3" in allowed.stdout, "rules are numbered from 1 for people"
    blocked = _run(["explain", "--remote", "draft", "--from", "web-prod-1", "--to", "db-prod-1", "--port", "5432/tcp",
                    "--exit-code"], env)
    assert blocked.returncode == EXIT_FINDING and "verdict: blocked" in blocked.stdout
    both = _run(["explain", str(ESTATE), "--remote", "draft", "--from", "a", "--to", "b", "--port", "1/tcp"], env)
    assert both.returncode == 2
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in ESTATE.iterdir():
        (edited / f.name).write_text(f.read_text().replace("services: [postgres]", "services: [postgres, https]", 1))
    diff = _run(["policy", "diff", "-f", str(edited)], env)
    assert diff.returncode == EXIT_FINDING, diff.stderr
    assert "~ draft ruleset shop-prod" in diff.stdout
    assert re.search(r"^-\s+services: \[postgres\]$", diff.stdout, re.M), diff.stdout
    assert re.search(r"^\+\s+services: \[postgres, https\]$", diff.stdout, re.M), diff.stdout
    as_json = _run(["policy", "diff", "-f", str(edited), "--json"], env)
    assert as_json.returncode == EXIT_FINDING and '"draft_changes"' in as_json.stdout

    export = _run(["policy", "export", "-o", str(tmp_path / "exported")], env)
    assert export.returncode == 0, export.stderr
    check = _run(["check", str(tmp_path / "exported")], env)
    assert check.returncode == 0, check.stderr
    same = _run(["policy", "diff", "-f", str(tmp_path / "exported")], env)
    assert same.returncode == 0 and "0 object(s) would change" in same.stdout, same.stdout + same.stderr
    again = _run(["policy", "export", "-o", str(tmp_path / "exported")], env)
    assert again.returncode != 0 and "--force" in again.stderr

    for shell, marker in (("bash", "complete "), ("zsh", "compdef"), ("fish", "complete ")):
        script = _run(["completion", shell], env)
        assert script.returncode == 0 and marker in script.stdout and "_STOCKADE_COMPLETE" in script.stdout

    stored_key = __import__("json").loads((tmp_path / "cli.json").read_text())["api_key"]
    out = _run(["logout"], env)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "cli.json").exists()
    r = httpx.get(live.base + "/api/v1/auth/whoami", headers={"Authorization": f"Bearer {stored_key}"},
                  verify=live.verify)
    assert r.status_code == 401, "logout revokes the key at the controller"
