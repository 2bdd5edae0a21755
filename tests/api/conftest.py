"""Fixtures for the controller API tests: the real app on SQLite and on a throwaway PostgreSQL.

The PostgreSQL cluster is started once per test session from the Debian binaries found at run
time (``/usr/lib/postgresql/*/bin``): ``initdb`` and ``pg_ctl`` run as the ``postgres`` user in a
temporary directory, listening on 127.0.0.1 on a free port; every test gets a fresh database.
PostgreSQL tests are skipped, with the reason, only when no PostgreSQL binaries exist.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from stockade.controller.app import create_app
from stockade.controller.context import Controller, ControllerSettings
from stockade.controller.services.auth import Argon2Params


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    port: int

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    try:
        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' system user to run the throwaway cluster as")
    runner: list[str] = []
    if os.geteuid() == 0:
        runner = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="stockade-pg-"))
    os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
    data = root / "data"
    port = _free_port()
    subprocess.run([*runner, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c synchronous_commit=off " \
           "-c full_page_writes=off -c max_connections=300"
    subprocess.run([*runner, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield PgCluster(port)
    finally:
        subprocess.run([*runner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stockade.db'}"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database()


def make_settings(url: str, **kw: Any) -> ControllerSettings:
    kw.setdefault("secure_cookies", False)
    kw.setdefault("login_limit", (1000, 60.0))
    kw.setdefault("enroll_limit", (1000, 60.0))
    kw.setdefault("argon2", Argon2Params(time_cost=1, memory_kib=8192, parallelism=1))
    return ControllerSettings(database_url=url, **kw)


class Api:
    """A TestClient bound to the app, plus helpers to act as a given credential."""

    def __init__(self, client: TestClient, ctl: Controller) -> None:
        self.client = client
        self.ctl = ctl
        client.headers["Origin"] = "http://testserver"  # as the console's browser does (CSRF rule)
        assert ctl.first_run_credential is not None
        user, password = ctl.first_run_credential
        r = client.post("/api/v1/auth/login", json={"username": user, "password": password})
        assert r.status_code == 200, r.text
        key = client.post("/api/v1/api-keys", json={"name": "owner-key", "role": "owner"})
        assert key.status_code == 201, key.text
        client.cookies.clear()
        self.owner = self.headers(key.json()["key"])

    @staticmethod
    def headers(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def key(self, role: str, scope: list[str] | None = None) -> dict[str, str]:
        r = self.client.post("/api/v1/api-keys", json={"name": f"k-{role}", "role": role, "scope": scope or []},
                             headers=self.owner)
        assert r.status_code == 201, r.text
        return self.headers(r.json()["key"])

    def req(self, method: str, path: str, **kw: Any) -> Any:
        kw.setdefault("headers", self.owner)
        return self.client.request(method, "/api/v1" + path, **kw)

    def ok(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        r = self.req(method, path, **kw)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    app = create_app(make_settings(database_url))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'stockade.db'}"))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)


@pytest.fixture
def quiet_api(database_url: str) -> Iterator[Api]:
    """An app whose background flush never runs on its own (the tests call it)."""
    app = create_app(make_settings(database_url, flush_interval=3600.0))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)
