"""The hot HTTP path's shortcuts give what the slow ways gave (issue 18).

* a plain query is split without ``parse_qsl``'s unquoting: the same pairs as ``parse_qsl`` for
  every text (a property test over the characters that matter);
* request ids come from a pool of ``os.urandom`` bytes: the same shape, never repeated, and a
  forked child never hands out its parent's next ids;
* request metrics keep each series' child: the same samples as ``labels()`` every time;
* body limits are looked up by method: the same limit as the table's first match;
* a revision is read without a regex, the advertised hold encoded once: the same values.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import parse_qsl

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from stockade.controller import access_log, limits
from stockade.controller.api import agents, hot
from stockade.controller.api.hot import query_pairs
from stockade.controller.metrics import Metrics

QUERY_CHARS = st.sampled_from([*"ab0=&;%+ 2F0a\x00é", "%41", "%2", "%zz", "%00", "%C3%A9", "&&", "=="])


@settings(max_examples=2000, deadline=None)
@given(st.lists(QUERY_CHARS, max_size=24).map("".join))
def test_a_plain_query_splits_as_parse_qsl_reads_it(text: str) -> None:
    assert query_pairs(text) == parse_qsl(text, keep_blank_values=True)


def test_the_agents_queries_take_the_plain_way() -> None:
    got = query_pairs("after=12&applied=12&timeout=30&include_policy=true&x&=v&a=b=c&&")
    assert got == parse_qsl("after=12&applied=12&timeout=30&include_policy=true&x&=v&a=b=c&&", keep_blank_values=True)
    assert query_pairs("a=%41+b") == [("a", "A b")]  # (the slow way: unquoted)


def test_fresh_request_ids_are_random_hex_and_never_repeat() -> None:
    ids = [access_log.fresh_id() for _ in range(5 * access_log.fresh_id.POOL + 3)]  # across refills
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert access_log.request_id_for(b"bad id!") not in ids
    assert access_log.request_id_for(b"proxy-id_1") == "proxy-id_1"


def test_a_forked_child_does_not_reuse_the_parents_next_ids() -> None:
    access_log.fresh_id()  # a pool with ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id
        try:
            os.write(write, access_log.fresh_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert status == 0 and re.fullmatch(r"[0-9a-f]{16}", child)
    assert child != access_log.fresh_id()


class _Route:
    def __init__(self, path: str) -> None:
        self.path = path


def _samples(registry: CollectorRegistry) -> list[tuple[str, list[tuple[str, str]], float]]:
    return sorted((s.name, sorted(s.labels.items()), s.value) for m in registry.collect() for s in m.samples
                  if s.name.startswith("stockade_http") and not s.name.endswith("_created"))


def test_request_metrics_count_as_labels_did() -> None:
    metrics = Metrics()
    registry = CollectorRegistry()
    requests = Counter("stockade_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("stockade_http_request_seconds", "HTTP request latency (long-polls excluded)",
                        ["method", "route"], registry=registry)
    seen: list[tuple[dict[str, Any], int, float]] = [
        ({"method": "POST", "route": _Route("/agents/{agent_id}/ack")}, 204, 0.001),
        ({"method": "POST", "route": _Route("/agents/{agent_id}/ack")}, 204, 0.2),
        ({"method": "POST", "route": _Route("/agents/{agent_id}/ack")}, 401, 0.003),
        ({"method": "GET", "route": _Route("/agents/{agent_id}/policy/wait")}, 200, 30.0),
        ({"method": "GET"}, 404, 0.0005),
        ({"method": "GET", "route": _Route("/agents/{agent_id}/policy/wait")}, 200, 1.0),
    ]
    for scope, status, seconds in seen:
        metrics.count_request(scope, status, seconds)
        template = getattr(scope.get("route"), "path", "unmatched")
        requests.labels(scope["method"], template, str(status)).inc()  # (what count_request did)
        if not template.endswith("/wait"):
            latency.labels(scope["method"], template).observe(seconds)
    assert _samples(metrics.registry) == _samples(registry)


def test_body_limits_by_method_are_the_tables_first_match() -> None:
    def first_match(method: str, path: str) -> int:
        for b in limits.BODY_LIMITS:  # (the table's linear scan, as body_limit was)
            if b.method == method and limits._compile(b.template).match(path):
                return b.limit
        return limits.DEFAULT_LIMIT

    paths = [limits.API + b.template.replace("{agent_id}", "a1").replace("{name}", "n") for b in limits.BODY_LIMITS]
    paths += [p + "/x" for p in paths] + [limits.API + "/agents/a1/ack", "/metrics", "/"]
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "post"):
        for path in paths:
            assert limits.body_limit(method, path) == first_match(method, path), (method, path)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from([*"0123456789", "²", "٣", "१", "-", "+", " ", "a", "."]), max_size=12))
def test_a_revision_is_read_as_the_decimal_pattern_reads_it(text: str) -> None:
    by_pattern = int(text) if hot._DECIMAL.fullmatch(text) and int(text) <= hot.REVISION_MAX else None
    assert hot._revision(text) == by_pattern


def test_the_advertised_hold_is_written_as_json_writes_it() -> None:
    for value in (120.0, 120, 37.25, 1e-3, 1e22, 0.1 + 0.2):
        assert agents._json_number(value) == json.dumps(value)
    assert agents._json_number(120) == "120" and agents._json_number(120.0) == "120.0"  # (typed: not one key)
