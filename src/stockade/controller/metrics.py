"""Prometheus metrics of one controller process (its own registry, served at ``/metrics``).

Request counts and latency per route template: :meth:`Metrics.count_request`, called by
:class:`stockade.controller.edge.Edge` for every request (cheap enough for thousands of long-polls).
Agent and convergence gauges are computed at scrape time from the
:class:`~stockade.controller.services.distribution.PolicyDistributor`; policy-version and database
gauges from a query at scrape time; flow ingestion is counted per upload.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Scope

from stockade.controller.services.distribution import PolicyDistributor


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stockade_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "stockade_http_request_seconds",
            "HTTP request latency (long-polls excluded)",
            ["method", "route"],
            registry=self.registry,
        )
        self.compile_seconds = Histogram(
            "stockade_compile_seconds", "incremental compile time per change", registry=self.registry
        )
        self.bumps = Counter("stockade_host_revision_bumps", "per-host revision bumps", registry=self.registry)
        self.waiting = Gauge("stockade_agents_waiting", "agents holding a policy long-poll", registry=self.registry)
        self.flow_records = Counter("stockade_flow_records_ingested", "flow summaries accepted from agents",
                                    registry=self.registry)
        # each (method, template, status)'s counter and timer, found once: ``labels()`` validates and
        # locks on every call, for every request of every agent (issue 18)
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram | None]] = {}

    def count_request(self, scope: Scope, status: int, seconds: float) -> None:
        """Count a finished request by method, route template and status; time it unless a long-poll."""
        template = getattr(scope.get("route"), "path", "unmatched")
        method = scope.get("method", "")
        key = (method, template, status)
        series = self._series.get(key)
        if series is None:  # (the registry keeps every child it made: this keeps no more of them)
            series = self._series[key] = (
                self.requests.labels(method, template, str(status)),
                None if template.endswith("/wait") else self.latency.labels(method, template))
        series[0].inc()
        if series[1] is not None:
            series[1].observe(seconds)

    def observe_compile(self, seconds: float, bumped: int) -> None:
        self.compile_seconds.observe(seconds)
        self.bumps.inc(bumped)

    def watch(self, dist: PolicyDistributor, offline_after: float) -> None:
        self.registry.register(_ConvergenceCollector(dist, offline_after))

    def watch_database(self, engine: Engine) -> None:
        self.registry.register(_DatabaseCollector(engine))


class _DatabaseCollector(Collector):
    """At scrape time: the active policy version, the draft's pending changes, a round trip to the
    database and its connection pool. A database that does not answer reports ``stockade_db_up 0``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        up, active, versions, ping = 0.0, 0.0, 0.0, float("nan")
        try:
            start = time.perf_counter()
            with self.engine.connect() as conn:
                row = conn.execute(text("SELECT count(*), coalesce(max(number), 0) FROM policy_versions")).one()
            ping = time.perf_counter() - start
            versions, active, up = float(row[0]), float(row[1]), 1.0
        except SQLAlchemyError:
            pass
        yield GaugeMetricFamily("stockade_db_up", "1 when the database answered the scrape's query", value=up)
        yield GaugeMetricFamily("stockade_db_query_seconds", "time of the scrape's database round trip", value=ping)
        yield GaugeMetricFamily("stockade_policy_active_version", "number of the newest provisioned version",
                                value=active)
        yield GaugeMetricFamily("stockade_policy_versions", "provisioned policy versions", value=versions)
        pool = self.engine.pool
        checked_out = getattr(pool, "checkedout", None)
        if callable(checked_out):
            yield GaugeMetricFamily("stockade_db_pool_checked_out", "database connections in use",
                                    value=float(checked_out()))


class _ConvergenceCollector(Collector):
    def __init__(self, dist: PolicyDistributor, offline_after: float) -> None:
        self.dist = dist
        self.offline_after = offline_after

    def collect(self) -> Iterator[Any]:
        now = time.time()
        agents = list(self.dist.agents.values())
        beats = [a.last_heartbeat.timestamp() for a in agents if a.last_heartbeat is not None]
        online = sum(1 for b in beats if now - b < self.offline_after)
        lagging = sum(1 for a in agents if a.applied < self.dist.revisions.get(a.workload, 0))
        yield GaugeMetricFamily("stockade_agents_enrolled", "enrolled, unrevoked agents", value=len(agents))
        yield GaugeMetricFamily("stockade_agents_online", "agents with a recent heartbeat", value=online)
        yield GaugeMetricFamily(
            "stockade_agents_lagging", "agents whose applied revision is behind the desired one", value=lagging
        )
        yield GaugeMetricFamily("stockade_hosts", "hosts with compiled policy", value=len(self.dist.revisions))
