"""The controller application: settings, wiring, the auth dependency and the error mapping.

:func:`create_app` migrates the database, bootstraps the first owner, loads the compiled
policy service and returns the FastAPI app (OpenAPI at ``/api/v1/openapi.json``). Errors of
the one exception tree become HTTP statuses here and only here::

    ValidationError -> 422 (with field-level issues)   NotFoundError -> 404
    StaleRevisionError -> 412   ConflictError -> 409   RateLimitedError -> 429
    NotAuthenticatedError -> 401   other AuthError -> 403   other StockadeError -> 400
    (database) IntegrityError from a lost race -> 409   OperationalError -> 503 + Retry-After

Every route depends on :func:`stockade.controller.context.require` with one permission.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import Receive, Scope, Send

from stockade import __version__
from stockade.controller.api import admin as admin_api
from stockade.controller.api import agents as agents_api
from stockade.controller.api import flows as flows_api
from stockade.controller.api import flows_policy as flows_policy_api
from stockade.controller.api import hot as hot_api
from stockade.controller.api import imports as imports_api
from stockade.controller.api import k8s_nodes as k8s_nodes_api
from stockade.controller.api import objects as objects_api
from stockade.controller.api import policy as policy_api
from stockade.controller.api import workload_batch as workload_batch_api
from stockade.controller.api.web_mount import mount_console
from stockade.controller.context import API, Controller, ControllerSettings
from stockade.controller.csrf import OriginCheck, parse_allowed_origins
from stockade.controller.edge import Edge, FastDispatch, ServerError
from stockade.controller.metrics import Metrics
from stockade.controller.services import auth, enrolment, replicas
from stockade.controller.services.agent_keys import AgentKeyRing
from stockade.controller.services.auth import RateLimiter
from stockade.controller.services.distribution import PolicyDistributor
from stockade.controller.services.events import SyslogForwarder
from stockade.controller.services.fanout_collector import FanoutCollector
from stockade.controller.services.shared_limits import SharedLoginThrottle, SharedRateLimiter
from stockade.controller.storage.db import make_engine, migrate, session_factory
from stockade.controller.storage.listen import ChangeListener, Leadership, libpq_url
from stockade.controller.storage.store import StaleRevisionError
from stockade.errors import AuthError, ConflictError, NotFoundError, StockadeError, ValidationError

log = logging.getLogger("stockade.controller")


# ---- error mapping ---------------------------------------------------------------------


def _status(exc: StockadeError) -> int:
    if isinstance(exc, ValidationError):
        return 422
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, StaleRevisionError):
        return 412
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, auth.RateLimitedError):
        return 429
    if isinstance(exc, auth.NotAuthenticatedError):
        return 401
    if isinstance(exc, AuthError):
        return 403
    return 400


def error_body(kind: str, message: str, issues: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"error": kind, "message": message, "issues": issues or []}


async def _stockade_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StockadeError)
    status = _status(exc)
    issues = [{"field": i.field, "message": i.message} for i in exc.issues] if isinstance(exc, ValidationError) else []
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(type(exc).__name__, str(exc), issues), status_code=status, headers=headers)


async def _request_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    issues = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        issues.append({"field": ".".join(loc), "message": str(err.get("msg", "invalid"))})
    return JSONResponse(error_body("ValidationError", "invalid request", issues), status_code=422)


async def _integrity(_request: Request, exc: Exception) -> JSONResponse:
    """Two requests raced to create the same name or address: the loser gets a 409."""
    return JSONResponse(error_body("ConflictError", "conflicting concurrent change; retry"), status_code=409)


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return JSONResponse(error_body("Unavailable", "database busy or unreachable; retry"), status_code=503,
                        headers={"Retry-After": "1"})


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return JSONResponse(error_body("InternalError", "internal error"), status_code=500)


# ---- assembly ---------------------------------------------------------------------------


class ControllerApp(FastAPI):
    """The controller's FastAPI app, whose HTTP requests meet :class:`Edge` first.

    FastAPI wraps every request in layers of its own before any middleware of ours: its native
    OpenTelemetry check (switched off here: see :func:`create_app`), Starlette's application call,
    its 500 layer (``ServerErrorMiddleware``, a ``send`` wrapper per request), FastAPI's exception
    telemetry and its app-wide body limit (none is set: the edge keeps the limits). On a replica
    following 25,000 agents they cost a hot request more than the edge's own work (issue 18).
    Here an HTTP request goes straight to the edge, which then calls the rest of the framework's
    stack (its exception handlers, the router) for every request it does not serve itself, and
    answers an unhandled exception with the app's 500 as the outer layer did. Lifespan and
    websocket messages take the framework's path, as before.
    """

    _edge_parts: tuple[Metrics, OriginCheck, FastDispatch] | None = None
    _edge: Edge | None = None

    def serve_through_edge(self, metrics: Metrics, origins: OriginCheck, fast: FastDispatch) -> None:
        """Make the edge the outermost layer (built at the first request, when the routes are in)."""
        self._edge_parts = (metrics, origins, fast)
        self._edge = None

    def _build_edge(self, parts: tuple[Metrics, OriginCheck, FastDispatch]) -> Edge:
        if self.debug:  # the framework's debug page is not served by the edge's 500
            raise RuntimeError("the controller app does not run in debug mode")
        if self.middleware_stack is None:  # (what a first request builds; add_middleware refuses from now on)
            self.middleware_stack = self.build_middleware_stack()
        stack = self.build_middleware_stack()
        if not isinstance(stack, ServerErrorMiddleware):
            raise RuntimeError(f"unexpected outermost framework layer {type(stack).__name__}")
        metrics, origins, fast = parts
        # below the 500 layer: exception telemetry (inert: switched off), the body limit (none set),
        # the exception handlers and the router, for every request the fast dispatch leaves
        if stack.handler is None:  # (create_app registers _unexpected)
            raise RuntimeError("the controller app has no handler for unexpected errors")
        self._edge = Edge(stack.app, metrics=metrics, origins=origins, fast=fast,
                          server_error=cast(ServerError, stack.handler))
        return self._edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = self._edge_parts
        if scope["type"] == "http" and parts is not None and not self.root_path:
            edge = self._edge or self._build_edge(parts)
            scope["app"] = self
            await edge(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _flush_loop(ctl: Controller) -> None:
    rounds = 0
    while True:
        await asyncio.sleep(ctl.settings.flush_interval)
        rounds += 1
        try:
            # every third of offline_after: the agents whose polls this replica holds are heard from
            # now, and this flush writes it (one statement) for every replica's liveness check
            await ctl.presence.beat(ctl.dist.agent_heartbeat)
            await run_in_threadpool(ctl.dist.flush, ctl.settings.hash_delay)
            await run_in_threadpool(ctl.dist.refresh_agents)  # acks and heartbeats other replicas took
            if await run_in_threadpool(ctl.leads):  # singleton jobs: one replica at a time
                await run_in_threadpool(ctl.dist.check_liveness, ctl.settings.offline_after,
                                        ctl.settings.offline_grace)
                if ctl.leadership is not None and rounds % 60 == 0:
                    await run_in_threadpool(_shared_housekeeping, ctl)
        except Exception:  # keep flushing; the next round retries
            log.exception("flushing agent state failed")


def _shared_housekeeping(ctl: Controller) -> None:
    """The leader forgets old change rows, login failures and rate-limit hits."""
    with ctl.sessions.begin() as db:
        replicas.prune(db)
    for limiter in (ctl.login_throttle, ctl.login_limiter, ctl.enroll_limiter):
        if isinstance(limiter, (SharedLoginThrottle, SharedRateLimiter)):
            limiter.prune()


def build_controller(settings: ControllerSettings) -> Controller:
    engine = make_engine(settings.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    passwords = auth.Passwords(settings.argon2)
    try:
        with sessions.begin() as db:
            credential = auth.bootstrap_owner(db, passwords)
    except IntegrityError:  # another replica starting at the same moment made the first owner
        credential = None
    shared = engine.dialect.name == "postgresql"  # possibly several replicas on this database
    dist = PolicyDistributor(sessions, shared=shared)
    dist.load()
    agent_keys = AgentKeyRing(sessions)
    enrolment.attach(agent_keys, dist)  # clones quarantined, held reports released, refusals audited

    def forget_keys(agent_ids: list[str]) -> None:  # changed on another replica: re-read when next used
        for agent_id in agent_ids:
            agent_keys.forget(agent_id)

    dist.on_agents_changed = forget_keys
    metrics = Metrics()
    metrics.watch(dist, settings.offline_after)
    metrics.watch_database(engine)
    dist.on_compile = metrics.observe_compile
    forwarder = None
    if settings.syslog is not None:
        forwarder = SyslogForwarder(settings.syslog)
        forwarder.attach(sessions)
    limiters: tuple[RateLimiter | SharedRateLimiter, ...] = (
        (SharedRateLimiter(sessions, "login", *settings.login_limit),
         SharedRateLimiter(sessions, "enroll", *settings.enroll_limit)) if shared
        else (RateLimiter(*settings.login_limit), RateLimiter(*settings.enroll_limit)))
    return Controller(
        settings=settings,
        sessions=sessions,
        dist=dist,
        metrics=metrics,
        login_limiter=limiters[0],
        enroll_limiter=limiters[1],
        listener=ChangeListener(libpq_url(engine), dist.follow_changes) if shared else None,
        leadership=Leadership(libpq_url(engine)) if shared else None,
        passwords=passwords,
        agent_keys=agent_keys,
        first_run_credential=credential,
        engine=engine,
        forwarder=forwarder,
    )


# Young-generation collections between two full ones while the controller serves (CPython's default
# is 10). A full collection walks every tracked object not frozen, and a controller following 10,000
# pods holds enough of them for each one to stop the process for 60-100 ms: during pod churn the
# default ran about one per second (bench/k8s_fanout.py, 10,000 pods / 100 nodes), each a pause of
# every request in flight. Young collections, which free almost all cyclic garbage, are unchanged.
FULL_COLLECTION_AFTER = 100
# Net allocations between two young collections while the controller serves (CPython's default is
# 700). A global change at 10,000 agents ran ~1,200 young collections per replica, 2.8-3.6 s of
# pauses per four changes, and one full collection each (0.8-1.6 s); at 20,000: ~30 young ones,
# no full one, controller CPU per 1,000 agents per change 0.33 -> 0.25 (bench/controller.py
# --gc-gen0 700 20000, session 12). Short-lived request garbage is freed by reference counting
# either way; cyclic garbage waits for at most this many allocations (a few MiB).
YOUNG_COLLECTION_AFTER = 20_000


def create_app(settings: ControllerSettings) -> ControllerApp:
    ctl = build_controller(settings)

    running = [0]  # lifespans entered and not yet left: a nested one (a test tool's) starts nothing

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        running[0] += 1
        if running[0] > 1:
            try:
                yield
            finally:
                running[0] -= 1
            return
        ctl.dist.loop = asyncio.get_running_loop()
        collector = gc.get_threshold()
        gc.set_threshold(max(collector[0], YOUNG_COLLECTION_AFTER), collector[1],
                         max(collector[2], FULL_COLLECTION_AFTER))
        fanouts = ctl.dist.fanouts = FanoutCollector(ctl.dist.loop)
        ctl.tasks.append(asyncio.create_task(_flush_loop(ctl)))
        if ctl.listener is not None:
            ctl.listener.start()
        try:
            yield
        finally:
            running[0] -= 1
            for t in ctl.tasks:
                t.cancel()
            if ctl.listener is not None:
                await run_in_threadpool(ctl.listener.stop)
            if ctl.leadership is not None:
                ctl.leadership.close()
            ctl.dist.flush()
            if ctl.forwarder is not None:
                ctl.forwarder.close()
            ctl.engine.dispose()
            fanouts.close()
            ctl.dist.fanouts = None
            gc.set_threshold(*collector)

    app = ControllerApp(
        title="Stockade controller",
        version=__version__,
        openapi_url=f"{API}/openapi.json",
        docs_url=None,  # no Swagger UI: it loaded scripts from a CDN into this origin
        redoc_url=None,
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry off: no SDK is installed nor configured (so it recorded nothing),
        # the controller's metrics are its own (/metrics), and its check cost every request ~4 % of a
        # replica's CPU under 25,000 agents (issue 18)
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    app.state.controller = ctl
    app.add_exception_handler(StockadeError, _stockade_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(IntegrityError, _integrity)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
    # one layer, outermost (ControllerApp), in this order: request id + access log, security headers (refusals
    # included), body limits / NUL / UTF-8 before any route parses, metrics, the CSRF origin check (its 403s counted);
    # then the agent protocol's hot routes (api/hot.py: the same auth and handlers, no framework
    # routing), everything else and every doubt to the framework
    hot = hot_api.HotRoutes(app.exception_handlers)
    app.state.hot_routes = hot
    app.serve_through_edge(ctl.metrics, OriginCheck(ctl.proxies, parse_allowed_origins(settings.allowed_origins)),
                           hot)
    included: list[tuple[str, APIRouter]] = [
        # the agent protocol first: routes are matched one by one in this order, and every agent's
        # long-poll, ack and heartbeat would otherwise be tried against the ~100 operator routes
        # first (two thirds of a fan-out's per-request CPU); no operator path overlaps an agent path.
        # The node protocol next: every batch of pod churn wakes most nodes' long-polls, and each node
        # acks and polls again at once (two requests per node per batch, behind which the batch's answer
        # waited while each was tried against the operator routes)
        (API, agents_api.router),
        (API, k8s_nodes_api.router),
        (API, objects_api.router()),
        (API, policy_api.router),
        (API, imports_api.router),
        (API, workload_batch_api.router),
        (API, admin_api.router),
        (API, flows_api.router),
        (API, flows_policy_api.router),
        ("", admin_api.metrics_router),
    ]
    for prefix, router in included:
        app.include_router(router, prefix=prefix)
    app.state.routers = included  # walked by the authorisation-matrix test
    mount_console(app)  # the web console at / (a fallback: routes always win)
    return app
