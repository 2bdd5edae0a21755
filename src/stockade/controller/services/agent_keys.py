"""Checks that an agent request was proven on the agent's host: keys, freshness, replays, clones.

Every agent enrolled with a public key (the real agent always sends one) must sign each request
(:mod:`stockade.agent_signature`). :class:`AgentKeyRing` holds what that check needs in memory so
the hot path (a long-poll per agent) costs one Ed25519 verification and no database read:

* the agents' public keys (loaded from ``agents.public_key`` on first use, updated on enrolment,
  rotation and revocation);
* the nonces seen in the last ``2 x FRESHNESS_SECONDS`` per agent: a captured request replayed
  inside the freshness window is refused, one replayed later is refused as stale;
* a refused signature with a valid token is reported through ``on_refused`` (an audit event, at
  most once a minute per agent): the token was copied, or the host's clock is off;
* the process instance each agent last spoke from. An instance that comes back after a newer one
  took over means two processes are using one credential (a cloned host): the ring reports it
  once through ``on_clone`` and the enrolment service quarantines the agent.
* probation: a new instance that took over from one heard less than ``probation`` seconds
  before (a restart, or a copy starting while the original runs: they look alike at first) has
  its address changes held (:meth:`on_probation`) until it has spoken alone for ``probation``
  seconds; then ``on_release`` applies them. A copy is caught before that (the original speaks
  again within its long-poll) and its report never moves the workload's addresses. The default
  (45 s) exceeds the agent's longest quiet time (20 s long-poll, 15 s heartbeat).

* request sessions (:mod:`stockade.agent_session`, :class:`SessionTable`): a request may carry the
  MAC of a session opened with a signed request instead of a signature; it goes through the same
  freshness, nonce, instance and refusal logic. ``request.state.agent_proof`` tells the route which
  proof it got (opening a session and rotating the key take a signature only).

Agents enrolled before keys existed (``public_key`` NULL) still authenticate with their token
alone until they bind a key (the agent does so at its first start after the upgrade).
Single process, like the distributor: a second controller process keeps its own ring.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from stockade import agent_session as sess
from stockade import agent_signature as sig
from stockade.controller.services.agent_sessions import Opened, SessionTable, UnknownSessionError
from stockade.controller.services.auth import NotAuthenticatedError, Principal
from stockade.controller.storage.db import AgentRow
from stockade.errors import AuthError, Issue, ValidationError

MAX_NONCES_PER_AGENT = 20_000  # far above any real agent's request rate over the window
RETIRED_INSTANCES = 32


PROBATION_SECONDS = 45.0
UNPROVEN_GRACE = 30.0  # an unknown session must be followed by a signed request within this
MAX_UNPROVEN = 100_000


class SignatureRequiredError(NotAuthenticatedError):
    """A route that takes an Ed25519-signed request only (opening a session) got a session's MAC."""


@dataclass
class _AgentSeen:
    nonces: OrderedDict[str, float] = field(default_factory=OrderedDict)  # nonce -> forget after
    instance: str = ""
    retired: deque[str] = field(default_factory=lambda: deque(maxlen=RETIRED_INSTANCES))
    clone_reported: bool = False
    last_at: float = 0.0  # last verified request
    took_over_at: float = 0.0  # when ``instance`` replaced the previous one
    gap: float | None = None  # seconds between the previous instance's last request and the take-over


def request_target(request: Request) -> str:
    """``path?query`` as it came over the wire (what the agent signed)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    path = bytes(raw).split(b"?", 1)[0].decode("latin-1")
    query = bytes(request.scope.get("query_string") or b"").decode("latin-1")
    return f"{path}?{query}" if query else path


class AgentKeyRing:
    """Public keys, replay cache and instance tracking of the enrolled agents."""

    def __init__(self, sessions: sessionmaker[Session], *, freshness: float = sig.FRESHNESS_SECONDS,
                 probation: float = PROBATION_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.freshness = freshness
        self.probation = probation
        self.clock = clock
        self.on_clone: Callable[[str, str, str], None] | None = None  # (agent id, old, new instance)
        self.on_release: Callable[[str], None] | None = None  # (agent id): apply its held report
        self.on_refused: Callable[[str, str, str], None] | None = None  # (agent id, reason, client address)
        self._refusal_reported: dict[str, float] = {}  # agent id -> when last reported (once a minute)
        self._held: dict[str, str] = {}  # agent id -> instance whose report waits for its probation
        self._keys: dict[str, Ed25519PublicKey | None] = {}
        self._seen: dict[str, _AgentSeen] = {}
        self._lock = threading.Lock()
        self.sessions_table = SessionTable(lambda: self.clock())  # (a test may swap the clock)
        self._unproven: dict[str, tuple[float, str]] = {}  # agent id -> (report after, client): unknown session
        self._next_sweep = 0.0

    # ---- keys -------------------------------------------------------------------------
    def set_key(self, agent_id: str, public_key: str | None) -> None:
        key = sig.parse_public_key(public_key) if public_key else None
        with self._lock:
            self._keys[agent_id] = key
        self.sessions_table.drop_agent(agent_id)  # bound to the old key

    def forget(self, agent_id: str) -> None:
        with self._lock:
            self._keys.pop(agent_id, None)
            self._seen.pop(agent_id, None)
            self._held.pop(agent_id, None)
        self.sessions_table.drop_agent(agent_id)

    def _load(self, agent_id: str) -> Ed25519PublicKey | None:
        with self.sessions() as db:
            text = db.scalars(select(AgentRow.public_key).where(AgentRow.id == agent_id)).first()
        key = sig.parse_public_key(text) if text else None
        with self._lock:
            return self._keys.setdefault(agent_id, key)

    async def key_of(self, agent_id: str) -> Ed25519PublicKey | None:
        with self._lock:
            if agent_id in self._keys:
                return self._keys[agent_id]
        return await run_in_threadpool(self._load, agent_id)

    def has_key(self, agent_id: str) -> bool:
        with self._lock:
            return self._keys.get(agent_id) is not None

    # ---- the check ----------------------------------------------------------------------
    async def check(self, request: Request, principal: Principal,
                    client_host: Callable[[Request], str] | None = None) -> None:
        """Refuse (401) an agent request that is not proven by the agent's key (its signature, or
        the MAC of a session opened with a signature), stale or replayed. Sets
        ``request.state.agent_proof`` to "signature", "session" or "token" (an agent without a key)."""
        agent_id = principal.agent_id
        key = await self.key_of(agent_id)
        if key is None:
            request.state.agent_proof = "token"
            return  # enrolled before keys: token only, until the agent binds a key
        headers = {k.lower(): v for k, v in request.headers.items()}
        now = self.clock()
        if now >= self._next_sweep:
            await self._sweep_unproven(now)
        try:
            proof = sess.read_proof(agent_id, request.method, request_target(request), headers)
            fields = proof.fields
            if abs(now - fields.timestamp) > self.freshness:
                raise sig.SignatureError(f"request time {fields.timestamp} is more than {self.freshness:.0f} s "
                                         f"from the controller's clock ({now:.0f}); check the host's clock")
            body = await request.body()
            if proof.signature is not None:
                sig.verify(key, fields, body, proof.signature)
            else:
                self.sessions_table.check(agent_id, key, proof, body)
        except UnknownSessionError:
            # routine (a restart, another replica, an expiry): the agent signs its retry at once. Only a
            # token without a signed request following within the grace is a refusal to report
            self._await_proof(agent_id, request, client_host, now)
            raise
        except sig.SignatureError as exc:
            # the right token without a valid proof: a copied token (or a broken clock) - tell the admin
            await self._refused(agent_id, str(exc), request, client_host)
            raise NotAuthenticatedError(str(exc)) from None
        request.state.agent_proof = "signature" if proof.signature is not None else "session"
        clone = self._remember(agent_id, fields.nonce, fields.instance, now)  # (a replay raises here)
        if self._unproven:
            with self._lock:
                self._unproven.pop(agent_id, None)  # proven now: its unknown session was a routine one
        if clone is not None:
            self.sessions_table.drop_agent(agent_id)  # quarantined: its next requests are signed again
            if self.on_clone is not None:
                await run_in_threadpool(self.on_clone, agent_id, clone, fields.instance)
        elif self._release_due(agent_id, fields.instance, now) and self.on_release is not None:
            await run_in_threadpool(self.on_release, agent_id)

    async def _refused(self, agent_id: str, reason: str, request: Request,
                       client_host: Callable[[Request], str] | None) -> None:
        if self._refusal_due(agent_id) and self.on_refused is not None:
            client = client_host(request) if client_host else request.client.host if request.client else "?"
            await run_in_threadpool(self.on_refused, agent_id, reason, client)

    def _await_proof(self, agent_id: str, request: Request, client_host: Callable[[Request], str] | None,
                     now: float) -> None:
        client = client_host(request) if client_host else request.client.host if request.client else "?"
        with self._lock:
            if agent_id not in self._unproven and len(self._unproven) < MAX_UNPROVEN:
                self._unproven[agent_id] = (now + UNPROVEN_GRACE, client)

    async def _sweep_unproven(self, now: float) -> None:
        """Report the agents whose unknown-session refusal no signed request followed (a token
        without the key, trying session ids)."""
        with self._lock:
            self._next_sweep = now + 1.0
            due = [(a, c) for a, (deadline, c) in self._unproven.items() if deadline <= now]
            for agent_id, _client in due:
                del self._unproven[agent_id]
        for agent_id, client in due:
            if self._refusal_due(agent_id) and self.on_refused is not None:
                reason = f"an unknown session, and no signed request within {UNPROVEN_GRACE:.0f} s"
                await run_in_threadpool(self.on_refused, agent_id, reason, client)

    # ---- sessions -----------------------------------------------------------------------
    async def open_session(self, request: Request, agent_id: str, exchange_key: str) -> Opened:
        """``POST .../session``: only on a request this ring verified as Ed25519-signed."""
        proof = getattr(request.state, "agent_proof", None)
        if proof == "token":
            raise AuthError("this agent has no key to bind a session to; it authenticates with its token")
        if proof != "signature":
            raise SignatureRequiredError("a session is opened by an Ed25519-signed request, not on a session")
        key = await self.key_of(agent_id)
        if key is None:
            raise AuthError("this agent has no key to bind a session to")
        instance = request.headers.get(sig.INSTANCE_HEADER, "")
        try:
            return self.sessions_table.open(agent_id, instance, key, sig.public_key_text(key), exchange_key)
        except sig.SignatureError as exc:
            raise ValidationError([Issue("api", 0, "public_key", str(exc))]) from None

    def drop_sessions(self, agent_id: str) -> None:
        self.sessions_table.drop_agent(agent_id)

    def _refusal_due(self, agent_id: str) -> bool:
        now = self.clock()
        with self._lock:
            if now - self._refusal_reported.get(agent_id, -1e18) < 60:
                return False
            self._refusal_reported[agent_id] = now
            return True

    # ---- probation ---------------------------------------------------------------------
    def on_probation(self, agent_id: str, instance: str) -> bool:
        """True while ``instance`` has not yet spoken alone for ``probation`` seconds after taking
        over from an instance heard shortly before (its address changes are then held)."""
        now = self.clock()
        with self._lock:
            seen = self._seen.get(agent_id)
            return (seen is not None and instance == seen.instance and seen.gap is not None
                    and seen.gap < self.probation and now < seen.took_over_at + self.probation)

    def hold(self, agent_id: str, instance: str) -> None:
        with self._lock:
            self._held[agent_id] = instance

    def _release_due(self, agent_id: str, instance: str, now: float) -> bool:
        with self._lock:
            if self._held.get(agent_id) != instance:
                return False
            seen = self._seen.get(agent_id)
            if seen is None or seen.instance != instance or now < seen.took_over_at + self.probation:
                return False
            del self._held[agent_id]
            return True

    def _remember(self, agent_id: str, nonce: str, instance: str, now: float) -> str | None:
        """Record a verified request; :class:`NotAuthenticatedError` for a replay. Returns the
        instance this one displaced if it had itself been displaced before (two processes)."""
        with self._lock:
            seen = self._seen.setdefault(agent_id, _AgentSeen())
            while seen.nonces:
                first, until = next(iter(seen.nonces.items()))
                if until > now:
                    break
                del seen.nonces[first]
            if nonce in seen.nonces:
                raise NotAuthenticatedError("replayed request (nonce already used)")
            if len(seen.nonces) >= MAX_NONCES_PER_AGENT:
                raise NotAuthenticatedError("too many requests in the freshness window")
            seen.nonces[nonce] = now + 2 * self.freshness
            last, seen.last_at = seen.last_at, now
            if instance == seen.instance:
                return None
            previous, seen.instance = seen.instance, instance
            seen.took_over_at, seen.gap = now, (now - last if previous else None)
            self._held.pop(agent_id, None)  # a held report belongs to the instance that sent it
            comeback = instance in seen.retired
            if previous:
                seen.retired.append(previous)
            if comeback and not seen.clone_reported:
                seen.clone_reported = True
                return previous
            return None

    def clear_clone(self, agent_id: str) -> None:
        """After an admin cleared the quarantine: report the next clone again."""
        with self._lock:
            seen = self._seen.get(agent_id)
            if seen is not None:
                seen.clone_reported = False
                seen.retired.clear()
