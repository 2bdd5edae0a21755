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
from stockade.agent.backoff import BackoffPolicy
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.state import Credential
from stockade.agent.transport import ControllerUnreachableError
from stockade.compiler.delta import PolicyUpdate
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


class _Pod:
    """A pod runtime that applies a revision in ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.applied_revision = 1
        self.refused_revision = 0
        self.enrolled = threading.Event()
        self.enrolled.set()
        self.client = object()

    def update(self, _client: object, revision: int, _upd: object) -> None:
        time.sleep(self.seconds)
        self.applied_revision = revision


class _Controller:
    """Fake node routes: the first long-poll answers ``answer``, later ones stay out; every request
    is recorded (``pods/updates`` with its acks, ``pods/acks``)."""

    def __init__(self, answer: NodeAnswer) -> None:
        self.answer = answer
        self.polls: list[dict[str, int]] = []  # each long-poll's acks
        self.ack_requests: list[dict[str, int]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    def poll(self, _client: HttpControllerClient, _held: dict[str, int], acks: dict[str, int],
             _timeout: float) -> NodeAnswer:
        with self.lock:
            self.polls.append(dict(acks))
            first = len(self.polls) == 1
        if first:
            return self.answer
        self.release.wait(10)
        return NodeAnswer((), ())

    def ack(self, _client: HttpControllerClient, acks: dict[str, int]) -> tuple[str, ...]:
        with self.lock:
            self.ack_requests.append(dict(acks))
        return ()


def _round(monkeypatch: pytest.MonkeyPatch, apply_seconds: dict[str, float]) -> _Controller:
    """One node round: pods at revision 1, an answer moving each to 2; the fake controller after it."""
    answer = NodeAnswer(tuple(node_poll.PodUpdate(a, cast(PolicyUpdate, SimpleNamespace(revision=2)))
                              for a in apply_seconds), ())
    ctl = _Controller(answer)
    monkeypatch.setattr(node_poll, "poll_pods", ctl.poll)
    monkeypatch.setattr(node_poll, "ack_pods", ctl.ack)
    poller = NodePoller(_client("http://127.0.0.1:9"), workers=4)
    pods = {a: _Pod(s) for a, s in apply_seconds.items()}
    for a, pod in pods.items():
        poller._pods[a] = cast(Agent, pod)
        poller._held[a] = poller._acked[a] = 1
    poller.start()
    try:
        assert _until(lambda: len(ctl.polls) >= 2 and all(p.applied_revision == 2 for p in pods.values()))
        time.sleep(node_poll.ACK_CARRY + 0.3)  # the ack thread's gathering, had it anything to send
    finally:
        ctl.release.set()
        poller.stop()
    return ctl


def test_a_round_is_one_request_the_acks_ride_on_the_next_long_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the poller long-polled again right after an answer (no acks: the pods were still
    applying), and their acks went in a ``pods/acks`` request of their own: two requests a round."""
    ctl = _round(monkeypatch, {"pod-a": 0.005, "pod-b": 0.01, "pod-c": 0.0})
    assert len(ctl.polls) == 2
    assert ctl.polls[1] == {"pod-a": 2, "pod-b": 2, "pod-c": 2}
    assert ctl.ack_requests == []


def test_an_apply_slower_than_the_linger_is_acked_while_the_long_poll_is_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The next long-poll waits at most ACK_CARRY: a slow pod's ack goes in a request of its own
    (never lost, never waiting for the long-poll's answer), the fast pod's on the long-poll."""
    ctl = _round(monkeypatch, {"pod-fast": 0.0, "pod-slow": node_poll.ACK_CARRY + 0.15})
    assert len(ctl.polls) == 2
    assert ctl.polls[1] == {"pod-fast": 2}
    assert ctl.ack_requests == [{"pod-slow": 2}]


def test_acks_of_a_failed_long_poll_go_on_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-poll carrying acks that fails (controller unreachable) requeues them: the next one
    carries them again."""
    seen: list[dict[str, int]] = []
    release = threading.Event()

    def fake_poll(_client: HttpControllerClient, _held: dict[str, int], acks: dict[str, int],
                  _timeout: float) -> NodeAnswer:
        seen.append(dict(acks))
        if len(seen) == 1:
            raise ControllerUnreachableError("down")
        release.wait(10)
        return NodeAnswer((), ())

    monkeypatch.setattr(node_poll, "poll_pods", fake_poll)
    poller = NodePoller(_client("http://127.0.0.1:9"), backoff=BackoffPolicy(initial=0.01, maximum=0.01))
    with poller._lock:
        poller._pods["pod-a"] = cast(Agent, _Pod(0.0))
        poller._held["pod-a"] = 2
        poller._acks["pod-a"] = 2
    poller.start()
    try:
        assert _until(lambda: len(seen) >= 2)
        assert seen[:2] == [{"pod-a": 2}, {"pod-a": 2}]
    finally:
        release.set()
        poller.stop()
