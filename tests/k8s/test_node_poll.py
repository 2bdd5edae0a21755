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


def test_a_set_delta_shared_by_the_nodes_pods_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller encodes a set delta many pods share once (``encode_answer``); before, the
    node decoded and checked it once per pod: 55 pods' deltas per pod event in churn, each CIDR
    through ``ip_network`` 55 times. Now once per answer, every pod holding the same frozen delta,
    equal to what its own decode gives; a pod's own (different) delta stays its own."""
    import ipaddress

    import httpx

    from stockade.compiler.delta import PolicyUpdate, policy_update_from_dict, policy_update_to_dict
    from stockade.compiler.ir import SetDelta
    from stockade.controller.services.node_distribution import HeldPod, encode_answer
    from stockade.model.addresses import Family

    added = tuple(ipaddress.ip_network(f"10.9.{i}.0/24") for i in range(20))
    shared = SetDelta("web", Family.V4, added, (ipaddress.ip_network("10.8.0.1/32"),))
    own = SetDelta("db", Family.V4, (ipaddress.ip_network("10.7.0.1/32"),), ())
    moved = [(HeldPod(f"pod-{i}", f"w{i}", 4), PolicyUpdate.delta(4, 5, (shared,) if i else (shared, own)))
             for i in range(50)]
    body = encode_answer(moved, ["pod-gone"])
    client = HttpControllerClient("http://ctl.invalid", transport=httpx.MockTransport(
        lambda _req: httpx.Response(200, content=body, headers={"content-type": "application/json"})))
    client.use_credential(Credential("http://ctl.invalid", "node-1", "token", "node-1"), None)

    parsed = 0
    real = ipaddress.ip_network

    def counting(text: object, strict: bool = True) -> object:
        nonlocal parsed
        parsed += 1
        return real(text, strict)  # type: ignore[arg-type]

    monkeypatch.setattr(ipaddress, "ip_network", counting)
    answer = node_poll.poll_pods(client, {f"pod-{i}": 4 for i in range(50)}, {}, 1.0)
    monkeypatch.undo()
    assert parsed == 22, f"{parsed} CIDRs parsed for 50 pods sharing a 21-CIDR delta (+1 of their own)"
    assert answer.gone == ("pod-gone",) and len(answer.updates) == 50
    first = answer.updates[0].update
    assert first.set_deltas[1] == own
    by_id = {p.agent_id: upd for p, upd in moved}
    for u in answer.updates:
        assert u.update.set_deltas[0] is first.set_deltas[0]
        # each pod's update is what its own decode of its own entry gives
        alone = policy_update_from_dict(policy_update_to_dict(by_id[u.agent_id]))
        assert u.update == alone
    client.close()


def test_a_shared_decode_never_answers_for_content_that_decodes_differently() -> None:
    """The memo is keyed on plain wire text only: each entry decodes (or is refused) exactly as on
    its own, even after an equal-comparing one (``1 == 1.0``; ``ip_network(1)`` is valid, ``1.0``
    is not), and a refusal names the entry's own field."""
    from stockade.compiler.delta import SharedDecode, policy_update_from_dict
    from stockade.errors import ValidationError

    def update(*deltas: dict[str, object]) -> dict[str, object]:
        return {"revision": 2, "base": 1, "full": None, "set_deltas": list(deltas)}

    def outcome(d: dict[str, object], memo: SharedDecode | None) -> object:
        try:
            return policy_update_from_dict(d, shared=memo)
        except ValidationError as exc:
            return str(exc)

    memo = SharedDecode()
    entries = [{"name": "s", "family": 4, "added": [1], "removed": []},
               {"name": "s", "family": 4, "added": [1.0], "removed": []},
               {"name": "s", "family": 4, "added": ["10.0.0.0/8"], "removed": []},
               {"name": "s", "family": 4.0, "added": ["10.0.0.0/8"], "removed": []},
               {"name": "s", "family": True, "added": ["10.0.0.0/8"], "removed": []},
               {"name": "s", "family": 4, "added": ["10.0.0.0/8", "fd00::/8"], "removed": []},
               {"name": "s", "family": 4, "added": ["10.0.0.0/8"], "removed": []}]
    for e in entries:
        assert outcome(update(e), memo) == outcome(update(e), None), e
    assert "expected 4 or 6" in str(outcome(update(entries[4]), memo))
    assert "not a CIDR" in str(outcome(update(entries[1]), memo))
    with pytest.raises(ValidationError, match=r"set_deltas\[1\]"):
        policy_update_from_dict(update(entries[2], {"name": ""}), shared=memo)


def test_a_pod_that_refetched_past_its_update_is_asked_beyond_what_is_in_force() -> None:
    """A pod queued at the gate refetches only when an answer brought it a newer revision meanwhile
    (else the delta in hand is applied: no GET per pod per event); after a refetch that went past
    the dispatched revision, the next long-poll names what is in force. Before, it named the
    dispatched one, the controller answered at once with a delta from a revision no longer in force,
    and the runtime refused it into a full fetch and reload."""
    from stockade.compiler.delta import PolicyUpdate

    asked: list[bool] = []

    class Runtime:
        applied_revision, refused_revision = 3, 0
        enrolled = threading.Event()
        client = object()

        def update(self, _client: object, announced: int, upd: PolicyUpdate,
                   newer_known: Callable[[], bool]) -> None:
            asked.append(newer_known())
            self.applied_revision = 7 if asked[-1] else upd.revision  # refetched to the newest

    rt = Runtime()
    rt.enrolled.set()
    poller = NodePoller(_client("http://127.0.0.1:9"))
    poller._pods["pod-a"] = cast(Agent, rt)
    poller._held["pod-a"] = 5
    poller._busy.add("pod-a")
    poller._apply("pod-a", cast(Agent, rt), PolicyUpdate.delta(3, 5, ()))
    assert asked == [False] and poller._held["pod-a"] == 5 and poller._acks == {"pod-a": 5}
    poller._busy.add("pod-a")
    poller._stale.add("pod-a")  # an answer named it at 7 while it was busy
    poller._apply("pod-a", cast(Agent, rt), PolicyUpdate.delta(5, 6, ()))
    assert asked == [False, True]
    assert poller._held["pod-a"] == 7, "the next long-poll would ask from 6 while 7 is in force"
    assert poller._acks == {"pod-a": 7} and not poller._stale and not poller._busy
    poller.stop()

class _Pod:
    """A pod runtime that applies a revision in ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.applied_revision = 1
        self.refused_revision = 0
        self.enrolled = threading.Event()
        self.enrolled.set()
        self.client = object()

    def update(self, _client: object, revision: int, _upd: object,
               newer_known: Callable[[], bool] | None = None) -> None:
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
