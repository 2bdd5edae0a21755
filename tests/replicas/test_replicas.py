"""Three real controller processes on one PostgreSQL database, simulated agents over HTTP.

Each agent is the real :class:`~stockade.agent.http_client.HttpControllerClient` given the three
replicas' URLs (its own first), long-polling, applying updates with the one strict apply and
acknowledging on the long-poll. What is proved:

* a change made through replica A reaches an agent long-polling on replica C as a delta;
* replica C killed with SIGKILL right after a change touching every host: every agent converges
  through A or B, with deltas only (no full policy), to exactly what a full fetch gives;
  C started again catches up (same revisions as the others) and follows later changes;
* a login lock hit on A holds on B; a session made on A works on B and ends on B when it logs
  out on A;
* agents that know one name only, Debian's HAProxy balancing the three replicas: replica B killed
  after a change, every agent converges with deltas only; B started again follows.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from stockade.agent.host import HostReport, InterfaceReport
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.state import Credential
from stockade.agent.transport import ControllerUnreachableError
from stockade.compiler import HostPolicy
from stockade.compiler.delta import UpdateKind, apply_update
from stockade.errors import StockadeError
from tests.api.conftest import PgCluster, _free_port
from tests.e2e.harness import Api, ControllerProcess, start_all, wait_for

pytestmark = pytest.mark.xdist_group("replicas")

N_AGENTS = 9  # three per replica


@dataclass
class SimAgent:
    """An agent without a firewall: follows its revision through the real client, counts updates."""

    client: HttpControllerClient
    workload: str = ""
    revision: int = 0
    policy: HostPolicy | None = None
    fulls: int = 0
    deltas: int = 0
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def loop(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.client.wait_revision(self.revision, 3.0, applied=self.revision)
                if answer.revision == self.revision:
                    continue
                update = answer.update or self.client.fetch_policy(self.revision)
                try:
                    new = apply_update(self.policy, self.revision, update)
                except StockadeError:
                    update = self.client.fetch_policy(None)
                    new = apply_update(None, 0, update)
                with self.lock:
                    if update.kind is UpdateKind.FULL:
                        self.fulls += 1
                    elif update.kind is UpdateKind.DELTA:
                        self.deltas += 1
                    if new is not None:
                        self.policy = new
                    self.revision = update.revision
            except (ControllerUnreachableError, StockadeError):
                self.failures += 1
                self.stop.wait(0.1)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.fulls, self.deltas


@dataclass
class Replicas:
    procs: list[ControllerProcess]
    api: Api  # through replica A
    agents: list[SimAgent]
    owner: tuple[str, str]

    def urls(self, first: int) -> list[str]:
        n = len(self.procs)
        return [self.procs[(first + k) % n].url for k in range(n)]

    def truth(self, agent: SimAgent, replica: int) -> tuple[int, HostPolicy]:
        """What a full fetch from ``replica`` gives for the agent's workload."""
        probe = HttpControllerClient(self.procs[replica].url)
        probe.use_credential(agent.client._credential, None)  # type: ignore[arg-type]
        try:
            update = probe.fetch_policy(None)
        finally:
            probe.close()
        assert update.policy is not None
        return update.revision, update.policy

    def converged(self, replica: int) -> bool:
        for a in self.agents:
            rev, policy = self.truth(a, replica)
            if a.revision != rev or a.policy != policy:
                return False
        return True


def _policy(api: Api) -> None:
    api.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    api.ok("POST", "/services", 201, json={"name": "ssh", "ports": ["22/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["pg"]}]})
    api.ok("POST", "/rulesets", 201, json={"name": "monitoring", "scope": "all", "rules": [
        {"consumers": [{"labels": {"role": "monitor"}}], "providers": [{"all": True}], "services": ["ssh"],
         "consumers_scope": "global"}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "replicas"})
    for name, labels in (("mon-1", {"role": "monitor"}), ("extra-web", {"app": "shop", "role": "web"})):
        api.ok("POST", "/workloads", 201, json={"name": name, "labels": labels, "mode": "full",
                                                "interfaces": [{"name": "eth0", "addresses": ["10.99.0.1"
                                                                if name == "mon-1" else "10.99.1.1"]}]})


@pytest.fixture(scope="module")
def replicas(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    url = pg_cluster.create_database()
    root = tmp_path_factory.mktemp("replicas")
    procs = [ControllerProcess(root / f"r{i}" / "data", "127.0.0.1", _free_port(), root / f"r{i}.log", tls=False,
                               database_url=url) for i in range(3)]
    start_all(procs)  # at once: one migrates, one makes the owner
    agents: list[SimAgent] = []
    try:
        assert all(p.proc is not None for p in procs), "a replica did not start"
        made = [p.first_run for p in procs if p.first_run]
        assert len(made) == 1, f"{len(made)} replicas made a first owner"
        owner = (made[0]["user"], made[0]["password"])
        api = Api(procs[0].url, *owner)
        _policy(api)
        for role in ("web", "db"):
            api.ok("POST", "/pairing-profiles", 201, json={"name": f"shop-{role}", "mode": "full", "code_max_uses": 100,
                                                           "labels": {"app": "shop", "role": role}})
        codes = {role: api.ok("POST", f"/pairing-profiles/shop-{role}/codes", 201)["code"] for role in ("web", "db")}
        cluster = Replicas(procs, api, agents, owner)
        for i in range(N_AGENTS):
            client = HttpControllerClient(cluster.urls(i % 3))  # its own replica first, then the others
            addr = ipaddress.ip_address(f"10.98.0.{i + 1}")
            host = HostReport(f"sim-{i}", "linux", (InterfaceReport("eth0", (addr,)),))
            got = client.enroll(codes["web" if i % 2 else "db"], host)  # enrolled on its own replica
            client.use_credential(Credential(",".join(cluster.urls(i % 3)), got.agent_id, got.token, got.workload),
                                  None)
            agents.append(SimAgent(client, got.workload))
        for a in agents:
            a.start()
        assert wait_for(lambda: all(a.revision > 0 for a in agents), 20.0), "agents got no first policy"
        yield cluster
    finally:
        for a in agents:
            a.stop.set()
        for p in procs:
            p.kill()
        for a in agents:
            if a.thread is not None:
                a.thread.join(5)
            a.client.close()


def _readdress(api: Api, name: str) -> None:
    body = api.workload(name)
    octets = body["interfaces"][0]["addresses"][0].split(".")
    body["interfaces"][0]["addresses"] = [".".join([*octets[:3], str(int(octets[3]) % 250 + 1)])]
    api.put_workload(name, body)


def test_change_on_a_reaches_agent_long_polling_on_c(replicas: Replicas) -> None:
    on_c = [a for i, a in enumerate(replicas.agents) if i % 3 == 2 and a.workload]
    assert wait_for(lambda: replicas.converged(2), 20.0)
    before = {id(a): (a.revision, *a.counts()) for a in on_c}
    t0 = time.monotonic()
    _readdress(replicas.api, "mon-1")  # every host's monitor set changes: a delta for each
    assert wait_for(lambda: all(a.revision > before[id(a)][0] for a in on_c), 10.0), "C's agents saw nothing"
    latency = time.monotonic() - t0
    for a in on_c:
        _rev0, fulls0, deltas0 = before[id(a)]
        fulls, deltas = a.counts()
        assert fulls == fulls0 and deltas > deltas0, f"{a.workload}: not a delta ({fulls0}->{fulls} full)"
        assert a.client.base_url == replicas.procs[2].url  # still long-polling on C
    assert wait_for(lambda: replicas.converged(1), 10.0)  # and what C's agents hold is what B computes
    print(f"change on A -> agents on C: {latency * 1000:.0f} ms")


def test_kill_replica_mid_fanout_then_restart(replicas: Replicas) -> None:
    assert wait_for(lambda: replicas.converged(0), 20.0)
    fulls0 = [a.counts()[0] for a in replicas.agents]
    _readdress(replicas.api, "mon-1")
    replicas.procs[2].kill()  # SIGKILL, right as the fan-out starts
    t0 = time.monotonic()
    assert wait_for(lambda: replicas.converged(0), 10.0), "agents did not converge through A and B"
    failover = time.monotonic() - t0
    assert [a.counts()[0] for a in replicas.agents] == fulls0, "an agent re-applied a full policy"
    assert all(a.client.base_url != replicas.procs[2].url for a in replicas.agents)
    # two changes while C is down, then C comes back and catches up from the stored state
    _readdress(replicas.api, "extra-web")
    _readdress(replicas.api, "mon-1")
    assert wait_for(lambda: replicas.converged(1), 10.0)
    replicas.procs[2].start()
    assert wait_for(lambda: replicas.converged(2), 10.0), "the restarted replica serves other revisions"
    _readdress(replicas.api, "mon-1")  # a change through B...
    _readdress(replicas.api, "extra-web")
    assert wait_for(lambda: replicas.converged(2), 10.0)  # ...followed by the restarted C
    assert [a.counts()[0] for a in replicas.agents] == fulls0
    print(f"replica killed -> every agent converged in {failover * 1000:.0f} ms")


def _login(url: str, user: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/auth/login", json={"username": user, "password": password},
                      headers={"Origin": url}, timeout=30)


def test_login_lock_and_sessions_hold_across_replicas(replicas: Replicas) -> None:
    a, b = replicas.procs[0].url, replicas.procs[1].url
    user = "u" + uuid.uuid4().hex[:8]
    replicas.api.ok("POST", "/users", 201, json={"username": user, "password": "correct horse battery",
                                                 "role": "read-only"})
    # the session: made on A, used on B, ended on A, refused on B
    r = _login(a, user, "correct horse battery")
    assert r.status_code == 200, r.text
    cookie = r.cookies
    assert httpx.get(f"{b}/api/v1/workloads", cookies=cookie, timeout=30).status_code == 200
    out = httpx.post(f"{a}/api/v1/auth/logout", cookies=cookie, headers={"Origin": a}, timeout=30)
    assert out.status_code in (200, 204), out.text
    assert httpx.get(f"{b}/api/v1/workloads", cookies=cookie, timeout=30).status_code == 401
    # failed logins on A until the account is locked: B refuses even the right password
    codes = [_login(a, user, "wrong").status_code for _ in range(6)]
    assert codes[:5] == [401] * 5 and codes[5] in (401, 429), codes
    locked = _login(b, user, "correct horse battery")
    assert locked.status_code == 429, locked.text
    assert "too many failed logins" in locked.json()["message"]
    assert _login(replicas.procs[2].url, user, "wrong").status_code == 429



HAPROXY_CFG = """global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 180s
    timeout server 180s
    retries 3
    option redispatch
frontend stockade
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""


@pytest.fixture
def balancer(replicas: Replicas, tmp_path: Path) -> Iterator[str]:
    """Debian's HAProxy in front of the three replicas (TCP health checks every 200 ms)."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    port = _free_port()
    servers = "\n".join(f"    server r{i} {p.host}:{p.port} check inter 200ms fall 1 rise 2"
                        for i, p in enumerate(replicas.procs))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
    log = (tmp_path / "haproxy.log").open("w")
    proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: ControllerProcess(tmp_path, "127.0.0.1", port, cfg)._accepting(), 10.0)
        yield url
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_agents_behind_haproxy_fail_over(replicas: Replicas, balancer: str) -> None:
    code = replicas.api.ok("POST", "/pairing-profiles/shop-db/codes", 201)["code"]
    for i in range(3):
        client = HttpControllerClient(balancer)  # one name; the balancer picks the replica per request
        addr = ipaddress.ip_address(f"10.98.1.{i + 1}")
        got = client.enroll(code, HostReport(f"lb-{i}", "linux", (InterfaceReport("eth0", (addr,)),)))
        client.use_credential(Credential(balancer, got.agent_id, got.token, got.workload), None)
        agent = SimAgent(client, got.workload)
        replicas.agents.append(agent)  # stopped by the fixture
        agent.start()
    assert wait_for(lambda: replicas.converged(0), 20.0)
    fulls0 = [a.counts()[0] for a in replicas.agents]
    _readdress(replicas.api, "mon-1")
    replicas.procs[1].kill()
    t0 = time.monotonic()
    assert wait_for(lambda: replicas.converged(0), 10.0), "agents behind the balancer did not converge"
    failover = time.monotonic() - t0
    assert [a.counts()[0] for a in replicas.agents] == fulls0, "an agent re-applied a full policy"
    replicas.procs[1].start()
    _readdress(replicas.api, "extra-web")
    assert wait_for(lambda: replicas.converged(1), 10.0)
    print(f"behind HAProxy, replica killed -> every agent converged in {failover * 1000:.0f} ms")
