"""An agent given several controller replicas: a request its replica cannot answer goes to the next.

The real :class:`HttpControllerClient` and :class:`HttpFlowSender` over an in-memory transport that
plays three replicas (by host name); the multi-replica behaviour against real controller processes
is in ``tests/replicas``.
"""

from __future__ import annotations

import httpx
import pytest

from stockade.agent.flows import HttpFlowSender
from stockade.agent.http_client import HttpControllerClient, controller_urls
from stockade.agent.state import Credential
from stockade.agent.transport import ControllerUnreachableError
from stockade.errors import AuthError, ValidationError
from stockade.visibility.wire import FlowBatch

URLS = "http://a:8443, http://b:8443/ ,http://c:8443"
CRED = Credential(URLS, "a1b2", "agt_a1b2_secret", "web1")


class Replicas:
    """Answers as the replicas named in ``up``; ``down`` refuse connections; ``sick`` answer 503."""

    def __init__(self, down: set[str], sick: set[str] | None = None) -> None:
        self.down, self.sick = down, sick or set()
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.seen.append(host)
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if host in self.sick:
            return httpx.Response(503, json={"message": "database unavailable"})
        if request.url.path.endswith("/policy/wait"):
            return httpx.Response(200, json={"revision": 7, "changed": True, "policy": None})
        if request.url.path.endswith("/flows"):
            return httpx.Response(204)
        return httpx.Response(401, json={"message": "unknown agent token"})


def _client(rep: Replicas) -> HttpControllerClient:
    c = HttpControllerClient(URLS, transport=httpx.MockTransport(rep))
    c.use_credential(CRED, None)
    return c


def test_urls_are_split_and_trimmed() -> None:
    assert controller_urls(URLS) == ["http://a:8443", "http://b:8443", "http://c:8443"]
    assert controller_urls(["http://x/"]) == ["http://x"]
    with pytest.raises(ValidationError):
        controller_urls(" , ")


def test_unreachable_replica_is_skipped_and_the_answering_one_kept() -> None:
    rep = Replicas(down={"a"}, sick={"b"})
    c = _client(rep)
    assert c.wait_revision(3, 1.0).revision == 7
    assert rep.seen == ["a", "b", "c"]  # refused, 503, answered
    assert c.base_url == "http://c:8443"
    c.wait_revision(3, 1.0)
    assert rep.seen[-1] == "c"  # stays with the replica that answers


def test_every_replica_down_is_unreachable_and_refusals_are_not_retried() -> None:
    c = _client(Replicas(down={"a", "b", "c"}))
    with pytest.raises(ControllerUnreachableError):
        c.wait_revision(3, 1.0)
    rep = Replicas(down=set())
    c = _client(rep)
    with pytest.raises(AuthError):  # a refusal is an answer: not sent to the other replicas
        c.ack(3)
    assert rep.seen == ["a"]


def test_flow_uploads_fail_over_too() -> None:
    rep = Replicas(down={"a"})
    sender = HttpFlowSender(CRED, transport=httpx.MockTransport(rep))
    sender.send(FlowBatch(sent_at=0.0, dropped=0, records=()))
    assert rep.seen == ["a", "b"]
    sender.close()
