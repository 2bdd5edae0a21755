"""Agent request sessions (:mod:`stockade.agent_session`): a MAC keeps every guarantee of the signature.

For the class of agent routes - every route of the hot table (served by the fast dispatch) and
framework-routed ones - a request proven by a session's MAC passes, and each way of getting it
wrong is a 401: a wrong MAC, a MAC over another method, path, query, body or time, a stale time,
a replayed nonce, an unknown or expired session, another agent's session or process's session, a
session of a key since rotated or an agent since revoked, a signature and a MAC together. A
refusal is audited as a refused signature is; an unknown session only when no signed request
follows (the agent's own recovery). Sessions open only on an Ed25519-signed request of an agent
with a key; K is never stored or logged; the real agent (``AgentAuth``) uses them and recovers
from a replica that does not hold its session without its caller seeing a failure.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from stockade import agent_session as sess
from stockade import agent_signature as sig
from stockade.agent.signing import AgentAuth, signed_headers
from stockade.agent.state import NEXT_KEY_FILE, Credential
from stockade.controller.api.hot import HotRoutes
from stockade.controller.app import create_app
from stockade.controller.services.agent_sessions import SessionTable
from tests.api.conftest import Api, make_settings
from tests.security.test_hot_routes import _fill
from tests.security.test_node_poll import _batch, _estate
from tests.security.test_pod_enrolment import _agent

INSTANCE = "5e" * 16

# (method, path after /agents/{id}/, body, served by the fast dispatch); "{pod}": the node's pod
ROUTES: dict[str, tuple[str, str, Any, bool]] = {
    "wait": ("GET", "policy/wait?after=0&timeout=0&include_policy=true&applied=0", None, True),
    "ack": ("POST", "ack", {"revision": 0}, True),
    "heartbeat": ("POST", "heartbeat", {"backend": "nftables"}, True),
    "pods/updates": ("POST", "pods/updates", {"pods": [{"agent_id": "{pod}", "revision": 0}], "timeout": 0}, True),
    "pods/acks": ("POST", "pods/acks", {"acks": [{"agent_id": "{pod}", "revision": 0}]}, True),
    "policy": ("GET", "policy", None, False),
    "events": ("POST", "events", {"events": [{"kind": "tamper", "detail": "x"}]}, False),
    "flows": ("POST", "flows", {"sent_at": 0, "dropped": 0, "records": []}, False),
}


@dataclass(frozen=True)
class Held:
    """A session as the agent holds it."""

    id: str
    key: bytes
    instance: str


@dataclass
class Node:
    api: Api
    cred: Credential
    pod: str
    tmp: Path


@pytest.fixture
def node(sqlite_api: Api, tmp_path: Path) -> Iterator[Node]:
    _estate(sqlite_api)
    cred = _agent(sqlite_api, tmp_path, "node-a")
    pod = _batch(sqlite_api, cred, ["k8s.shop.db-1"], tmp_path)["enrolled"][0]["agent_id"]
    yield Node(sqlite_api, cred, pod, tmp_path)


def _key(cred: Credential) -> Any:
    assert cred.key_file is not None
    return sig.load_private_key_pem(cred.key_file.read_bytes())


def open_session(client: TestClient, cred: Credential, instance: str = INSTANCE) -> Held:
    own = sess.new_exchange_key()
    own_text = sess.exchange_public_text(own)
    req = client.build_request("POST", f"/api/v1/agents/{cred.agent_id}/session", json={"public_key": own_text},
                               headers={"Authorization": f"Bearer {cred.token}"})
    req.headers.update(signed_headers(cred.agent_id, _key(cred), req, instance))
    r = client.send(req)
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"session", "public_key", "expires_in"} and got["expires_in"] == sess.SESSION_SECONDS
    k = sess.derive_session_key(own, got["public_key"], session_id=got["session"], agent_id=cred.agent_id,
                                agent_key_text=sig.public_key_text(_key(cred)), agent_exchange_text=own_text,
                                controller_exchange_text=got["public_key"])
    return Held(got["session"], k, instance)


def build(client: TestClient, cred: Credential, method: str, suffix: str, body: Any) -> httpx.Request:
    content = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {cred.token}"}
    if content:
        headers["Content-Type"] = "application/json"
    req: httpx.Request = client.build_request(method, f"/api/v1/agents/{cred.agent_id}/{suffix}",
                                              content=content, headers=headers)
    return req


def mac(req: httpx.Request, cred: Credential, held: Held, *, skew: int = 0, nonce: str | None = None,
        instance: str | None = None, over: dict[str, Any] | None = None, over_body: bytes | None = None,
        key: bytes | None = None) -> httpx.Request:
    """Put a session MAC on ``req``; ``over``/``over_body``: MAC other fields than those sent."""
    fields = sig.SignedFields(cred.agent_id, req.method, req.url.raw_path.decode(), int(time.time()) + skew,
                              nonce or sig.new_nonce(), instance or held.instance)
    headers = sess.mac_request(key or held.key, held.id, replace(fields, **(over or {})),
                               req.content if over_body is None else over_body)
    headers.update({sig.TIMESTAMP_HEADER: str(fields.timestamp), sig.NONCE_HEADER: fields.nonce,
                    sig.INSTANCE_HEADER: fields.instance})
    req.headers.update(headers)
    return req


def refusals(api: Api) -> int:
    return len(api.ok("GET", "/events", params={"action": "agent.signature_refused"})["items"])


def _hot(api: Api) -> HotRoutes:
    hot = api.client.app.state.hot_routes  # type: ignore[attr-defined]
    assert isinstance(hot, HotRoutes)
    return hot


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_a_session_mac_passes_and_every_wrong_one_is_refused_and_audited(name: str, node: Node) -> None:
    api, cred = node.api, node.cred
    method, suffix, body, hot = ROUTES[name]
    body = _fill(body, node.pod)
    client, ring = api.client, api.ctl.agent_keys
    held = open_session(client, cred)

    served = _hot(api).served
    ok = client.send(mac(build(client, cred, method, suffix, body), cred, held))
    assert ok.status_code in (200, 202, 204), ok.text
    assert _hot(api).served == served + (1 if hot else 0)  # the fast dispatch and the framework both check

    other_method = "GET" if method != "GET" else "POST"
    other_path = f"/api/v1/agents/{cred.agent_id}/heartbeat" if suffix != "heartbeat" else \
        f"/api/v1/agents/{cred.agent_id}/ack"
    bad_key = bytes(32)
    cases: dict[str, httpx.Request] = {
        "wrong MAC": mac(build(client, cred, method, suffix, body), cred, held, key=bad_key),
        "another method": mac(build(client, cred, method, suffix, body), cred, held, over={"method": other_method}),
        "another path": mac(build(client, cred, method, suffix, body), cred, held, over={"target": other_path}),
        "another query": mac(build(client, cred, method, suffix, body), cred, held,
                             over={"target": f"/api/v1/agents/{cred.agent_id}/{suffix}?x=1"}),
        "another body": mac(build(client, cred, method, suffix, body), cred, held,
                            over_body=build(client, cred, method, suffix, body).content + b" "),
        "another time": mac(build(client, cred, method, suffix, body), cred, held,
                            over={"timestamp": int(time.time()) - 60}),
        "stale": mac(build(client, cred, method, suffix, body), cred, held, skew=-180),
        "future": mac(build(client, cred, method, suffix, body), cred, held, skew=180),
        "another process's session": mac(build(client, cred, method, suffix, body), cred, held, instance="ab" * 16),
        "a signature and a MAC": mac(build(client, cred, method, suffix, body), cred, held),
    }
    cases["a signature and a MAC"].headers[sig.SIGNATURE_HEADER] = sig.b64encode(
        _key(cred).sign(b"anything"))
    replayed = mac(build(client, cred, method, suffix, body), cred, held)
    assert client.send(replayed).status_code in (200, 202, 204)
    cases["a replayed nonce"] = replayed
    for case, req in cases.items():
        ring._refusal_reported.clear()  # (audited once a minute per agent: count each case)
        before = refusals(api)
        r = client.send(req)
        assert r.status_code == 401, (case, r.text)
        assert r.json()["error"] == "NotAuthenticatedError", (case, r.text)
        if case != "a replayed nonce":  # (a replay is refused as a signature's is: after the proof, unaudited)
            assert refusals(api) == before + 1, case
    # the session still works after all that (refusals do not break the agent's own session)
    assert client.send(mac(build(client, cred, method, suffix, body), cred, held)).status_code in (200, 202, 204)


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_sessions_not_held_another_agents_and_after_rotation_or_revocation_are_refused(name: str,
                                                                                      node: Node) -> None:
    api, cred = node.api, node.cred
    method, suffix, body, _hot_route = ROUTES[name]
    body = _fill(body, node.pod)
    client, ring = api.client, api.ctl.agent_keys
    held = open_session(client, cred)

    def send(h: Held, c: Credential = cred, **kw: Any) -> httpx.Response:
        r: httpx.Response = client.send(mac(build(client, c, method, suffix, body), c, h, **kw))
        return r

    # unknown (another replica's, or from before a restart): a distinct answer, not audited at once
    ring._refusal_reported.clear()
    before = refusals(api)
    r = send(Held(sess.new_session_id(), held.key, INSTANCE))
    assert r.status_code == 401 and r.json()["error"] == sess.UNKNOWN_SESSION, r.text
    assert refusals(api) == before
    # expired
    now = time.time()
    ring.clock = lambda: now + sess.SESSION_SECONDS + 1
    r = send(held, skew=sess.SESSION_SECONDS + 1)
    assert r.status_code == 401 and r.json()["error"] == sess.UNKNOWN_SESSION, r.text
    ring.clock = time.time
    # another agent's session (its key and id, this agent's token): refused and audited
    other = _agent(api, node.tmp, "node-b")
    theirs = open_session(client, other)
    ring._refusal_reported.clear()
    before = refusals(api)
    r = send(theirs)
    assert r.status_code == 401 and "another agent" in r.json()["message"], r.text
    assert refusals(api) == before + 1
    # the key rotated (the rotation itself signed, as it must be): the old session is gone
    held = open_session(client, cred)
    assert send(held).status_code in (200, 202, 204)
    new = sig.new_private_key()
    new_text = sig.public_key_text(new)
    rot = client.build_request("POST", f"/api/v1/agents/{cred.agent_id}/key", headers={
        "Authorization": f"Bearer {cred.token}"}, json={
        "public_key": new_text, "proof": sig.b64encode(new.sign(sig.rotation_message(cred.agent_id, new_text)))})
    on_session = mac(client.build_request(rot.method, rot.url, content=rot.content, headers=rot.headers), cred, held)
    r = client.send(on_session)
    assert r.status_code == 401 and "signed" in r.json()["message"], r.text  # not on a session
    rot.headers.update(signed_headers(cred.agent_id, _key(cred), rot, INSTANCE))
    assert client.send(rot).status_code == 204
    r = send(held)
    assert r.status_code == 401 and r.json()["error"] == sess.UNKNOWN_SESSION, r.text
    assert cred.key_file is not None
    cred.key_file.write_bytes(sig.private_key_pem(new))
    held = open_session(client, cred)
    assert send(held).status_code in (200, 202, 204)
    # revoked: the token stops working, and the session with it
    api.ok("POST", f"/agents/{cred.agent_id}/revoke", 204)
    r = send(held)
    assert r.status_code == 401, r.text
    assert len(ring.sessions_table) == 1  # (node-b's only)


def test_an_unknown_session_without_a_signed_retry_is_audited_after_the_grace(node: Node) -> None:
    api, cred = node.api, node.cred
    client, ring = api.client, api.ctl.agent_keys
    stranger = Held(sess.new_session_id(), bytes(32), INSTANCE)
    beat: tuple[str, str, Any] = ("POST", "heartbeat", {})
    captured = build(client, cred, *beat)
    captured.headers.update(signed_headers(cred.agent_id, _key(cred), captured, INSTANCE))
    assert client.send(captured).status_code == 200
    assert client.send(mac(build(client, cred, *beat), cred, stranger)).status_code == 401
    assert client.send(captured).status_code == 401  # a replayed signed request proves nothing
    ring._refusal_reported.clear()
    before = refusals(api)
    start = time.time()
    ring.clock = lambda: start + 31
    other = _agent(api, node.tmp, "node-b")  # any agent request sweeps
    held = open_session(client, other)
    assert client.send(mac(build(client, other, *beat), other, held, skew=31)).status_code == 200
    ring.clock = time.time
    items = api.ok("GET", "/events", params={"action": "agent.signature_refused"})["items"]
    assert len(items) == before + 1
    [late] = [e for e in items if "no signed request" in e["after"]["reason"]]
    assert late["name"] == cred.agent_id
    # the agent's own recovery (a signed request right after) is not a refusal
    assert client.send(mac(build(client, cred, *beat), cred, stranger)).status_code == 401
    signed = build(client, cred, *beat)
    signed.headers.update(signed_headers(cred.agent_id, _key(cred), signed, INSTANCE))
    assert client.send(signed).status_code == 200
    ring._refusal_reported.clear()
    ring.clock = lambda: start + 62
    assert client.send(mac(build(client, other, *beat), other, held, skew=62)).status_code == 200
    ring.clock = time.time
    assert refusals(api) == before + 1


def test_only_a_signed_request_of_an_agent_with_a_key_opens_a_session(node: Node) -> None:
    api, cred = node.api, node.cred
    client = api.client
    held = open_session(client, cred)
    own = sess.exchange_public_text(sess.new_exchange_key())
    # on a session: refused (a session never begets a session without the key)
    r = client.send(mac(build(client, cred, "POST", "session", {"public_key": own}), cred, held))
    assert r.status_code == 401 and "Ed25519-signed" in r.json()["message"], r.text
    # the token alone
    r = client.post(f"/api/v1/agents/{cred.agent_id}/session", json={"public_key": own},
                    headers={"Authorization": f"Bearer {cred.token}"})
    assert r.status_code == 401, r.text
    # an X25519 key of small order (the shared secret would be zero): refused
    weak = build(client, cred, "POST", "session", {"public_key": sig.b64encode(bytes(32))})
    weak.headers.update(signed_headers(cred.agent_id, _key(cred), weak, INSTANCE))
    r = client.send(weak)
    assert r.status_code == 422 and r.json()["issues"][0]["field"] == "public_key", r.text
    # an agent enrolled without a key has nothing to bind a session to
    code = api.ok("POST", "/pairing-profiles/k8s-nodes/codes", 201)["code"]
    e = client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": "keyless-1"}).json()
    r = client.post(f"/api/v1/agents/{e['agent_id']}/session", json={"public_key": own},
                    headers={"Authorization": f"Bearer {e['token']}"})
    assert r.status_code == 403 and "no key" in r.json()["message"], r.text
    # nor for another agent
    other = _agent(api, node.tmp, "node-b")
    req = build(client, cred, "POST", "session", {"public_key": own})
    req = client.build_request("POST", f"/api/v1/agents/{other.agent_id}/session", content=req.content,
                               headers=req.headers)
    req.headers.update(signed_headers(cred.agent_id, _key(cred), req, INSTANCE))
    assert client.send(req).status_code == 403


def test_the_session_key_is_never_stored_logged_or_answered(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    api, cred = node.api, node.cred
    caplog.set_level(logging.DEBUG)
    client = api.client
    auth = AgentAuth(cred)
    for _ in range(3):
        r = client.post(f"/api/v1/agents/{cred.agent_id}/heartbeat", json={}, auth=auth)
        assert r.status_code == 200
    table = api.ctl.agent_keys.sessions_table._by_id
    assert auth._session is not None and table[auth._session.id].key == auth._session.key
    sessions = list(table.values())
    forms = [form for k in (s.key for s in sessions)
             for form in (k, k.hex().encode(), base64.b64encode(k).rstrip(b"="), sig.b64encode(k).encode())]
    db_path = Path(str(api.ctl.engine.url.database))
    stored = db_path.read_bytes() + b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "-*"))
    logged = caplog.text.encode() + repr(sessions).encode() + repr(auth._session).encode()
    for form in forms:
        assert form not in stored and form not in logged


def test_the_real_agent_uses_its_session_and_recovers_on_a_replica_without_it(node: Node) -> None:
    api, cred = node.api, node.cred
    auth = AgentAuth(cred)
    beat = f"/api/v1/agents/{cred.agent_id}/heartbeat"
    first = api.client.post(beat, json={}, auth=auth)  # signed (a one-shot client never opens a session)
    assert first.status_code == 200 and not first.history and sig.SIGNATURE_HEADER in first.request.headers
    second = api.client.post(beat, json={}, auth=auth)
    assert second.status_code == 200 and sess.MAC_HEADER in second.request.headers
    assert [h.request.url.path for h in second.history] == [f"/api/v1/agents/{cred.agent_id}/session"]
    for _ in range(3):
        r = api.client.post(beat, json={}, auth=auth)
        assert r.status_code == 200 and not r.history and sess.MAC_HEADER in r.request.headers
    assert auth.sessions_opened == 1
    # a second controller on the same database does not hold the session: the caller sees a 200
    second = create_app(make_settings(str(api.ctl.engine.url)))
    with TestClient(second) as other:
        r = other.post(beat, json={}, auth=auth)
        assert r.status_code == 200, r.text
        assert [h.status_code for h in r.history] == [401]
        assert r.history[0].json()["error"] == sess.UNKNOWN_SESSION
        assert sig.SIGNATURE_HEADER in r.request.headers and auth._session is None
        auth._next_open = 0.0  # (one open per SESSION_OPEN_INTERVAL: let the next one open now)
        r = other.post(beat, json={}, auth=auth)
        assert r.status_code == 200 and sess.MAC_HEADER in r.request.headers and auth.sessions_opened == 2
        wait = other.get(f"/api/v1/agents/{cred.agent_id}/policy/wait", params={"after": 0, "timeout": 0},
                         auth=auth)
        assert wait.status_code == 200 and not wait.history and sess.MAC_HEADER in wait.request.headers
    # without sessions (--no-sessions in the bench): every request signed
    plain = AgentAuth(cred, sessions=False)
    r = api.client.post(beat, json={}, auth=plain)
    assert r.status_code == 200 and sig.SIGNATURE_HEADER in r.request.headers and not r.history


def test_an_interrupted_rotation_still_recovers_from_a_session(node: Node) -> None:
    """The controller took the next key, the agent did not yet promote it: the session is gone
    (bound to the old key), the signed retry is refused, the next key is promoted, the call works."""
    api, cred = node.api, node.cred
    auth = AgentAuth(cred)
    beat = f"/api/v1/agents/{cred.agent_id}/heartbeat"
    for _ in range(2):  # signed, then on a session
        assert api.client.post(beat, json={}, auth=auth).status_code == 200
    assert auth._session is not None
    new = sig.new_private_key()
    new_text = sig.public_key_text(new)
    assert cred.key_file is not None
    (cred.key_file.parent / NEXT_KEY_FILE).write_bytes(sig.private_key_pem(new))
    r = api.client.post(f"/api/v1/agents/{cred.agent_id}/key", auth=AgentAuth(cred, sessions=False), json={
        "public_key": new_text, "proof": sig.b64encode(new.sign(sig.rotation_message(cred.agent_id, new_text)))})
    assert r.status_code == 204, r.text
    r = api.client.post(beat, json={}, auth=auth)
    assert r.status_code == 200, r.text
    assert [h.status_code for h in r.history] == [401, 401]  # the session, the old key; then the new key
    assert sig.load_private_key_pem(cred.key_file.read_bytes()).public_key() == new.public_key()


def test_the_table_is_bounded_per_agent_and_in_all() -> None:
    now = [1000.0]
    table = SessionTable(lambda: now[0], max_per_agent=2, max_sessions=3)
    agent_key = object()
    ed = sig.public_key_text(sig.new_private_key())

    def opened(agent: str) -> str:
        return table.open(agent, INSTANCE, agent_key, ed, sess.exchange_public_text(sess.new_exchange_key())).session

    a1, a2, a3 = opened("a"), opened("a"), opened("a")
    assert a1 not in table._by_id and {a2, a3} <= set(table._by_id)
    b1, b2 = opened("b"), opened("b")
    assert len(table) == 3 and a2 not in table._by_id and {a3, b1, b2} <= set(table._by_id)
    table.drop_agent("b")
    assert set(table._by_id) == {a3} and table._of_agent == {"a": [a3]}
    now[0] += sess.SESSION_SECONDS  # expired sessions go when the next one opens
    c1 = opened("c")
    assert set(table._by_id) == {c1} and table._of_agent == {"c": [c1]}


def test_a_quarantined_agent_loses_its_sessions(node: Node) -> None:
    """Two processes on one credential (the clone check), or a report claiming another workload's
    addresses: the agent is quarantined and proves its next requests with its key again."""
    api, cred = node.api, node.cred
    table = api.ctl.agent_keys.sessions_table
    beat = f"/api/v1/agents/{cred.agent_id}/heartbeat"
    first, second = AgentAuth(cred, instance="a" * 32), AgentAuth(cred, instance="b" * 32)
    for _ in range(2):  # signed, then on a session
        assert api.client.post(beat, json={}, auth=first).status_code == 200
    for _ in range(2):
        assert api.client.post(beat, json={}, auth=second).status_code == 200
    assert len(table._of_agent[cred.agent_id]) == 2
    assert api.client.post(beat, json={}, auth=first).status_code == 200  # the first is back: two processes
    assert api.ok("GET", f"/agents/{cred.agent_id}")["quarantined"]
    assert cred.agent_id not in table._of_agent
    # the address check: node-b reports the address of the pod k8s.shop.db-1
    other = _agent(api, node.tmp, "node-b")
    auth = AgentAuth(other)
    for _ in range(2):
        assert api.client.post(f"/api/v1/agents/{other.agent_id}/heartbeat", json={}, auth=auth).status_code == 200
    assert other.agent_id in table._of_agent
    r = api.client.put(f"/api/v1/agents/{other.agent_id}/interfaces", auth=auth,
                       json={"interfaces": [{"name": "eth0", "addresses": ["10.60.0.1"]}]})
    assert r.status_code == 200 and r.json()["quarantined"], r.text
    assert other.agent_id not in table._of_agent
