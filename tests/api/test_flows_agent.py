"""The agent's uploader against the real controller app: back-pressure while the controller is down.

The agent's :class:`HttpFlowSender` speaks HTTP to the app through the test client's transport,
wrapped in a switch that makes the controller unreachable (connection refused) on demand.
"""

from __future__ import annotations

import ipaddress
import time

import httpx
from tests.api.conftest import Api
from tests.api.test_flows import agent_for, load_estate

from stockade.agent.flows import FlowCollector, HttpFlowSender
from stockade.agent.nflog import LoggedPacket
from stockade.agent.state import Credential
from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.model import Proto
from stockade.visibility import FlowKey


class Switch(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.up = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)


def packets(n: int, t: float) -> list[LoggedPacket]:
    src = ipaddress.ip_address("10.70.0.11")
    return [LoggedPacket(FlowKey(src, ipaddress.ip_address(f"198.51.100.{i % 250}"), Proto.TCP, 2000 + i),
                         Direction.OUTBOUND, Verdict.POTENTIALLY_BLOCKED, "default", t) for i in range(n)]


def test_controller_down_bounded_buffer_dropped_count_then_upload(api: Api) -> None:
    load_estate(api)
    agent_id, headers = agent_for(api, "web-prod-1")
    token = headers["Authorization"].removeprefix("Bearer ")
    switch = Switch(api.client._transport)  # the app, in process
    sender = HttpFlowSender(Credential("http://testserver", agent_id, token, "web-prod-1"), transport=switch)
    collector = FlowCollector(sender, group=0, batch_size=20, max_entries=50)

    switch.up = False
    collector.record(packets(120, time.time() - 5))
    assert collector.upload_pending() > 0
    assert len(collector.buffer) == 50 and collector.dropped == 70
    assert api.ok("GET", "/flows")["items"] == []

    switch.up = True
    assert collector.upload_pending() == 0
    assert collector.uploaded == 50 and collector.batches == 3
    ports: list[int] = []
    cursor = None
    while True:
        page = api.ok("GET", "/flows", params={"src_workload": "web-prod-1", "limit": 30,
                                                **({"cursor": cursor} if cursor else {})})
        ports += [i["port"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(ports) == list(range(2000, 2050))
    (stats,) = api.ok("GET", "/flows/stats")
    assert (stats["records"], stats["dropped"]) == (50, 70)

    # a revoked agent's uploads are refused, counted as dropped, and stop being retried
    api.ok("POST", f"/agents/{agent_id}/revoke", 204)
    collector.record(packets(5, time.time()))
    collector.upload_pending()
    assert collector.refused == 5 and collector.dropped == 75
    sender.close()
