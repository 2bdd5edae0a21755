"""What every route shares: the settings, the :class:`Controller` state and the auth dependency.

Every route depends on :func:`require` with one :class:`~stockade.controller.services.auth.Permission`;
agent tokens and request signatures are checked in memory, API keys and sessions in a worker
thread. The client's address (:meth:`Controller.client_host`) believes ``X-Forwarded-For`` only from
``ControllerSettings.trusted_proxies``; ``allowed_origins`` adds origins, besides the controller's
own, from which a browser session may change things (:mod:`stockade.controller.csrf`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from stockade.controller.csrf import parse_allowed_origins
from stockade.controller.forwarded import TrustedProxies
from stockade.controller.metrics import Metrics
from stockade.controller.services import auth, scope
from stockade.controller.services.agent_keys import AgentKeyRing
from stockade.controller.services.auth import (
    LockoutPolicy,
    LoginThrottle,
    Permission,
    Principal,
    PrincipalKind,
    RateLimiter,
)
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.events import SyslogForwarder, SyslogTarget
from stockade.controller.services.presence import HeldPolls
from stockade.controller.services.shared_limits import SharedLoginThrottle, SharedRateLimiter
from stockade.controller.storage.listen import ChangeListener, Leadership
from stockade.errors import Issue, ValidationError

API = "/api/v1"
AGENT_PRINCIPALS_KEPT = 200_000  # agents' principals kept (far above one replica's fleet; past it, made anew)


@dataclass(frozen=True)
class ControllerSettings:
    database_url: str
    offline_after: float = 90.0  # seconds without heartbeat before an agent counts as offline
    offline_grace: float | None = None  # then seconds before its addresses leave peers' sets (None: never)
    flush_interval: float = 2.0  # seconds between batched writes of acks and heartbeats
    # seconds after its bump a host's policy hash is written (services/policy_hashes.py): after
    # the fan-out, not in it; read only at start-up, so a crash before costs one more revision
    hash_delay: float = 5.0
    long_poll_max: float = 300.0  # the longest hold an agent may ask for
    # the hold advertised in every long-poll answer (the agent follows it, up to its own cap, with
    # jitter); a held poll is presence (services/presence.py), so it is not bound by offline_after
    long_poll_hold: float = 120.0
    secure_cookies: bool = True
    syslog: SyslogTarget | None = None
    login_limit: tuple[int, float] = (10, 60.0)  # attempts per window (seconds) per client
    enroll_limit: tuple[int, float] = (60, 60.0)
    argon2: auth.Argon2Params = field(default_factory=auth.Argon2Params)
    login_lockout: LockoutPolicy = field(default_factory=LockoutPolicy)  # per-account backoff
    trusted_proxies: tuple[str, ...] = ()  # IPs/CIDRs whose X-Forwarded-* headers are believed
    allowed_origins: tuple[str, ...] = ()  # extra origins (https://host:port) for cookie writes

    def __post_init__(self) -> None:
        TrustedProxies.parse(self.trusted_proxies)  # a bad entry fails here, naming the field
        if not 0 < self.long_poll_hold <= self.long_poll_max:
            raise ValidationError([Issue("settings", 0, "long_poll_hold",
                                         f"must be > 0 and <= long_poll_max ({self.long_poll_max:g})")])
        parse_allowed_origins(self.allowed_origins)

    @staticmethod
    def for_data_dir(data_dir: Path, **kwargs: Any) -> ControllerSettings:
        data_dir.mkdir(parents=True, exist_ok=True)
        return ControllerSettings(database_url=f"sqlite:///{data_dir / 'stockade.db'}", **kwargs)


@dataclass
class Controller:
    """Everything the routes share, reachable as ``request.app.state.controller``."""

    settings: ControllerSettings
    sessions: Any
    dist: PolicyDistributor
    metrics: Metrics
    login_limiter: RateLimiter | SharedRateLimiter
    enroll_limiter: RateLimiter | SharedRateLimiter
    passwords: auth.Passwords
    agent_keys: AgentKeyRing
    first_run_credential: tuple[str, str] | None = None
    engine: Any = None
    forwarder: SyslogForwarder | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    listener: ChangeListener | None = None  # PostgreSQL: follows the other replicas' changes
    leadership: Leadership | None = None  # PostgreSQL: who runs the singleton jobs (None: this process)
    proxies: TrustedProxies = field(init=False)
    login_throttle: LoginThrottle | SharedLoginThrottle = field(init=False)
    presence: HeldPolls = field(init=False)  # the long-polls this replica holds (presence)
    _agent_principals: dict[tuple[str, str], Principal] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.proxies = TrustedProxies.parse(self.settings.trusted_proxies)
        self.presence = HeldPolls(self.settings.offline_after / 3)
        if self.dist.shared:  # counted in the database, so a limit hit on one replica holds on all
            self.login_throttle = SharedLoginThrottle(self.sessions, self.settings.login_lockout)
        else:
            self.login_throttle = LoginThrottle(self.settings.login_lockout)

    def leads(self) -> bool:
        """Whether this replica runs the singleton jobs now (always on SQLite)."""
        return self.leadership is None or self.leadership.holds()

    def client_host(self, request: Request) -> str:
        """The client's address (``X-Forwarded-For`` counts only from a trusted proxy)."""
        return self.proxies.client_host(request.client.host if request.client else None, request.headers)

    def agent_principal(self, agent_id: str, secret: str) -> Principal | None:
        live = self.dist.agents.get(agent_id)
        if live is None and self.dist.shared:  # enrolled on another replica a moment ago
            live = self.dist.load_agent(agent_id)
        if live is None or not live.token_hash or live.token_hash != auth.sha256(secret):
            return None
        # the same frozen value every time this agent acts as this workload: made once, not per request
        key = (agent_id, live.workload)
        principal = self._agent_principals.get(key)
        if principal is None:
            if len(self._agent_principals) >= AGENT_PRINCIPALS_KEPT:
                self._agent_principals.clear()
            principal = self._agent_principals[key] = Principal(
                PrincipalKind.AGENT, f"agent:{agent_id}", None, agent_id=agent_id, workload=live.workload)
        return principal

    def session(self) -> Session:
        s: Session = self.sessions()
        return s


def controller_of(request: Request) -> Controller:
    ctl: Controller = request.app.state.controller
    return ctl


def require(permission: Permission) -> Callable[[Request], Awaitable[Principal]]:
    """The dependency every route declares: authenticate, then check ``permission``."""

    async def dependency(request: Request) -> Principal:
        ctl = controller_of(request)
        if permission is Permission.PUBLIC:
            return auth.ANONYMOUS
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer agt_"):
            principal = auth.authenticate(request, None, ctl.agent_principal)  # type: ignore[arg-type]
            await ctl.agent_keys.check(request, principal, ctl.client_host)  # signed on its host, fresh, once
        else:

            def lookup() -> Principal:
                with ctl.session() as db:
                    return auth.authenticate(request, db, ctl.agent_principal)

            principal = await run_in_threadpool(lookup)
        auth.authorize(principal, permission)
        route_path = getattr(request.scope.get("route"), "path", None)  # (the URL only when unrouted)
        scope.check_route(principal, permission, request.method, route_path or request.url.path)
        request.state.principal = principal
        return principal

    dependency.permission = permission  # type: ignore[attr-defined]
    return dependency
