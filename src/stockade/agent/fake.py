"""An in-memory controller and a ``ControllerClient`` speaking to it, for tests.

:class:`FakeController` keeps what the real controller keeps for agents (activation codes,
agents and their tokens, per-workload policy revisions with a bounded
:class:`~stockade.compiler.delta.HostHistory` for deltas, acks, heartbeats, host reports,
events) and lets a test misbehave on purpose: go unreachable, answer with a malformed or
foreign policy, or move a revision backwards. Answers are encoded and decoded by the one wire
codec (:mod:`stockade.compiler.delta`), as the real controller and the HTTP client do.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.agent.host import HostReport
from stockade.agent.state import Credential
from stockade.agent.transport import (
    AgentEvent,
    ControllerUnreachableError,
    Enrollment,
    Heartbeat,
    LongPollAnswer,
    PolicyUpdate,
)
from stockade.agent_signature import public_key_text
from stockade.backends.base import Capability, VerifyReport, check_capabilities
from stockade.backends.setalgebra import apply_set_deltas
from stockade.compiler import host_policy_to_json
from stockade.compiler.delta import (
    HostHistory,
    Step,
    apply_peer_delta,
    delta_between,
    policy_update_from_dict,
    policy_update_to_dict,
)
from stockade.compiler.ir import HostDelta, HostPolicy, PeerDelta, SetDelta, WireGuardConfig
from stockade.errors import ApplyError, AuthError, NotFoundError


@dataclass
class FakeAgent:
    agent_id: str
    token: str
    workload: str
    acked: list[int] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    hosts: list[HostReport] = field(default_factory=list)
    events: list[AgentEvent] = field(default_factory=list)
    unenrolled: bool = False
    public_key: str | None = None
    wireguard_key: str | None = None  # the registered WireGuard public key


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` every 10 ms until true; False if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class FakeController:
    def __init__(self, *, deltas: bool = True, history: int = 4, inline: bool = False) -> None:
        self.cond = threading.Condition()
        self.inline = inline  # answer long-polls with the policy and take acks on them
        self.reachable = True
        self.deltas = deltas
        self.history = history
        self.codes: dict[str, str] = {}
        self.agents: dict[str, FakeAgent] = {}
        self.revisions: dict[str, int] = {}
        self.histories: dict[str, HostHistory] = {}
        self.override: dict[str, Any] | None = None  # next fetch answers this raw body, once
        self.announce: int | None = None  # long-poll answers this revision instead
        self.fetches: list[tuple[str, int | None]] = []

    # ---- test controls ------------------------------------------------------------------
    def add_code(self, code: str, workload: str) -> None:
        self.codes[code] = workload

    def publish(self, hp: HostPolicy, set_deltas: tuple[SetDelta, ...] | None = None) -> int:
        """A new revision of ``hp.workload``'s policy; wakes its long-polls.

        ``set_deltas``: the step from the previous revision as a compiler would give it
        (None: computed here, or a rules change); a wrong one reaches the agent as it is.
        """
        with self.cond:
            rev = self.revisions.get(hp.workload, 0) + 1
            self.revisions[hp.workload] = rev
            prev = self.histories.get(hp.workload)
            if prev is None:
                self.histories[hp.workload] = HostHistory.begin(rev, hp, self.history)
            else:
                step = set_deltas if set_deltas is not None else delta_between(prev.policy, hp)
                delta = HostDelta(hp.workload, hp, step is None, step or ())
                after = prev.after(delta, rev)
                if after is None:  # the same policy again: an empty step
                    after = HostHistory(rev, hp, (*prev.steps, Step(prev.revision, rev, ()))[-self.history :],
                                        self.history)
                self.histories[hp.workload] = after
            self.cond.notify_all()
            return rev

    def agent_for(self, workload: str) -> FakeAgent:
        for a in self.agents.values():
            if a.workload == workload and not a.unenrolled:
                return a
        raise KeyError(workload)

    def set_reachable(self, up: bool) -> None:
        with self.cond:
            self.reachable = up
            self.cond.notify_all()

    # ---- what the client calls ----------------------------------------------------------
    def _check_up(self) -> None:
        if not self.reachable:
            raise ControllerUnreachableError("fake controller is down")

    def agent(self, token: str | None) -> FakeAgent:
        self._check_up()
        for a in self.agents.values():
            if a.token == token and not a.unenrolled:
                return a
        raise AuthError("unknown or revoked agent token")

    def enroll(self, code: str, host: HostReport, public_key: str | None = None) -> Enrollment:
        self._check_up()
        workload = self.codes.get(code)
        if workload is None:
            raise AuthError("invalid activation code")
        a = FakeAgent(f"agent-{len(self.agents) + 1}", secrets.token_hex(16), workload, hosts=[host],
                      public_key=public_key)
        self.agents[a.agent_id] = a
        return Enrollment(a.agent_id, a.token, workload)

    def wait(self, workload: str, after: int, timeout: float, closed: threading.Event) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                self._check_up()
                rev = self.announce if self.announce is not None else self.revisions.get(workload, 0)
                remaining = deadline - time.monotonic()
                if rev > after or remaining <= 0 or closed.is_set():
                    return rev
                self.cond.wait(min(remaining, 0.05))

    def fetch(self, workload: str, since: int | None) -> PolicyUpdate:
        with self.cond:
            self._check_up()
            self.fetches.append((workload, since))
            if self.override is not None:
                raw, self.override = self.override, None
                return policy_update_from_dict(raw)
            hist = self.histories.get(workload)
            if hist is None:
                raise NotFoundError(f"no policy for {workload!r}")
            update = hist.update_since(since if self.deltas or since == hist.revision else None)
            return policy_update_from_dict(policy_update_to_dict(update))


class FakeControllerClient:
    """``ControllerClient`` over a :class:`FakeController` (same exceptions as the HTTP one)."""

    def __init__(self, controller: FakeController, url: str = "fake://controller", ca_pem: str | None = None) -> None:
        self.controller = controller
        self.url = url
        self.ca_pem = ca_pem
        self.token: str | None = None
        self.closed = threading.Event()
        self.reconnects = 0

    def enroll(self, activation_code: str, host: HostReport, public_key: str | None = None) -> Enrollment:
        return self.controller.enroll(activation_code, host, public_key)

    def use_credential(self, credential: Credential, ca_pem: str | None) -> None:
        self.token = credential.token
        self.ca_pem = ca_pem

    def report_host(self, host: HostReport) -> None:
        self.controller.agent(self.token).hosts.append(host)

    def heartbeat(self, beat: Heartbeat) -> None:
        self.controller.agent(self.token).heartbeats.append(beat)

    def wait_revision(self, after: int, timeout: float, applied: int | None = None) -> LongPollAnswer:
        a = self.controller.agent(self.token)
        ctl = self.controller
        if ctl.inline and applied is not None and (not a.acked or a.acked[-1] != applied):
            a.acked.append(applied)
        rev = ctl.wait(a.workload, after, timeout, self.closed)
        if not ctl.inline:
            return LongPollAnswer(rev)
        # A malformed answer (override) is left to the explicit fetch, as the HTTP client does.
        update = ctl.fetch(a.workload, after or None) if rev > after and ctl.override is None else None
        return LongPollAnswer(rev, update, inline=True)

    def fetch_policy(self, since: int | None) -> PolicyUpdate:
        a = self.controller.agent(self.token)
        return self.controller.fetch(a.workload, since)

    def ack(self, revision: int) -> None:
        self.controller.agent(self.token).acked.append(revision)

    def send_events(self, events: Sequence[AgentEvent]) -> None:
        self.controller.agent(self.token).events.extend(events)

    def unenroll(self) -> None:
        self.controller.agent(self.token).unenrolled = True

    def rotate_key(self, new_key: Ed25519PrivateKey) -> None:
        self.controller.agent(self.token).public_key = public_key_text(new_key)

    def register_wireguard_key(self, public_key: str, endpoint: str | None, port: int) -> None:
        self.controller.agent(self.token).wireguard_key = public_key

    def reconnect(self) -> None:
        self.reconnects += 1

    def close(self) -> None:
        self.closed.set()


# ---- an in-memory firewall ---------------------------------------------------------------


@dataclass(frozen=True)
class MemoryArtifact:
    policy: HostPolicy

    def to_text(self) -> str:
        return host_policy_to_json(self.policy)


class MemoryBackend:
    """A firewall that lives in a variable: what the agent applies is what ``read_back`` shows.

    ``installed`` can be edited by a test to simulate tampering; ``fail_apply`` makes the
    next applies raise :class:`ApplyError` (nothing changes, like an atomic kernel load).
    """

    name = "memory"

    def __init__(self, capabilities: frozenset[Capability] | None = None) -> None:
        self.capabilities = capabilities if capabilities is not None else frozenset(Capability)
        self.installed: HostPolicy | None = None
        self.tampered_text: str | None = None
        self.fail_apply = 0
        self.applies = 0
        self.deltas_applied = 0
        self.peer_deltas_applied = 0
        self.removes = 0
        self.lose_applies = False  # apply "succeeds" but the kernel keeps nothing: verify must notice
        self.datapath = "wireguard-go"  # what wireguard_datapath reports while a tunnel is in force

    def render(self, host_policy: HostPolicy) -> MemoryArtifact:
        check_capabilities(self.name, self.capabilities, host_policy)
        return MemoryArtifact(host_policy)

    def apply(self, artifact: MemoryArtifact) -> None:
        if self.fail_apply:
            self.fail_apply -= 1
            raise ApplyError("memory backend told to fail")
        self.applies += 1
        if self.lose_applies:
            self.installed = None
            return
        self.installed, self.tampered_text = artifact.policy, None

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        if self.installed is None:
            raise ApplyError("no table to apply a delta to")
        self.deltas_applied += 1
        self.installed = apply_set_deltas(self.installed, deltas)

    def wireguard_datapath(self) -> str:
        """The optional ``TunnelReporting`` capability: what a test says the tunnel runs on."""
        return self.datapath if self.installed is not None and self.installed.wireguard is not None else ""

    def apply_peer_delta(self, old: WireGuardConfig, delta: PeerDelta) -> None:
        """WireGuard peers only (the optional ``PeerUpdating`` capability); rules untouched."""
        if self.installed is None or self.installed.wireguard != old:
            raise ApplyError("peer delta for a tunnel that is not the one in force")
        self.peer_deltas_applied += 1
        self.installed = replace(self.installed, wireguard=apply_peer_delta(old, delta))

    def read_back(self) -> str:
        if self.tampered_text is not None:
            return self.tampered_text
        return host_policy_to_json(self.installed) if self.installed is not None else ""

    def verify(self, artifact: MemoryArtifact) -> VerifyReport:
        if self.installed != artifact.policy or self.tampered_text is not None:
            return VerifyReport(("installed policy differs from the artifact",))
        return VerifyReport(())

    def remove(self) -> None:
        self.removes += 1
        self.installed, self.tampered_text = None, None
