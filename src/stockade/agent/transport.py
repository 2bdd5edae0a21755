"""How the agent talks to the controller: a small ``ControllerClient`` protocol and its records.

Two implementations: :class:`stockade.agent.http.HttpControllerClient` (httpx, the
controller's CA pinned) and :class:`stockade.agent.fake.FakeControllerClient` (in memory,
for unit tests), after httpx's injected-transport design. The agent only ever sees
these frozen records and the exceptions below, never HTTP:

* :class:`ControllerUnreachableError` - connection refused, timeout, 5xx: retry later;
* :class:`~stockade.errors.AuthError` - the credential or activation code was refused;
* :class:`~stockade.errors.ValidationError` - the controller's answer is malformed
  (e.g. a HostPolicy that does not parse): the agent refuses it with an event;
  answers are decoded by the one wire codec,
  :func:`stockade.compiler.delta.policy_update_from_dict` (re-exported here);
* :class:`~stockade.errors.NotFoundError` - nothing compiled for this workload yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.agent.host import HostReport
from stockade.agent.state import Credential
from stockade.compiler.delta import PolicyUpdate as PolicyUpdate  # the wire records, re-exported
from stockade.compiler.delta import UpdateKind as UpdateKind
from stockade.compiler.delta import policy_update_from_dict as policy_update_from_dict
from stockade.errors import StockadeError


class ControllerUnreachableError(StockadeError):
    """The controller did not answer usefully (network error, timeout, 5xx); try again later."""


@dataclass(frozen=True)
class Enrollment:
    """What enrolment returns: the agent's identity and, over TLS, the CA to pin from now on."""

    agent_id: str
    token: str
    workload: str
    ca_pem: str | None = None

    def __repr__(self) -> str:
        return f"Enrollment(agent_id={self.agent_id!r}, workload={self.workload!r})"


@dataclass(frozen=True)
class LongPollAnswer:
    revision: int
    update: PolicyUpdate | None = None  # the policy, sent along when it changed (inline controllers)
    inline: bool = False  # the controller sends policies with the answer and takes acks on the long-poll
    heartbeat: bool = False  # the controller counted the long-poll as this agent's heartbeat
    hold: float | None = None  # the hold the controller advertises for the next long-poll (seconds)


class EventKind(Enum):
    """Agent events the controller records (audit log, UI)."""

    STARTED = "agent-started"  # with the revision enforced from the cache, if any
    TAMPER = "tamper"  # the firewall differed from what the agent applied; restored
    POLICY_REFUSED = "policy-refused"  # malformed, unsupported, backwards, wrong workload
    APPLY_FAILED = "apply-failed"  # the kernel refused; previous policy stays in force
    CACHE_UNUSABLE = "cache-unusable"  # the on-disk cache could not be read
    PROVEN = "proven"  # the kernel gives every packet the policy's verdict (stockade.verify)
    PROOF_DIFFERS = "proof-differs"  # a packet the kernel treats otherwise than the policy
    PROOF_FAILED = "proof-failed"  # the read-back could not be proven (unmodelled construct, read error)
    BACKEND_SWITCHED = "backend-switched"  # the controller's backend setting is in force (make-before-break)
    BACKEND_SWITCH_FAILED = "backend-switch-failed"  # it could not be: the old backend stays in force
    WIREGUARD_DATAPATH = "wireguard-datapath"  # "WireGuard datapath: kernel | wireguard-go" (when it changes)


@dataclass(frozen=True)
class AgentEvent:
    kind: EventKind
    detail: str
    revision: int | None = None
    time: float = 0.0  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "detail": self.detail, "revision": self.revision, "time": self.time}


@dataclass(frozen=True)
class Heartbeat:
    applied_revision: int
    mode: str  # enforcement mode in force ("" before any policy)
    tamper_count: int = 0
    backend: str = ""  # the backend in force
    backends: tuple[str, ...] = ()  # the backends this agent can enforce with (the controller refuses others)


class ControllerClient(Protocol):
    """The agent's whole conversation with the controller."""

    def enroll(self, activation_code: str, host: HostReport, public_key: str | None = None) -> Enrollment:
        """Trade an activation code (and the public half of the host key) for an identity.
        Raises AuthError for a bad code."""
        ...

    def use_credential(self, credential: Credential, ca_pem: str | None) -> None:
        """Authenticate every later call with ``credential``; pin ``ca_pem`` if given."""
        ...

    def report_host(self, host: HostReport) -> None: ...

    def heartbeat(self, beat: Heartbeat) -> None: ...

    def wait_revision(self, after: int, timeout: float, applied: int | None = None) -> LongPollAnswer:
        """Long-poll: the host's revision as soon as it exceeds ``after``, else the current one.

        ``applied`` acknowledges that revision on the way (controllers that take acks there
        say so with ``LongPollAnswer.inline``); such controllers also send the policy update
        relative to ``after`` with the answer, saving the fetch.
        """
        ...

    def fetch_policy(self, since: int | None) -> PolicyUpdate:
        """The policy at the current revision: full, or a delta from ``since`` when possible."""
        ...

    def ack(self, revision: int) -> None: ...

    def send_events(self, events: Sequence[AgentEvent]) -> None: ...

    def unenroll(self) -> None:
        """Tell the controller this agent is gone; its credential stops working."""
        ...

    def rotate_key(self, new_key: Ed25519PrivateKey) -> None:
        """Have the controller accept ``new_key`` for this agent (this call is signed with the
        current key; the new key signs a proof). Enrolled before keys: binds the first key."""
        ...

    def register_wireguard_key(self, public_key: str, endpoint: str | None, port: int) -> None:
        """Register this workload's WireGuard public key (the private key stays on the host)."""
        ...

    def reconnect(self) -> None:
        """Drop pooled connections (the host's addresses changed); later calls reconnect."""
        ...

    def close(self) -> None: ...


FIRST_POLL_SECONDS = 20.0  # the long-poll timeout until the controller advertises a hold
POLL_JITTER = 0.25  # a followed hold is shortened by up to this fraction, at random


def poll_timeout(own: float | None, advertised: float | None, draw: float) -> float:
    """The next long-poll's timeout: the controller's advertised hold, capped at ``own`` (the
    operator's ``--long-poll``; None: no cap of its own), shortened by ``draw * POLL_JITTER`` of
    itself (``draw`` uniform in [0, 1)) so a fleet answered at once by a change does not renew all
    at once again a hold later. Before any advertisement: ``own``, else :data:`FIRST_POLL_SECONDS`."""
    if advertised is None:
        return own if own is not None else FIRST_POLL_SECONDS
    hold = advertised if own is None else min(own, advertised)
    return hold * (1.0 - POLL_JITTER * draw)
