"""PostgreSQL failover under running controllers: a primary with a synchronous streaming standby.

Both clusters are started here (``initdb``, ``pg_basebackup -R``, ``synchronous_standby_names``);
two controller processes connect with a libpq multi-host URL and
``target_session_attrs=read-write``. While a client provisions version after version, the
primary is stopped the way a crash stops it (``pg_ctl -m immediate``) and the standby promoted.
Proved: every provision the controllers acknowledged (201) is on the promoted standby with its own
content (synchronous replication loses nothing acknowledged), versions are contiguous and whole
(no partial version), and both controllers provision again within the bound printed and asserted
(``FAILOVER_BOUND``). The promotion itself is the test's (what Patroni would do in production).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.api.conftest import _free_port, _pg_bindir
from tests.e2e.harness import Api, ControllerProcess, start_all, wait_for

FAILOVER_BOUND = 15.0  # seconds from the primary's crash to the first provision served again
PG_OPTS = ("-c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=100 "
           "-c wal_level=replica -c max_wal_senders=4 -c wal_sender_timeout=5s -c wal_receiver_status_interval=1s")


@dataclass
class PgPair:
    root: Path
    bindir: Path
    runner: list[str]
    primary: int
    standby: int

    def ctl(self, *args: str) -> None:
        subprocess.run([*self.runner, str(self.bindir / "pg_ctl"), *args], check=True, capture_output=True,
                       timeout=60)

    def start(self, name: str, port: int) -> None:
        self.ctl("-D", str(self.root / name), "-o", f"-p {port} -k {self.root} {PG_OPTS}",
                 "-l", str(self.root / f"{name}.log"), "-w", "start")

    def url(self, db: str) -> str:
        return (f"postgresql://postgres@/{db}?host=127.0.0.1:{self.primary}&host=127.0.0.1:{self.standby}"
                "&target_session_attrs=read-write")


@pytest.fixture
def pg_pair() -> Iterator[PgPair]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    try:
        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' system user to run the clusters as")
    runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="stockade-pgha-"))
    os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
    pair = PgPair(root, bindir, runner, _free_port(), _free_port())
    try:
        subprocess.run([*runner, str(bindir / "initdb"), "-D", str(root / "primary"), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        with (root / "primary" / "postgresql.auto.conf").open("a") as f:  # the standby copies it
            f.write("synchronous_standby_names = 'standby1'\n")
        pair.start("primary", pair.primary)
        subprocess.run([*runner, str(bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(pair.primary),
                        "-U", "postgres", "-D", str(root / "standby"), "-R", "-X", "stream", "--no-sync"],
                       check=True, capture_output=True, timeout=60)
        with (root / "standby" / "postgresql.auto.conf").open("a") as f:
            f.write(f"primary_conninfo = 'host=127.0.0.1 port={pair.primary} user=postgres "
                    "application_name=standby1'\n")
        pair.start("standby", pair.standby)
        with psycopg.connect(f"host=127.0.0.1 port={pair.primary} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            assert wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_replication WHERE "
                                                 "sync_state = 'sync'").fetchone() == (1,), 20.0)
            conn.execute('CREATE DATABASE "stockade"')
        yield pair
    finally:
        for name in ("primary", "standby"):
            subprocess.run([*runner, str(bindir / "pg_ctl"), "-D", str(root / name), "-m", "immediate", "stop"],
                           capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Provisioner:
    """Provisions version after version through alternating controllers, noting what was acknowledged."""

    urls: list[str]
    key: str
    acked: dict[int, str] = field(default_factory=dict)  # version -> message
    served: list[float] = field(default_factory=list)  # monotonic times of acknowledged provisions
    errors: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        clients = [httpx.Client(base_url=u + "/api/v1", timeout=5.0,
                                headers={"Authorization": f"Bearer {self.key}"}) for u in self.urls]
        i = 0
        while not self.stop.is_set():
            c = clients[i % len(clients)]
            try:
                r = c.post("/services", json={"name": f"s{i}", "ports": [f"{1000 + i}/tcp"]})
                if r.status_code != 201:
                    raise httpx.HTTPError(f"service {r.status_code}")
                r = c.post("/policy/provision", json={"message": f"m{i}"})
                if r.status_code != 201:
                    raise httpx.HTTPError(f"provision {r.status_code}")
                self.acked[int(r.json()["number"])] = f"m{i}"
                self.served.append(time.monotonic())
            except httpx.HTTPError:
                self.errors += 1
                self.stop.wait(0.05)
            i += 1
        for c in clients:
            c.close()


def test_primary_crash_mid_provision_loses_nothing_acknowledged(pg_pair: PgPair, tmp_path: Path) -> None:
    url = pg_pair.url("stockade")
    procs = [ControllerProcess(tmp_path / f"c{i}" / "data", "127.0.0.1", _free_port(), tmp_path / f"c{i}.log",
                               tls=False, database_url=url) for i in range(2)]
    start_all(procs)  # at once: one migrates, one makes the owner
    try:
        owner = next(p.first_run for p in procs if p.first_run)
        api = Api(procs[0].url, owner["user"], owner["password"])
        key = str(api.http.headers["Authorization"]).removeprefix("Bearer ")
        prov = Provisioner([p.url for p in procs], key)
        worker = threading.Thread(target=prov.run)
        worker.start()
        try:
            assert wait_for(lambda: len(prov.acked) >= 5, 30.0)
            pg_pair.ctl("-D", str(pg_pair.root / "primary"), "-m", "immediate", "stop")  # the crash
            crashed = time.monotonic()
            pg_pair.ctl("-D", str(pg_pair.root / "standby"), "-w", "promote")
            # alone now: commits would wait for a standby that is gone (Patroni does this step too)
            with psycopg.connect(f"host=127.0.0.1 port={pg_pair.standby} user=postgres dbname=postgres",
                                 autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
                conn.execute("SELECT pg_reload_conf()")
            if not wait_for(lambda: any(t > crashed for t in prov.served), 30.0):
                raise AssertionError(f"no provision after failover: {procs[0].dump_stacks()}")
            bound = min(t for t in prov.served if t > crashed) - crashed
            before = len(prov.acked)
            assert wait_for(lambda: len(prov.acked) >= before + 4, 20.0)  # both controllers go on
        finally:
            prov.stop.set()
            worker.join(10)
        with psycopg.connect(f"host=127.0.0.1 port={pg_pair.standby} user=postgres dbname=stockade") as conn:
            rows = {n: (msg, content) for n, msg, content in
                    conn.execute("SELECT number, message, content FROM policy_versions ORDER BY number")}
        assert sorted(rows) == list(range(1, max(rows) + 1)), "versions are not contiguous"
        for number, message in prov.acked.items():
            assert number in rows, f"acknowledged version {number} lost in the failover"
            assert rows[number][0] == message
        for _number, (message, content) in rows.items():  # whole versions: each holds its own service
            assert f"s{message[1:]}" in content["service"], f"version with {message} lacks its service"
        assert bound <= FAILOVER_BOUND, f"controllers served again after {bound:.1f} s"
        print(f"PostgreSQL failover: provisions served again {bound:.2f} s after the primary crashed "
              f"({len(prov.acked)} acknowledged, {prov.errors} refused during the switch)")
    finally:
        for p in procs:
            p.kill()
