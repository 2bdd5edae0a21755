"""Controller CPU per agent request on the hot routes (issue 18): the HTTP path, in process.

One controller app on SQLite, called through raw ASGI (no server, no client in the timed loop),
so the figure is the controller's own CPU per request: its HTTP stack (middleware, routing,
parameter and body parsing, authentication with the request signature, answer encoding) plus
the route's work. Requests are signed as a real agent signs them (``AgentAuth``), each with its
own nonce, all signed before the clock starts.

Routes timed (``--requests`` each, after a warm-up):

* ``wait``: ``GET /agents/{id}/policy/wait?after=R&applied=R&timeout=0&include_policy=true``
  (the long-poll's answer when nothing moved, with its ack);
* ``ack``: ``POST /agents/{id}/ack``; ``heartbeat``: ``POST /agents/{id}/heartbeat``;
* ``node poll``: ``POST /agents/{node}/pods/updates`` naming ``--pods`` pods, nothing moved
  (the node round's HTTP part); ``node acks``: ``POST /agents/{node}/pods/acks``.

Each is timed two ways: ``asgi`` (the app called directly) and ``uvicorn`` (uvicorn's httptools
protocol configured as the CLI runs it, on an in-memory transport: the server's own work around
the app included); the agent routes also for an agent enrolled without a key (``no key``: no
signature check, as ``bench/controller.py``'s agents). ``--held N`` counts the GC-tracked objects
one held long-poll keeps alive (N held, each on its own connection).

``--before-src DIR`` runs the same in a subprocess with ``PYTHONPATH=DIR`` (e.g. a worktree of
main) and this checkout, interleaved ``--rounds`` times; the table shows the best round of each
(least disturbed by the other processes on the machine) and the load average.

    python bench/http_path.py --before-src /tmp/base/src --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROUTES = ("wait", "ack", "heartbeat", "node poll", "node acks", "wait, no key", "ack, no key", "heartbeat, no key")
PATHS = ("asgi", "uvicorn")


@contextlib.contextmanager
def owner_client(prefix: str) -> Iterator[tuple[Any, Any, dict[str, str], Path]]:
    """A controller app on a fresh SQLite file (no background flush) inside a TestClient, and the
    headers of an owner API key: (client, app, owner headers, the temp dir). Shared with agent_auth.py."""
    from fastapi.testclient import TestClient

    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.services.auth import Argon2Params

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    settings = ControllerSettings(database_url=f"sqlite:///{tmp / 'db'}", secure_cookies=False,
                                  argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1),
                                  flush_interval=3600.0)
    app = create_app(settings)
    with TestClient(app) as client:
        user, password = app.state.controller.first_run_credential
        client.headers["Origin"] = "http://testserver"
        assert client.post("/api/v1/auth/login", json={"username": user, "password": password}).status_code == 200
        key = client.post("/api/v1/api-keys", json={"name": "bench", "role": "owner"}).json()["key"]
        client.cookies.clear()
        yield client, app, {"Authorization": f"Bearer {key}"}, tmp


def _measure(requests: int, pods: int, routes: tuple[str, ...] = ROUTES, held_polls: int = 0) -> dict[str, float]:
    import httpx

    from stockade.agent.signing import AgentAuth
    from stockade.agent.state import Credential, StateDir
    from stockade.agent_signature import public_key_text

    logging_off()
    with owner_client("stockade-h18g-bench-") as (client, app, owner, tmp):
        ctl = app.state.controller

        def ok(method: str, path: str, body: Any) -> Any:
            r = client.request(method, "/api/v1" + path, json=body, headers=owner)
            assert r.status_code < 300, r.text
            return r.json() if r.content else None

        ok("POST", "/label-keys", {"name": "k8s-node", "values": []})
        ok("POST", "/pairing-profiles", {"name": "nodes", "mode": "idle", "code_max_uses": 5})
        ok("POST", "/services", {"name": "ssh", "ports": ["22/tcp"]})
        ok("POST", "/rulesets", {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
            {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
             "services": ["ssh"]}]})
        ok("POST", "/policy/provision", {"message": "v1"})
        batch = [{"name": f"k8s.shop.p{i}", "labels": {"app": "shop", "role": "db" if i % 2 else "web",
                                                         "k8s-node": "node-a"}, "mode": "full",
                  "interfaces": [{"name": "eth0", "addresses": [f"10.61.{i // 250}.{i % 250 + 1}"]}]}
                 for i in range(pods)]
        ok("POST", "/workload-batches", {"upsert": batch})

        def agent(host: str, key: bool = True) -> Credential:
            state = StateDir(tmp / host)
            pub = public_key_text(state.load_or_create_key())
            code = ok("POST", "/pairing-profiles/nodes/codes", None)["code"]
            r = client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": host,
                                                           **({"public_key": pub} if key else {})})
            assert r.status_code == 201, r.text
            j = r.json()
            return Credential("http://testserver", j["agent_id"], j["token"], j["workload"],
                              state.key_path if key else None)

        node = agent("node-a")
        items = [{"workload": f"k8s.shop.p{i}", "public_key": public_key_text(
            StateDir(tmp / f"pod{i}").load_or_create_key())} for i in range(pods)]
        r = client.post(f"/api/v1/agents/{node.agent_id}/pods/enroll-batch", auth=AgentAuth(node),
                        json={"pods": items})
        assert r.status_code == 200, r.text
        held = [{"agent_id": e["agent_id"], "revision": e["revision"]} for e in r.json()["enrolled"]]
        a = agent("host-1")
        u = agent("host-2", key=False)  # enrolled without a key, as bench/controller.py's agents are
        rev = ctl.dist.revisions.get(a.workload, 0)
        base = f"/api/v1/agents/{a.agent_id}"
        nbase = f"/api/v1/agents/{node.agent_id}"
        specs: dict[str, tuple[Credential, str, str, Any]] = {
            "wait": (a, "GET", f"{base}/policy/wait?after={rev}&applied={rev}&timeout=0&include_policy=true", None),
            "ack": (a, "POST", f"{base}/ack", {"revision": rev}),
            "heartbeat": (a, "POST", f"{base}/heartbeat", {}),
            "node poll": (node, "POST", f"{nbase}/pods/updates", {"pods": held, "acks": [], "timeout": 0}),
            "node acks": (node, "POST", f"{nbase}/pods/acks", {"acks": held}),
        }
        urev = ctl.dist.revisions.get(u.workload, 0)
        ubase = f"/api/v1/agents/{u.agent_id}"
        specs["wait, no key"] = (u, "GET", f"{ubase}/policy/wait?after={urev}&applied={urev}&timeout=0"
                                           "&include_policy=true", None)
        specs["ack, no key"] = (u, "POST", f"{ubase}/ack", {"revision": urev})
        specs["heartbeat, no key"] = (u, "POST", f"{ubase}/heartbeat", {})

        def signed(cred: Credential, method: str, target: str, body: Any) -> dict[str, Any]:
            content = json.dumps(body).encode() if body is not None else b""
            req = httpx.Request(method, "http://testserver" + target, content=content,
                                headers={"content-type": "application/json"} if body is not None else {})
            if cred.key_file is not None:
                AgentAuth(cred)._sign(req)
            else:
                req.headers["authorization"] = f"Bearer {cred.token}"
            path, _, query = target.partition("?")
            headers = [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in req.headers.items()
                                                  if k.lower() != "host")]
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                     "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
                     "server": ("testserver", 80)}
            wire = (f"{method} {target} HTTP/1.1\r\n".encode()
                    + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + content)
            return {"scope": scope, "body": content, "wire": wire}

        async def one(prepared: dict[str, Any]) -> int:
            sent = False
            status = 0

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": prepared["body"], "more_body": False}
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]

            await app(prepared["scope"], receive, send)
            return status

        server = _Uvicorn(app)

        async def timed(name: str, path: str) -> float:
            cred, method, target, body = specs[name]
            call = one if path == "asgi" else server.one
            warm = [signed(cred, method, target, body) for _ in range(50)]
            for p in warm:
                assert await call(p) in (200, 204), (name, path)
            batch_ = [signed(cred, method, target, body) for _ in range(requests)]
            start = time.process_time()
            for p in batch_:
                await call(p)
            return (time.process_time() - start) / requests * 1e6

        async def held_objects(count: int) -> float:
            """GC-tracked objects a held long-poll keeps alive (each on its own uvicorn connection)."""
            target = f"{ubase}/policy/wait?after={urev}&timeout=300&include_policy=true"
            polls = [_Uvicorn(app) for _ in range(count)]
            prepared = [signed(u, "GET", target, None) for _ in range(count)]
            gc.collect()
            before = len(gc.get_objects())
            for poll, p in zip(polls, prepared, strict=True):
                poll.start(p)
            for _ in range(5):
                await asyncio.sleep(0)
            gc.collect()
            kept = (len(gc.get_objects()) - before) / count
            assert len(ctl.presence) >= 1 and all(p.protocol.cycle is not None for p in polls), "held"
            for poll in polls:
                poll.disconnect()
            for _ in range(5):
                await asyncio.sleep(0)
            return kept

        assert client.portal is not None
        out = {f"{name} | {path}": client.portal.call(timed, name, path) for path in PATHS for name in routes}
        if held_polls:
            out["objects per held poll | uvicorn"] = client.portal.call(held_objects, held_polls)
    return out


class _Uvicorn:
    """uvicorn's HTTP/1.1 protocol (httptools, as the CLI runs it: no proxy headers, no access log) on
    an in-memory transport: each request is fed as bytes on one kept-alive connection and its answer
    written back, so the figure adds what the server does around the app (parsing, the scope, its
    ``receive`` and ``send``, keep-alive)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.protocol: Any = None
        self.closing = False

    def _start(self) -> None:
        from uvicorn.config import Config
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        from uvicorn.server import ServerState

        config = Config(self.app, lifespan="off", proxy_headers=False, access_log=False, timeout_keep_alive=75,
                        log_config=None, http="httptools")
        config.load()
        self.state = ServerState()
        self.state.default_headers = [(b"date", b"Sun, 06 Dec 2026 17:00:00 GMT"), *config.encoded_headers]
        self.protocol = HttpToolsProtocol(config, self.state, {}, _loop=asyncio.get_running_loop())
        self.protocol.connection_made(_Transport(self))

    def start(self, prepared: dict[str, Any]) -> None:
        """Send a request and leave it (a long-poll, held)."""
        self._start()
        self.protocol.data_received(prepared["wire"])

    def disconnect(self) -> None:
        self.closing = True
        self.protocol.connection_lost(None)

    async def one(self, prepared: dict[str, Any]) -> int:
        if self.protocol is None:
            self._start()
        self.status = 0
        self.protocol.data_received(prepared["wire"])
        for task in list(self.state.tasks):  # (the request's task; a finished one may linger a turn)
            await task
        return self.status


class _Transport(asyncio.Transport):
    def __init__(self, server: _Uvicorn) -> None:
        super().__init__()
        self.server = server

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8443), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: Any) -> None:
        if not self.server.status and bytes(data[:9]) == b"HTTP/1.1 ":
            self.server.status = int(bytes(data[9:12]))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if not self.server.closing:
            raise RuntimeError("the server closed the bench's connection")


def logging_off() -> None:
    import logging

    logging.getLogger("stockade").setLevel(logging.WARNING)


def _child(src: str | None, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    argv = [sys.executable, __file__, "--child", "--requests", str(args.requests), "--pods", str(args.pods),
            "--held", str(args.held), *(["--routes", args.routes] if args.routes else [])]
    got = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(got.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--pods", type=int, default=100, help="pods the node's poll names")
    ap.add_argument("--before-src", help="the src folder of another checkout, run beside this one")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--routes", help="'|'-separated names of the routes to time (default: all)")
    ap.add_argument("--held", type=int, default=1000, help="long-polls held to count the objects each keeps (0: none)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        routes = tuple(args.routes.split("|")) if args.routes else ROUTES
        print(json.dumps(_measure(args.requests, args.pods, routes, args.held)))
        return
    here = str(Path(__file__).resolve().parent.parent / "src")
    sides = [("before", args.before_src), ("after", here)] if args.before_src else [("this", here)]
    best: dict[str, dict[str, float]] = {label: {} for label, _ in sides}
    for _ in range(args.rounds):
        for label, src in sides:
            got = _child(src, args)
            for name, us in got.items():
                best[label][name] = min(us, best[label].get(name, float("inf")))
    load = os.getloadavg()
    print(f"controller CPU per request, microseconds (best of {args.rounds}; {args.requests} requests each; "
          f"node poll names {args.pods} pods); load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    head = ("| route | through | " + " | ".join(label for label, _ in sides)
            + (" | after/before |" if len(sides) == 2 else " |"))
    print(head)
    print("|" + "---|" * (len(sides) + 2 + (len(sides) == 2)))
    for name in best[sides[0][0]]:
        if not all(name in best[label] for label, _ in sides):
            continue
        cells = [f"{best[label][name]:,.0f}" for label, _ in sides]
        ratio = f" | {best['after'][name] / best['before'][name]:.2f} |" if len(sides) == 2 else " |"
        print(f"| {name} | " + " | ".join(cells) + ratio)


if __name__ == "__main__":
    main()
