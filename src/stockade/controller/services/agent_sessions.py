"""The agent request sessions one controller replica holds (:mod:`stockade.agent_session`).

A session's key K lives here and nowhere else: not in the database (another replica answers
"unknown session" and the agent signs, then opens a session there), not in a log, not in an
answer. The table is bounded - :data:`MAX_PER_AGENT` sessions per agent (one per agent HTTP
client: the policy client, the flow sender, a CLI command), :data:`MAX_SESSIONS` in all, the
oldest evicted first - and a session dies at its expiry, when the agent's key changes (K was
bound to the old key), and when the agent is revoked, forgotten or quarantined. An evicted or
dropped session costs the agent one refused request and one signed retry, nothing more.

A session is also bound to the agent process (instance) that opened it: a MAC from another
instance is refused like a bad signature, so the clone detection of
:class:`~stockade.controller.services.agent_keys.AgentKeyRing` sees each process's own proofs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from stockade import agent_session as sess
from stockade import agent_signature as sig
from stockade.controller.services.auth import NotAuthenticatedError

MAX_PER_AGENT = 4
MAX_SESSIONS = 200_000  # ~200 bytes each: 40 MB at most, 8 per agent at 25,000 agents


class UnknownSessionError(NotAuthenticatedError):
    """The session is not held by this replica (expired, dropped, or opened on another replica or
    before a restart): the agent signs the request again and opens a new session. Its class name
    is the answer's ``error`` (:data:`stockade.agent_session.UNKNOWN_SESSION`)."""


assert UnknownSessionError.__name__ == sess.UNKNOWN_SESSION


@dataclass(frozen=True)
class AgentSession:
    agent_id: str
    instance: str
    key: bytes = field(repr=False)  # K: never printed
    bound_to: object = field(repr=False)  # the agent's Ed25519 public key object it was derived under
    expires_at: float = 0.0


@dataclass(frozen=True)
class Opened:
    session: str
    public_key: str  # the replica's X25519 public key
    expires_in: int


class SessionTable:
    """Session id -> :class:`AgentSession`, bounded, in this process's memory only."""

    def __init__(self, clock: Callable[[], float], *, lifetime: float = sess.SESSION_SECONDS,
                 max_per_agent: int = MAX_PER_AGENT, max_sessions: int = MAX_SESSIONS) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.max_per_agent = max_per_agent
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, AgentSession] = OrderedDict()  # oldest first
        self._of_agent: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, agent_id: str, instance: str, agent_key: object, agent_key_text: str,
             agent_exchange_text: str) -> Opened:
        """Answer the agent's X25519 key with ours and keep K; ours is forgotten on return."""
        session_id = sess.new_session_id()
        own = sess.new_exchange_key()
        own_text = sess.exchange_public_text(own)
        key = sess.derive_session_key(own, agent_exchange_text, session_id=session_id, agent_id=agent_id,
                                      agent_key_text=agent_key_text, agent_exchange_text=agent_exchange_text,
                                      controller_exchange_text=own_text)
        del own
        entry = AgentSession(agent_id, instance, key, agent_key, self.clock() + self.lifetime)
        with self._lock:
            while self._by_id:  # the expired first (one lifetime for all: insertion order is expiry order)
                old_id, old = next(iter(self._by_id.items()))
                if old.expires_at > entry.expires_at - self.lifetime:
                    break
                del self._by_id[old_id]
                self._unlink(old.agent_id, old_id)
            ids = self._of_agent.setdefault(agent_id, [])
            while len(ids) >= self.max_per_agent:
                self._by_id.pop(ids.pop(0), None)
            while len(self._by_id) >= self.max_sessions:
                old_id, old = self._by_id.popitem(last=False)
                self._unlink(old.agent_id, old_id)
            self._by_id[session_id] = entry
            ids.append(session_id)
        return Opened(session_id, own_text, int(self.lifetime))

    def _unlink(self, agent_id: str, session_id: str) -> None:
        ids = self._of_agent.get(agent_id)
        if ids is not None:
            if session_id in ids:
                ids.remove(session_id)
            if not ids:
                del self._of_agent[agent_id]

    def drop_agent(self, agent_id: str) -> None:
        with self._lock:
            for session_id in self._of_agent.pop(agent_id, []):
                self._by_id.pop(session_id, None)

    def check(self, agent_id: str, agent_key: object, proof: sess.Proof, body: bytes) -> None:
        """:class:`UnknownSessionError` if this replica does not hold the session (any more);
        :class:`~stockade.agent_signature.SignatureError` if the MAC does not prove this request."""
        assert proof.session is not None
        now = self.clock()
        with self._lock:
            entry = self._by_id.get(proof.session)
            if entry is not None and (now >= entry.expires_at or entry.bound_to is not agent_key) \
                    and entry.agent_id == agent_id:
                del self._by_id[proof.session]  # expired, or made under a key the agent no longer has
                self._unlink(agent_id, proof.session)
                entry = None
        if entry is None:
            raise UnknownSessionError("unknown or expired session (another controller replica, a restart, or a "
                                      "changed key): sign the request and open a new session")
        if entry.agent_id != agent_id:
            raise sig.SignatureError("the session belongs to another agent")
        if entry.instance != proof.fields.instance:
            raise sig.SignatureError("the session belongs to another agent process (instance)")
        sess.check_mac(entry.key, proof, body)
