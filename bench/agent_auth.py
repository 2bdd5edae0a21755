"""Agent request proofs: an Ed25519 signature vs a session's HMAC (issue 18), CPU per request.

One controller app on SQLite, one agent enrolled with a key, called through raw ASGI (no server,
no client in the timed loop) as ``bench/http_path.py`` does. For each route, the same requests
proven two ways, interleaved in ``--rounds`` rounds in this one process (so the machine's load
weighs on both alike; the table keeps each side's best round):

* ``signature``: every request Ed25519-signed (``AgentAuth(sessions=False)``, the agent before
  sessions, and ``bench/controller.py --sign --no-sessions``);
* ``session``: the MAC of the session the real agent opens (``AgentAuth``).

Rows: the whole request (the controller's CPU: HTTP path, proof check, route), the proof check
alone (``AgentKeyRing.check``), and the agent's CPU to make one proof.

    python bench/agent_auth.py --requests 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, MutableMapping
from typing import Any

ROUTES = ("wait", "ack", "heartbeat", "policy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n: int = args.requests

    import httpx
    from http_path import owner_client  # (this folder: the same controller set-up)
    from starlette.requests import Request

    from stockade import agent_session as sess
    from stockade.agent.signing import AgentAuth, signed_headers
    from stockade.agent.state import Credential, StateDir
    from stockade.agent_signature import SignedFields, new_nonce, public_key_text

    logging.getLogger("stockade").setLevel(logging.WARNING)
    with owner_client("stockade-h18s-bench-") as (client, app, owner, tmp):
        ctl = app.state.controller
        client.post("/api/v1/pairing-profiles", json={"name": "hosts", "mode": "idle", "code_max_uses": 5},
                    headers=owner)
        client.post("/api/v1/policy/provision", json={"message": "v1"}, headers=owner)
        state = StateDir(tmp / "host-1")
        code = client.post("/api/v1/pairing-profiles/hosts/codes", json={}, headers=owner).json()["code"]
        r = client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": "host-1",
                                                       "public_key": public_key_text(state.load_or_create_key())})
        assert r.status_code == 201, r.text
        e = r.json()
        cred = Credential("http://testserver", e["agent_id"], e["token"], e["workload"], state.key_path)
        signer = AgentAuth(cred, sessions=False)
        macer = AgentAuth(cred)
        base = f"/api/v1/agents/{cred.agent_id}"
        for _ in range(2):  # signed, then a session opened and used
            assert client.post(base + "/heartbeat", json={}, auth=macer).status_code == 200
        session = macer._session
        assert session is not None
        rev = ctl.dist.revisions.get(cred.workload, 0)
        specs: dict[str, tuple[str, str, Any]] = {
            "wait": ("GET", f"{base}/policy/wait?after={rev}&applied={rev}&timeout=0&include_policy=true", None),
            "ack": ("POST", f"{base}/ack", {"revision": rev}),
            "heartbeat": ("POST", f"{base}/heartbeat", {}),
            "policy": ("GET", f"{base}/policy", None),
        }

        def prepared(kind: str, method: str, target: str, body: Any) -> dict[str, Any]:
            content = json.dumps(body).encode() if body is not None else b""
            req = httpx.Request(method, "http://testserver" + target, content=content,
                                headers={"content-type": "application/json"} if body is not None else {})
            req.headers["Authorization"] = f"Bearer {cred.token}"
            if kind == "signature":
                signer._sign(req)
            else:
                macer._mac(req, session)
            path, _, query = target.partition("?")
            headers = [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in req.headers.items()
                                                  if k.lower() != "host")]
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                     "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
                     "server": ("testserver", 80)}
            return {"scope": scope, "body": content}

        def receiver(body: bytes) -> Callable[[], Any]:
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            return receive

        async def one(p: dict[str, Any]) -> int:
            status = 0

            async def send(message: MutableMapping[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]

            await app(p["scope"], receiver(p["body"]), send)
            return status

        async def whole(kind: str, name: str) -> float:
            ctl.agent_keys._seen.clear()  # (the nonces of the last rounds: one agent's cap is 20,000)
            ps = [prepared(kind, *specs[name]) for _ in range(n + 50)]
            for p in ps[:50]:
                assert await one(p) in (200, 204), (kind, name)
            start = time.process_time()
            for p in ps[50:]:
                await one(p)
            return (time.process_time() - start) / n * 1e6

        principal = ctl.agent_principal(cred.agent_id, cred.token[4:].partition("_")[2])
        assert principal is not None

        async def check_only(kind: str) -> float:
            ctl.agent_keys._seen.clear()
            ps = [prepared(kind, *specs["heartbeat"]) for _ in range(n)]
            reqs = [Request(p["scope"], receiver(p["body"])) for p in ps]
            start = time.process_time()
            for req in reqs:
                await ctl.agent_keys.check(req, principal)
            return (time.process_time() - start) / n * 1e6

        def agent_side(kind: str) -> float:
            key = signer.key_file.key() if signer.key_file else None
            req = httpx.Request("POST", "http://testserver" + base + "/heartbeat", content=b"{}")
            start = time.process_time()
            for _ in range(n):
                if kind == "signature":
                    signed_headers(cred.agent_id, key, req)  # type: ignore[arg-type]
                else:
                    fields = SignedFields(cred.agent_id, "POST", base + "/heartbeat", int(time.time()), new_nonce(),
                                          session.instance)
                    sess.mac_request(session.key, session.id, fields, b"{}")
            return (time.process_time() - start) / n * 1e6

        kinds = ("signature", "session")
        rows = [*(f"request: {n}" for n in ROUTES), "check only (AgentKeyRing.check)", "agent: make one proof"]
        best: dict[tuple[str, str], float] = {}
        assert client.portal is not None
        for _ in range(args.rounds):
            for kind in kinds:
                got = {f"request: {n}": client.portal.call(whole, kind, n) for n in ROUTES}
                got["check only (AgentKeyRing.check)"] = client.portal.call(check_only, kind)
                got["agent: make one proof"] = agent_side(kind)
                for row, us in got.items():
                    best[(row, kind)] = min(us, best.get((row, kind), float("inf")))
    load = os.getloadavg()
    print(f"CPU per request, microseconds (best of {args.rounds} interleaved rounds; {args.requests} requests "
          f"each); load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| | Ed25519 signature | session MAC | saved |")
    print("|---|---|---|---|")
    for row in rows:
        s, m = best[(row, "signature")], best[(row, "session")]
        print(f"| {row} | {s:,.1f} | {m:,.1f} | {s - m:,.1f} |")


if __name__ == "__main__":
    main()
