"""Copied agent credentials (issue 12 item 9): a token is worth nothing without the host's key.

A real controller (uvicorn on 127.0.0.1, SQLite and PostgreSQL) and the real agent HTTP client
(:class:`stockade.agent.http_client.HttpControllerClient`, its key in a real state dir). The class:
every agent request must be signed by the key made on the agent's host, fresh and used once, so a
copied token, a copied request, a forged body and a second host speaking with the same credential
are all refused or quarantined; the key can be rotated.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from stockade.agent.agent import Agent, AgentOptions
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import MemoryBackend, wait_until
from stockade.agent.flows import FlowCollector, HttpFlowSender
from stockade.agent.host import HostReport, InterfaceReport
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.nflog import LoggedPacket
from stockade.agent.signing import AgentAuth, signed_headers
from stockade.agent.state import Credential, StateDir
from stockade.agent.transport import Heartbeat
from stockade.agent_signature import b64encode, new_private_key, private_key_pem, public_key_text
from stockade.cli import main
from stockade.compiler.ir import Direction
from stockade.controller.app import create_app
from stockade.controller.context import Controller
from stockade.errors import AuthError, ValidationError
from stockade.evaluator import Verdict
from stockade.model import Proto
from stockade.visibility import FlowKey
from tests.api.conftest import make_settings


@dataclass
class Live:
    url: str
    ctl: Controller
    admin: httpx.Client

    def ok(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        r = self.admin.request(method, path, **kw)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def code(self, uses: int = 1) -> str:
        if self.admin.get("/pairing-profiles/web").status_code == 404:
            self.ok("POST", "/pairing-profiles", 201, json={"name": "web", "labels": {"role": "web"}, "mode": "full",
                                                            "code_max_uses": 10})
        return str(self.ok("POST", "/pairing-profiles/web/codes", 201, json={"max_uses": uses})["code"])

    def events(self, action: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.ok("GET", "/events", params={"action": action})["items"]
        return items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(database_url: str) -> Iterator[Live]:
    app = create_app(make_settings(database_url))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 20.0)
    url = f"http://127.0.0.1:{port}"
    ctl: Controller = app.state.controller
    assert ctl.first_run_credential is not None
    user, password = ctl.first_run_credential
    with httpx.Client(base_url=url + "/api/v1", timeout=30, headers={"Origin": url}) as admin:  # as a browser
        r = admin.post("/auth/login", json={"username": user, "password": password})
        assert r.status_code == 200, r.text
        key = admin.post("/api-keys", json={"name": "t", "role": "owner"}).json()["key"]
        admin.cookies.clear()
        admin.headers["Authorization"] = f"Bearer {key}"
        yield Live(url, ctl, admin)
    server.should_exit = True
    thread.join(20)


def host(name: str, *addresses: str) -> HostReport:
    return HostReport(name, "Linux", (InterfaceReport("eth0", tuple(ipaddress.ip_address(a) for a in addresses)),))


def enrol(live: Live, state: StateDir, name: str, *addresses: str) -> tuple[HttpControllerClient, Credential]:
    """What the agent runtime does: make the key in the state dir, enrol with its public half."""
    client = HttpControllerClient(live.url)
    e = client.enroll(live.code(), host(name, *addresses), public_key_text(state.load_or_create_key()))
    cred = Credential(live.url, e.agent_id, e.token, e.workload, state.key_path)
    state.save_credential(cred)
    client.use_credential(cred, None)
    return client, cred


def raw(live: Live, cred: Credential, method: str, suffix: str, **kw: Any) -> httpx.Response:
    """A request with the token only, as from a host the token was copied to."""
    return httpx.request(method, f"{live.url}/api/v1/agents/{cred.agent_id}/{suffix}",
                         headers={"Authorization": f"Bearer {cred.token}"}, timeout=30, **kw)


def test_the_real_client_signs_and_the_key_stays_on_the_host(live: Live, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    client, cred = enrol(live, state, "web-1", "10.50.0.1")
    assert stat.S_IMODE(state.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    assert state.load_credential() == cred and b"PRIVATE KEY" in state.key_path.read_bytes()
    client.report_host(host("web-1", "10.50.0.2"))
    client.heartbeat(Heartbeat(0, "", 0))
    answer = client.wait_revision(0, 0.1)
    upd = client.fetch_policy(None)
    client.ack(upd.revision)
    assert answer.revision == upd.revision >= 1
    agent = live.ok("GET", f"/agents/{cred.agent_id}")
    assert agent["key_bound"] and not agent["quarantined"] and agent["applied_revision"] == upd.revision
    client.close()
    # the flow sender (its own HTTP client) signs the same way
    src = ipaddress.ip_address("10.50.0.2")
    collector = FlowCollector(HttpFlowSender(cred), group=0, batch_size=20, max_entries=50)
    collector.record([LoggedPacket(FlowKey(src, ipaddress.ip_address("198.51.100.7"), Proto.TCP, 443),
                                   Direction.OUTBOUND, Verdict.POTENTIALLY_BLOCKED, "default", time.time() - 5)])
    assert collector.upload_pending() == 0 and collector.uploaded == 1


AGENT_ROUTE_CASES = [
    ("POST", "heartbeat", {}),
    ("GET", "policy", None),
    ("GET", "policy/wait?after=0&timeout=0", None),
    ("PUT", "interfaces", {"interfaces": [{"name": "eth0", "addresses": ["10.50.0.9"]}]}),
    ("POST", "ack", {"revision": 1}),
    ("POST", "events", {"events": [{"kind": "tamper", "detail": "x"}]}),
    ("POST", "flows", {"sent_at": 0, "dropped": 0, "records": []}),
    ("POST", "unenroll", {}),
    # a copied credential cannot present (register) a WireGuard key of its own either
    ("PUT", "wireguard-key", {"public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="}),
    # nor enrol pods as if it were their node
    ("POST", "pods/enroll", {"workload": "k8s.default.web-0", "public_key": "A" * 43}),
    # nor speak for a node's pods: batch enrolment, the node long-poll, its ack batch
    ("POST", "pods/enroll-batch", {"pods": [{"workload": "k8s.default.web-0", "public_key": "A" * 43}]}),
    ("POST", "pods/updates", {"pods": [], "timeout": 0}),
    ("POST", "pods/acks", {"acks": []}),
    # nor open a request session (stockade.agent_session): tests/security/test_agent_sessions.py
    ("POST", "session", {"public_key": "A" * 43}),
]


def test_the_copied_token_cases_cover_every_agent_credential_route() -> None:
    """A new agent-credential route must join the cases below (the class, not the case)."""
    from fastapi.routing import APIRoute

    from stockade.controller.app import create_app
    from stockade.controller.services.auth import Permission
    from tests.api.conftest import make_settings

    app = create_app(make_settings("sqlite://"))
    prefix = "/api/v1/agents/{agent_id}/"
    agent_routes = set()
    for mount, router in app.state.routers:
        for route in router.routes:
            assert isinstance(route, APIRoute)
            perms = {getattr(d.call, "permission", None) for d in route.dependant.dependencies}
            path = mount + route.path
            if Permission.AGENT in perms and path.startswith(prefix):
                agent_routes |= {(m, path[len(prefix):]) for m in route.methods}
    agent_routes.discard(("POST", "key"))  # rotation: test_key_rotation_old_key_stops_working
    assert len(agent_routes) >= 9, agent_routes  # the walk finds them
    covered = {(m, suffix.split("?")[0]) for m, suffix, _ in AGENT_ROUTE_CASES}
    assert agent_routes <= covered, sorted(agent_routes - covered)


@pytest.mark.parametrize(("method", "suffix", "body"), AGENT_ROUTE_CASES)
def test_a_copied_token_without_the_key_gets_401_on_every_agent_route(
        live: Live, tmp_path: Path, method: str, suffix: str, body: Any) -> None:
    _client, cred = enrol(live, StateDir(tmp_path / "s"), "web-1", "10.50.0.1")
    r = raw(live, cred, method, suffix, json=body) if body is not None else raw(live, cred, method, suffix)
    assert r.status_code == 401 and "signs its requests" in r.json()["message"], r.text
    # the attacker's own key does not help either
    stolen = replace(cred, key_file=tmp_path / "attacker.pem")
    (tmp_path / "attacker.pem").write_bytes(private_key_pem(new_private_key()))
    with httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(stolen), timeout=30) as c:
        r = c.request(method, f"/agents/{cred.agent_id}/{suffix}", json=body)
    assert r.status_code == 401 and "bad request signature" in r.json()["message"], r.text
    assert not live.ok("GET", f"/agents/{cred.agent_id}")["revoked"]
    # the admin hears of it: the token is out (once a minute per agent, not per request)
    [event] = live.events("agent.signature_refused")
    assert event["name"] == cred.agent_id and event["after"]["client"] == "127.0.0.1"
    assert event["after"]["workload"] == "web-1" and "signs its requests" in event["after"]["reason"]


def test_a_captured_request_cannot_be_replayed_reused_or_altered(live: Live, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    _client, cred = enrol(live, state, "web-1", "10.50.0.1")
    key = state.load_key()
    assert key is not None
    url = f"{live.url}/api/v1/agents/{cred.agent_id}/interfaces"
    body = json.dumps({"interfaces": [{"name": "eth0", "addresses": ["10.50.0.3"]}]}).encode()
    req = httpx.Request("PUT", url, content=body, headers={"Authorization": f"Bearer {cred.token}",
                                                           "Content-Type": "application/json"})
    req.headers.update(signed_headers(cred.agent_id, key, req))
    with httpx.Client(timeout=30) as c:
        assert c.send(req).status_code == 200
        replayed = c.send(req)
        assert replayed.status_code == 401 and "replayed" in replayed.text
        # the same signature on another body (10.50.0.3 -> 10.50.0.66) or another agent path
        forged = httpx.Request("PUT", url, content=body.replace(b"10.50.0.3", b"10.50.0.6"), headers=req.headers)
        assert c.send(forged).status_code == 401
        other = httpx.Request("POST", url.replace("interfaces", "heartbeat"), content=body, headers=req.headers)
        assert c.send(other).status_code == 401
        # a request signed three minutes ago (or in the future) is stale
        for skew in (-180, 180):
            old = httpx.Request("POST", url.replace("interfaces", "heartbeat"), json={},
                                headers={"Authorization": f"Bearer {cred.token}"})
            old.headers.update(signed_headers(cred.agent_id, key, old, now=time.time() + skew))
            r = c.send(old)
            assert r.status_code == 401 and "clock" in r.text
    assert live.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.50.0.3"]


def test_key_rotation_old_key_stops_working(live: Live, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    client, cred = enrol(live, state, "web-1", "10.50.0.1")
    old_pem = state.key_path.read_bytes()
    old_copy = tmp_path / "old.pem"
    old_copy.write_bytes(old_pem)
    result = CliRunner().invoke(main, ["agent", "rotate-key", "--state-dir", str(state.path)])
    assert result.exit_code == 0, result.output
    assert state.key_path.read_bytes() != old_pem and not state.next_key_path.exists()
    client.heartbeat(Heartbeat(0, "", 0))  # the running client re-reads the rotated key file
    with httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(replace(cred, key_file=old_copy)),
                      timeout=30) as c:
        assert c.post(f"/agents/{cred.agent_id}/heartbeat", json={}).status_code == 401
    assert [e["name"] for e in live.events("agent.key_rotate")] == [cred.agent_id]
    # a proof not signed by the new key is refused, the key unchanged
    other = public_key_text(new_private_key())
    with pytest.raises(ValidationError, match="proof"):
        client._request("POST", f"/agents/{cred.agent_id}/key", json={"public_key": other, "proof": "A" * 86})
    client.heartbeat(Heartbeat(0, "", 0))
    client.close()


# small-order points: with such a "key" a signature verifies for about one message in eight, no key needed
WEAK_KEYS = ["A" * 43, b64encode(b"\x01" + bytes(31)),
             b64encode(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")),
             b64encode(b"\xec" + b"\xff" * 30 + b"\x7f")]


@pytest.mark.parametrize("weak", WEAK_KEYS)
def test_weak_keys_are_refused_at_enrolment_and_rotation(live: Live, tmp_path: Path, weak: str) -> None:
    r = httpx.post(f"{live.url}/api/v1/agents/enroll", timeout=30,
                   json={"activation_code": live.code(), "hostname": "weak-1", "public_key": weak})
    assert r.status_code == 422 and r.json()["issues"][0]["field"] == "public_key", r.text
    client, cred = enrol(live, StateDir(tmp_path / "s"), "web-1", "10.50.0.1")
    with pytest.raises(ValidationError, match="small order"):
        client._request("POST", f"/agents/{cred.agent_id}/key", json={"public_key": weak, "proof": "A" * 86})
    client.heartbeat(Heartbeat(0, "", 0))
    client.close()


def test_an_agent_enrolled_before_keys_binds_one_at_start(live: Live, tmp_path: Path) -> None:
    """Upgrade path: a token-only credential works until the agent binds a key; then it no longer does."""
    r = httpx.post(f"{live.url}/api/v1/agents/enroll", timeout=30,
                   json={"activation_code": live.code(), "hostname": "old-1"})
    assert r.status_code == 201 and r.json()["key_bound"] is False
    out = r.json()
    state = StateDir(tmp_path / "s")
    cred = Credential(live.url, out["agent_id"], out["token"], out["workload"])
    state.save_credential(cred)
    assert raw(live, cred, "POST", "heartbeat", json={}).status_code == 200
    be = MemoryBackend()
    agent = Agent(AgentOptions(long_poll_seconds=0.5, watch_addresses=False), state, Enforcer(be),
                  HttpControllerClient, host_reader=lambda: host("old-1", "10.50.0.40"))
    agent.start()
    try:
        assert wait_until(lambda: be.installed is not None, 20.0)
        assert state.key_path.exists() and live.ok("GET", f"/agents/{cred.agent_id}")["key_bound"]
    finally:
        agent.stop()
    assert raw(live, cred, "POST", "heartbeat", json={}).status_code == 401
    assert [e["name"] for e in live.events("agent.key_bind")] == [cred.agent_id]


def test_the_agent_runtime_enrols_signs_and_converges(live: Live, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    be = MemoryBackend()
    code = live.code()
    agent = Agent(AgentOptions(controller=live.url, activation_code=code, long_poll_seconds=0.5,
                               watch_addresses=False), state, Enforcer(be), HttpControllerClient,
                  host_reader=lambda: host("web-9", "10.50.0.90"))
    agent.start()
    try:
        assert wait_until(lambda: be.installed is not None and agent.credential is not None, 20.0)
        assert agent.credential is not None
        aid = agent.credential.agent_id
        assert wait_until(lambda: live.ok("GET", f"/agents/{aid}")["converged"], 20.0)
        assert live.ok("GET", f"/agents/{aid}")["key_bound"]
    finally:
        agent.stop()
    assert state.load_activation_code() is None


def test_two_hosts_speaking_for_one_agent_are_quarantined(live: Live, tmp_path: Path) -> None:
    """The key file copied too (root on the host): both copies work, but their turns give them away."""
    state = StateDir(tmp_path / "s")
    _client, cred = enrol(live, state, "web-1", "10.50.0.1")
    original = httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(cred, instance="a" * 32), timeout=30)
    clone = httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(cred, instance="b" * 32), timeout=30)
    beat = f"/agents/{cred.agent_id}/heartbeat"
    assert original.post(beat, json={}).status_code == 200
    assert clone.post(beat, json={}).status_code == 200  # a restart looks like this: not yet suspicious
    assert not live.ok("GET", f"/agents/{cred.agent_id}")["quarantined"]
    assert original.post(beat, json={}).status_code == 200  # the old process is back: two of them
    agent = live.ok("GET", f"/agents/{cred.agent_id}")
    assert agent["quarantined"] and "two agent processes" in agent["quarantine_reason"]
    [event] = live.events("agent.quarantine")
    assert event["name"] == cred.agent_id and event["after"]["instances"] == ["a" * 32, "b" * 32]
    # the clone's report of a new address does not move the workload
    r = clone.put(f"/agents/{cred.agent_id}/interfaces",
                  json={"interfaces": [{"name": "eth0", "addresses": ["10.50.0.200"]}]})
    assert r.status_code == 200 and r.json()["quarantined"]
    assert live.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.50.0.1"]
    original.close()
    clone.close()


def test_a_restarted_agent_changing_addresses_waits_out_its_probation(live: Live, tmp_path: Path) -> None:
    live.ctl.agent_keys.probation = 2.0
    _client, cred = enrol(live, StateDir(tmp_path / "s"), "web-1", "10.50.0.1")
    first = httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(cred, instance="a" * 32), timeout=30)
    assert first.post(f"/agents/{cred.agent_id}/heartbeat", json={}).status_code == 200
    first.close()  # the agent restarts: a new process instance, with a new address
    restarted = httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(cred, instance="b" * 32), timeout=30)
    moved = {"interfaces": [{"name": "eth0", "addresses": ["10.50.0.5"]}]}
    r = restarted.put(f"/agents/{cred.agent_id}/interfaces", json=moved)
    assert r.status_code == 200 and r.json()["held"] and not r.json()["quarantined"]
    assert live.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.50.0.1"]
    time.sleep(2.2)
    assert restarted.post(f"/agents/{cred.agent_id}/heartbeat", json={}).status_code == 200  # alone long enough
    assert live.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.50.0.5"]
    assert live.events("agent.report_released") and not live.ok("GET", f"/agents/{cred.agent_id}")["quarantined"]
    # an unchanged report from a new process is applied at once (the usual restart)
    again = httpx.Client(base_url=live.url + "/api/v1", auth=AgentAuth(cred, instance="c" * 32), timeout=30)
    r = again.put(f"/agents/{cred.agent_id}/interfaces", json=moved)
    assert r.status_code == 200 and not r.json()["held"]
    restarted.close()
    again.close()


def test_another_agents_addresses_quarantine_the_reporter_and_keep_the_owner(live: Live, tmp_path: Path) -> None:
    c1, _cred1 = enrol(live, StateDir(tmp_path / "a"), "web-1", "10.50.0.1")
    c2, cred2 = enrol(live, StateDir(tmp_path / "b"), "web-2", "10.50.0.2")
    c2.report_host(host("web-2", "10.50.0.1"))
    assert live.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.50.0.1"]
    assert live.ok("GET", "/workloads/web-2")["body"]["interfaces"][0]["addresses"] == ["10.50.0.2"]
    assert live.ok("GET", f"/agents/{cred2.agent_id}")["quarantined"]
    [event] = live.events("agent.quarantine")
    assert event["after"]["owners"] == ["web-1"]
    c1.report_host(host("web-1", "10.50.0.1", "10.50.0.11"))  # the owner is unaffected
    assert live.ok("GET", "/workloads/web-1")["body"]["interfaces"][0]["addresses"] == ["10.50.0.1", "10.50.0.11"]
    live.ok("POST", f"/agents/{cred2.agent_id}/revoke", 204)
    with pytest.raises(AuthError):
        c2.heartbeat(Heartbeat(0, "", 0))
    c1.close()
    c2.close()


@pytest.mark.kernel
def test_a_copied_state_dir_on_another_host_is_caught(tmp_path: Path) -> None:
    """Real agents in lab namespaces: the whole state dir (token and key) of web-prod-1 copied to a
    second host. Both agents work, but their turns give them away within a long-poll: the agent is
    quarantined. The copy's report of its own addresses never moves the workload (held while the
    new process was on probation), nor does any later report of either copy."""
    import os
    import shutil

    from stockade.lab import HostSpec, Lab
    from stockade.policyfile import load_policy
    from tests.e2e.harness import ESTATE, AgentProcess, Api, ControllerLink, ControllerProcess
    from tests.e2e.harness import wait_for as wait_e2e

    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nftables (kernel layer)")
    estate = load_policy(ESTATE).workload_map()
    thief = ("thief", (ipaddress.ip_address("10.70.0.150"), ipaddress.ip_address("fd70::150")))
    hosts = [HostSpec("web-prod-1", estate["web-prod-1"].addresses, (8080,)), HostSpec(*thief, (8080,))]
    with Lab(hosts) as lab:
        link = ControllerLink(lab)
        controller = ControllerProcess(tmp_path / "controller", "10.70.0.1", 8443, tmp_path / "controller.log")
        agents: list[AgentProcess] = []
        try:
            controller.start()
            api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                      controller.ca_cert)
            api.import_estate()
            real = AgentProcess("web-prod-1", lab.netns("web-prod-1"), tmp_path / "state" / "real", controller.url,
                                api.adoption_code("lab", "web-prod-1"), tmp_path / "real.log",
                                ca_cert=controller.ca_cert, extra=("--long-poll", "3"))
            agents.append(real)
            real.start()
            assert wait_e2e(lambda: api.converged(["web-prod-1"]), 60.0, 0.1) is not None, real.log_tail()
            [agent] = api.ok("GET", "/agents")
            assert agent["key_bound"] and not agent["quarantined"]
            shutil.copytree(tmp_path / "state" / "real", tmp_path / "state" / "copy")
            copy = AgentProcess("web-prod-1", lab.netns("thief"), tmp_path / "state" / "copy", controller.url,
                                "unused", tmp_path / "copy.log", ca_cert=controller.ca_cert,
                                extra=("--long-poll", "3"))
            agents.append(copy)
            copy.start()
            took = wait_e2e(lambda: api.ok("GET", f"/agents/{agent['id']}")["quarantined"], 60.0, 0.2)
            assert took is not None, copy.log_tail() + real.log_tail()
            print(f"\ncopied credential caught {took:.1f}s after the copy started")
            got = api.ok("GET", f"/agents/{agent['id']}")
            assert "two agent processes" in got["quarantine_reason"]
            [event] = api.events(action="agent.quarantine")
            assert len(event["after"]["instances"]) == 2
            frozen = api.workload("web-prod-1")["interfaces"]
            # the copy's report (the thief's addresses) waited out its probation and was never applied
            assert frozen == [{"name": "eth0", "addresses": [str(a) for a in estate["web-prod-1"].addresses]}]
            assert api.events(action="agent.report_held") and not api.events(action="agent.report_released")
            lab.run_in("thief", ["ip", "addr", "add", "10.70.0.151/32", "dev", "eth0"])
            lab.run_in("web-prod-1", ["ip", "addr", "add", "10.70.0.19/32", "dev", "eth0"])
            time.sleep(5)  # both agents report the new address (netlink watch): neither is applied
            assert api.workload("web-prod-1")["interfaces"] == frozen
        finally:
            for a in agents:
                a.stop()
            controller.kill()
            link.remove()
