"""The node poller's long-poll (k8s/node_poll.py): what a pod's arrival does to the long-poll out."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import cast

import pytest

from stockade.agent.agent import Agent
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.state import Credential
from stockade.k8s import node_poll
from stockade.k8s.node_poll import NodeAnswer, NodePoller


def _runtime() -> Agent:
    return cast(Agent, SimpleNamespace(applied_revision=0, refused_revision=0))


def _client(url: str) -> HttpControllerClient:
    client = HttpControllerClient(url)
    client.use_credential(Credential(url, "node-1", "token", "node-1"), None)
    return client


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_an_abandoned_long_poll_answering_later_leaves_the_one_out_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: every abandoned long-poll's end woke the poller, which abandoned the long-poll then
    out and sent another (naming every pod): a re-poll storm while pods came."""
    calls: list[threading.Event] = []

    def fake_poll(_client: HttpControllerClient, held: dict[str, int], _acks: dict[str, int],
                  _timeout: float) -> NodeAnswer:
        answer = threading.Event()
        calls.append(answer)
        answer.wait(10)
        return NodeAnswer((), ())

    monkeypatch.setattr(node_poll, "poll_pods", fake_poll)
    poller = NodePoller(_client("http://127.0.0.1:9"))
    poller.start()
    try:
        poller.add("pod-a", _runtime())
        assert _until(lambda: len(calls) == 1)
        poller.add("pod-b", _runtime())  # abandons the first: the second names pod-b
        assert _until(lambda: len(calls) == 2)
        calls[0].set()  # the abandoned one answers late
        time.sleep(0.3)
        assert len(calls) == 2, "the late answer of an abandoned long-poll abandoned the one out"
        calls[1].set()  # the one out answers: the poller long-polls again
        assert _until(lambda: len(calls) == 3)
        assert poller.polls == 1  # only the answer of the long-poll out counts
    finally:
        for c in calls:
            c.set()
        poller.stop()


@pytest.fixture
def silent_server() -> Iterator[tuple[str, Callable[[], int]]]:
    """A controller that reads requests and never answers; yields its URL and how many
    connections are open."""
    srv = socket.create_server(("127.0.0.1", 0))
    open_conns: set[socket.socket] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with lock:
            open_conns.add(conn)
        try:
            while not stop.is_set() and conn.recv(65536):
                pass
        except OSError:
            pass
        with lock:
            open_conns.discard(conn)
        conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    def count() -> int:
        with lock:
            return len(open_conns)

    yield f"http://127.0.0.1:{srv.getsockname()[1]}", count
    stop.set()
    srv.close()
    with lock:
        for c in open_conns:
            c.close()


def test_an_abandoned_long_poll_is_cut_not_left_holding_a_connection(
        silent_server: tuple[str, Callable[[], int]]) -> None:
    """Before: each pod that came left the long-poll out running to its timeout on its own
    connection; 110 pods at start exceeded the connection pool, and the enrolments sharing the
    node's client queued for a connection (seconds per new pod)."""
    url, open_connections = silent_server
    client = _client(url)
    poller = NodePoller(client, long_poll_seconds=30.0)
    poller.start()
    try:
        for i in range(6):
            poller.add(f"pod-{i}", _runtime())
            time.sleep(0.15)
        assert _until(lambda: open_connections() <= 1, 3.0), \
            f"{open_connections()} long-polls still out for one node"
        assert open_connections() == 1  # the one naming every pod
    finally:
        poller.stop()
        client.close()
