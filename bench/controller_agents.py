"""The controller benchmark's simulated agents (``bench/controller.py``): the tiny keep-alive HTTP
client, one agent's long-poll loop, enrolment, and the runner processes that hold them.

Each runner process (``python bench/controller_agents.py --agents-runner HEARTBEAT``, started by
:class:`Runners`) reads the agents to enrol from its stdin's first line, enrols them
``concurrency`` at a time (each agent long-polls as soon as it has enrolled, as a real agent
does), writes the enrolled agents on stdout, then answers ``state`` commands until ``stop``.
No kernel; the agents are what the controller sees on the wire (with ``--sign``, each signs its
requests with a key of its own through ``stockade.agent_signature``, the real agent's format).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENROL_CONCURRENCY = 48  # enrolments in flight (a fleet rolled out at once; a replica batches what waits)

def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < 100_000:  # 25,000 agents hold 25,000 sockets in this one process
        try:
            want = min(262_144, int(Path("/proc/sys/fs/nr_open").read_text()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (OSError, ValueError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- a minimal HTTP/1.1 keep-alive client --------------------------------------------------------


Signer = Callable[[str, str, bytes], dict[str, str]]


class _Response(asyncio.Protocol):
    """A keep-alive connection's bytes: one whole answer at a time (status line, headers with a
    Content-Length, body), parsed once it has all arrived, not line by line through a stream."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the controller closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def _complete(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buf[:end]).lower() + b"\r\n"
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17:head.index(b"\r\n", at + 2)]) if at >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        self.waiter.set_result((int(head[9:12]), body))


class Conn:
    """One keep-alive connection; requests on it are sequential (as an agent's are)."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.port = port
        self.source = source  # a local address of 127.0.0.0/8 to connect from (None: the kernel's choice)
        self.proto: _Response | None = None

    async def request(self, method: str, path: str, token: str = "", body: Any = None,
                      raw: tuple[str, bytes] | None = None,
                      signer: Signer | SessionProof | None = None) -> tuple[int, Any]:
        """``raw``: (content type, bytes) instead of a JSON ``body``; ``signer``: the headers that
        sign the request (method, path, body), as the real agent's; a :class:`SessionProof` proves it
        as the real agent does (a session's MAC, a signature when the session is refused)."""
        if isinstance(signer, SessionProof):
            return await signer.request(self, method, path, token, body, raw)
        for attempt in range(3):
            try:
                return await self._request(method, path, token, body, raw, signer)
            except (ConnectionError, OSError):
                self.close()
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _request(self, method: str, path: str, token: str, body: Any,
                       raw: tuple[str, bytes] | None = None, signer: Signer | None = None) -> tuple[int, Any]:
        loop = asyncio.get_running_loop()
        if self.proto is None or self.proto.lost is not None:
            _t, self.proto = await loop.create_connection(
                _Response, "127.0.0.1", self.port, local_addr=(self.source, 0) if self.source else None)
        proto = self.proto
        ctype, payload = raw if raw is not None else ("application/json", b"" if body is None else
                                                      json.dumps(body).encode())
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n"
        if payload:
            head += f"Content-Type: {ctype}\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        if signer is not None:
            head += "".join(f"{k}: {v}\r\n" for k, v in signer(method, path, payload).items())
        proto.waiter = loop.create_future()
        assert proto.transport is not None
        proto.transport.write(head.encode() + b"\r\n" + payload)
        proto._complete()  # (nothing is buffered between sequential requests; kept for safety)
        status, data = await proto.waiter
        return status, (json.loads(data) if data else None)

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


# ---- simulated agents ----------------------------------------------------------------------------


@dataclass
class Agent:
    index: int
    agent_id: str
    token: str
    workload: str
    applied: int = 0
    acks: list[tuple[float, int]] = field(default_factory=list)
    errors: int = 0
    signer: Signer | SessionProof | None = None  # --sign: proves every request with the agent's key, as the real one


def agent_signer(agent_id: str, key: Any, instance: str | None = None) -> Signer:
    """The real agent's signature headers (``stockade.agent_signature``) with this agent's key."""
    from stockade import agent_signature as sig

    instance = instance or sig.new_nonce()  # one per simulated agent process

    def sign(method: str, target: str, body: bytes) -> dict[str, str]:
        fields = sig.SignedFields(agent_id, method, target, int(time.time()), sig.new_nonce(), instance)
        return sig.sign_request(key, fields, body)

    return sign


class SessionProof:
    """What the real agent's ``AgentAuth`` (``stockade.agent.signing``) does with its key: once a
    signed request was accepted, open a session (``stockade.agent_session``) with a signed request,
    prove later requests with the session's MAC, and when a MAC'd request is refused (401: the
    replica restarted, or is not the one that opened it) drop the session and send the request
    again signed; at most one open per ``OPEN_INTERVAL`` seconds, a new one before it expires."""

    OPEN_INTERVAL = 30.0

    def __init__(self, agent_id: str, key: Any) -> None:
        from stockade import agent_signature as sig

        self.agent_id, self.key, self.instance = agent_id, key, sig.new_nonce()
        self.sign = agent_signer(agent_id, key, self.instance)
        self.session: tuple[str, bytes] | None = None
        self.renew_at = 0.0
        self.next_open = 0.0
        self.opened = 0
        self.proven = False  # a signed request was accepted (the real agent opens a session only then)

    def _mac(self, method: str, target: str, body: bytes) -> dict[str, str]:
        from stockade import agent_session as sess
        from stockade import agent_signature as sig

        assert self.session is not None
        fields = sig.SignedFields(self.agent_id, method, target, int(time.time()), sig.new_nonce(), self.instance)
        return sess.mac_request(self.session[1], self.session[0], fields, body)

    async def _open(self, conn: Conn, token: str) -> None:
        from stockade import agent_session as sess
        from stockade import agent_signature as sig

        own = sess.new_exchange_key()
        own_text = sess.exchange_public_text(own)
        status, got = await conn.request("POST", f"/api/v1/agents/{self.agent_id}/session", token,
                                         {"public_key": own_text}, signer=self.sign)
        if status in (404, 405):  # a controller from before sessions (--before-src): as the real agent, back off
            self.next_open = time.monotonic() + 10 * self.OPEN_INTERVAL
        if status != 200:
            return
        key = sess.derive_session_key(own, got["public_key"], session_id=got["session"], agent_id=self.agent_id,
                                      agent_key_text=sig.public_key_text(self.key), agent_exchange_text=own_text,
                                      controller_exchange_text=got["public_key"])
        self.session, self.renew_at = (got["session"], key), time.monotonic() + got["expires_in"] - 120
        self.opened += 1

    async def request(self, conn: Conn, method: str, path: str, token: str, body: Any,
                      raw: tuple[str, bytes] | None) -> tuple[int, Any]:
        now = time.monotonic()
        if self.proven and (self.session is None or now >= self.renew_at) and now >= self.next_open:
            self.next_open = now + self.OPEN_INTERVAL
            await self._open(conn, token)
        if self.session is not None:
            status, got = await conn.request(method, path, token, body, raw, signer=self._mac)
            if status != 401:
                return status, got
            self.session = None
        status, got = await conn.request(method, path, token, body, raw, signer=self.sign)
        self.proven = self.proven or status != 401  # sessions from the next request on
        return status, got


LONG_POLL_S = 20.0  # the real agent's first poll (agent/transport.FIRST_POLL_SECONDS), until the controller
POLL_JITTER = 0.25  # advertises a hold; then that hold, shortened at random by up to this (POLL_JITTER there)
STATE_REPORT_S = 300.0  # the real agent's heartbeat while its long-polls count as heartbeats (agent/outbox.py)


async def agent_loop(a: Agent, port: int, heartbeat: float, stop: asyncio.Event) -> None:
    """One simulated agent: long-polls as the real one does (20 s, then the hold the controller
    advertises, jittered); heartbeats every ``heartbeat`` s, or every ``STATE_REPORT_S`` once the
    controller says a long-poll counts as a heartbeat (as the real one)."""
    poll = Conn(port)
    base = f"/api/v1/agents/{a.agent_id}"
    next_beat = time.monotonic() + heartbeat * (a.index % 100) / 100
    period = heartbeat
    hold: float | None = None
    while not stop.is_set():
        try:
            wanted = LONG_POLL_S if hold is None else hold * (1.0 - POLL_JITTER * random.random())
            timeout = max(0.5, min(wanted, next_beat - time.monotonic()))
            # the wait carries the acknowledgement of the applied revision (applied=...)
            query = f"after={a.applied}&applied={a.applied}&timeout={timeout:.1f}&include_policy=true"
            status, got = await poll.request("GET", f"{base}/policy/wait?{query}", a.token, signer=a.signer)
            if status != 200:
                a.errors += 1
                await asyncio.sleep(1)
                continue
            advertised = got.get("hold")
            hold = float(advertised) if isinstance(advertised, (int, float)) and advertised > 0 else None
            if got.get("heartbeat") is True and period != STATE_REPORT_S:
                period = STATE_REPORT_S
                next_beat = time.monotonic() + period * (1 + a.index % 100 / 100)
            if got["changed"]:
                pol = got["policy"]
                if pol["full"] is None and pol["base"] != a.applied:
                    a.errors += 1  # a delta must start from what this agent applied
                a.applied = pol["revision"]
                a.acks.append((time.perf_counter(), a.applied))  # acknowledged by the next wait, sent now
            if time.monotonic() >= next_beat:
                await poll.request("POST", f"{base}/heartbeat", a.token, {}, signer=a.signer)
                next_beat = time.monotonic() + period
        except (ConnectionError, OSError):
            a.errors += 1
            await asyncio.sleep(0.5)
    poll.close()



AGENTS_PER_RUNNER = 10_000  # one process holds one socket per agent; the hard fd limit here is 20,000


async def _runner(heartbeat: float) -> None:
    """The ``--agents-runner`` mode: enrol the agents named on stdin's first line, each starting its
    long-poll as soon as it has enrolled (as a real agent does); then answer commands."""
    _raise_nofile()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    ports = spec["ports"]
    stop = asyncio.Event()
    agents: list[Agent] = []
    tasks: list[asyncio.Task[None]] = []

    def started(a: Agent) -> None:
        agents.append(a)
        tasks.append(asyncio.create_task(agent_loop(a, ports[a.index % len(ports)], heartbeat, stop)))

    await _enrol(ports, spec["enrol"], spec["concurrency"], started, spec.get("sign", False),
                 spec.get("sessions", True))
    sys.stdout.write(json.dumps({"enrolled": [[a.index, a.agent_id, a.workload] for a in agents]}) + "\n")
    sys.stdout.flush()
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "state":  # each agent's applied revision and its first ack at or after t0
            t0 = cmd["t0"]
            state = [[a.index, a.applied, next((t for t, _rev in a.acks if t >= t0), None)] for a in agents]
            out = json.dumps({"state": state, "errors": sum(a.errors for a in agents)})
        else:
            break
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Runners:
    """The simulated agents, in ``ceil(N / AGENTS_PER_RUNNER)`` processes of their own (their CPU
    is the client's share; perf_counter is CLOCK_MONOTONIC, so ack times compare across them)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def enrol(self, work: list[list[Any]], ports: list[int], heartbeat: float,
                    sign: bool = False, sessions: bool = True) -> list[Agent]:
        """Enrol ``work`` ([index, code, hostname, address] per agent) in the runners; every agent
        long-polls from its own enrolment on (``sign``: with a key of its own, signing every
        request). Returns the agents once all have enrolled."""
        k = max(1, -(-len(work) // AGENTS_PER_RUNNER))
        for j in range(k):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--agents-runner", str(heartbeat), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, limit=2**26)
            assert proc.stdin is not None
            concurrency = max(1, ENROL_CONCURRENCY // k)
            proc.stdin.write(json.dumps({"enrol": work[j::k], "ports": ports, "concurrency": concurrency,
                                         "sign": sign, "sessions": sessions}).encode() + b"\n")
            await proc.stdin.drain()
            self.procs.append(proc)
        agents: list[Agent] = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("an agent runner ended before its agents enrolled")
            agents += [Agent(i, aid, "", wl) for i, aid, wl in json.loads(line)["enrolled"]]
        return sorted(agents, key=lambda a: a.index)

    async def state(self, t0: float) -> tuple[dict[int, tuple[int, float | None]], int]:
        """index -> (applied revision, first ack at or after t0), and the agents' error count."""
        out: dict[int, tuple[int, float | None]] = {}
        errors = 0
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps({"cmd": "state", "t0": t0}).encode() + b"\n")
            await proc.stdin.drain()
            got = json.loads(await proc.stdout.readline())
            errors += got["errors"]
            out.update({i: (applied, t) for i, applied, t in got["state"]})
        return out, errors

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def stop(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b'{"cmd": "stop"}\n')
            proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()


async def _enrol(ports: list[int], work: list[list[Any]], concurrency: int, started: Any, sign: bool = False,
                 sessions: bool = True) -> None:
    """Enrol every agent of ``work``, ``concurrency`` at a time; ``started(agent)`` right after each
    (``sign``: each with an Ed25519 key of its own, as the real agent enrols; ``sessions``: proving
    its requests on a session as the real agent does, else signing each one)."""
    queue = list(reversed(work))
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        # one keep-alive connection per replica per worker, each worker from its own loopback address:
        # a fleet enrols from many addresses, so the per-client enrolment limit (a row lock per address,
        # shared by the replicas) does not serialise the whole bench behind 127.0.0.1
        source = f"127.{100 + os.getpid() % 100}.{w // 250}.{1 + w % 250}"
        conns = {p: Conn(p, source) for p in ports}
        while queue:
            i, code, hostname, addr = queue.pop()
            c = conns[ports[i % len(ports)]]  # agent i enrols on (and later polls) replica i mod N
            body: dict[str, Any] = {"activation_code": code, "hostname": hostname,
                                    "interfaces": [{"name": "eth0", "addresses": [addr]}]}
            key = None
            if sign:
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

                from stockade.agent_signature import public_key_text

                key = Ed25519PrivateKey.generate()
                body["public_key"] = public_key_text(key)
            status, got = await c.request("POST", "/api/v1/agents/enroll", body=body)
            assert status == 201, got
            done += 1
            proof = None if key is None else SessionProof(got["agent_id"], key) if sessions else \
                agent_signer(got["agent_id"], key)
            started(Agent(i, got["agent_id"], got["token"], got["workload"], signer=proof))
        for conn in conns.values():
            conn.close()

    async def progress() -> None:  # on stderr: a slow run shows where it is
        t0 = time.perf_counter()
        while True:
            await asyncio.sleep(30)
            print(f"runner {os.getpid()}: enrolled {done}/{len(work)} in {time.perf_counter() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    reporter.cancel()



def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--agents-runner":
        import uvloop

        uvloop.run(_runner(float(sys.argv[2])))
        return
    raise SystemExit("usage: controller_agents.py --agents-runner HEARTBEAT (started by bench/controller.py)")


if __name__ == "__main__":
    main()
