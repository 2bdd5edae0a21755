"""How the agent talks to the controller: a small ``ControllerClient`` protocol and its records.

Two implementations: :class:`stockade.agent.http.HttpControllerClient` (httpx, the
controller's CA pinned) and :class:`stockade.agent.fake.FakeControllerClient` (in memory,
for unit tests), after httpx's injected-transport design. The agent only ever sees
these frozen records and the exceptions below, never HTTP:

* :class:`ControllerUnreachableError` - connection refused, timeout, 5xx: retry later;
* :class:`~stockade.errors.AuthError` - the credential or activation code was refused;
* :class:`~stockade.errors.ValidationError` - the controller's answer is malformed
  (e.g. a HostPolicy that does not parse): the agent refuses it with an event;
* :class:`~stockade.errors.NotFoundError` - nothing compiled for this workload yet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.agent.host import HostReport
from stockade.agent.state import Credential
from stockade.compiler.ir import HostPolicy, SetDelta, host_policy_from_dict
from stockade.errors import Issue, StockadeError, ValidationError
from stockade.model.addresses import Family


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


class UpdateKind(Enum):
    FULL = "full"  # a complete HostPolicy
    DELTA = "delta"  # address-set member changes relative to ``base``
    UNCHANGED = "unchanged"  # the agent already holds this revision


@dataclass(frozen=True)
class PolicyUpdate:
    revision: int
    kind: UpdateKind
    policy: HostPolicy | None = None  # FULL only
    base: int | None = None  # DELTA only: the revision the deltas start from
    set_deltas: tuple[SetDelta, ...] = ()  # DELTA only


@dataclass(frozen=True)
class LongPollAnswer:
    revision: int
    update: PolicyUpdate | None = None  # the policy, sent along when it changed (inline controllers)
    inline: bool = False  # the controller sends policies with the answer and takes acks on the long-poll


class EventKind(Enum):
    """Agent events the controller records (audit log, UI)."""

    STARTED = "agent-started"  # with the revision enforced from the cache, if any
    TAMPER = "tamper"  # the firewall differed from what the agent applied; restored
    POLICY_REFUSED = "policy-refused"  # malformed, unsupported, backwards, wrong workload
    APPLY_FAILED = "apply-failed"  # the kernel refused; previous policy stays in force
    CACHE_UNUSABLE = "cache-unusable"  # the on-disk cache could not be read


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

    def reconnect(self) -> None:
        """Drop pooled connections (the host's addresses changed); later calls reconnect."""
        ...

    def close(self) -> None: ...


# ---- wire decoding shared by every implementation -----------------------------------------


def _malformed(field: str, message: str) -> ValidationError:
    return ValidationError([Issue("controller", 0, field, message)])


def set_delta_from_dict(d: Any) -> SetDelta:
    if not isinstance(d, dict):
        raise _malformed("set_deltas", "expected an object")
    try:
        return SetDelta(
            name=str(d["name"]),
            family=Family(int(d["family"])),
            added=tuple(ipaddress.ip_network(n) for n in d.get("added", ())),
            removed=tuple(ipaddress.ip_network(n) for n in d.get("removed", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed("set_deltas", f"bad set delta: {exc!r}") from exc


def policy_update_from_dict(d: Any) -> PolicyUpdate:
    """Decode the controller's policy answer; :class:`ValidationError` if it is malformed.

    Accepted shape: ``{"revision": N, "policy": {...}}`` (full),
    ``{"revision": N, "base": M, "set_deltas": [...]}`` (delta) or
    ``{"revision": N}`` with neither (unchanged).
    """
    if not isinstance(d, dict):
        raise _malformed("", "expected a JSON object")
    try:
        revision = int(d["revision"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed("revision", f"missing or not an integer: {exc!r}") from exc
    full = d.get("policy", d.get("full"))
    if full is not None:
        if not isinstance(full, dict):
            raise _malformed("policy", "expected an object")
        try:
            hp = host_policy_from_dict(full)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed("policy", f"not a HostPolicy: {exc!r}") from exc
        return PolicyUpdate(revision, UpdateKind.FULL, policy=hp)
    if d.get("base") is not None:
        deltas = d.get("set_deltas") or []
        if not isinstance(deltas, list):
            raise _malformed("set_deltas", "expected a list")
        try:
            base = int(d["base"])
        except (TypeError, ValueError) as exc:
            raise _malformed("base", "not an integer") from exc
        if base == revision and not deltas:
            return PolicyUpdate(revision, UpdateKind.UNCHANGED)
        parsed = tuple(set_delta_from_dict(x) for x in deltas)
        return PolicyUpdate(revision, UpdateKind.DELTA, base=base, set_deltas=parsed)
    return PolicyUpdate(revision, UpdateKind.UNCHANGED)
