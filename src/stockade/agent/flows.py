"""Flow reporting: logged first packets -> bounded, merged flow summaries -> batched uploads.

Where the packets come from is the backend's :class:`~stockade.backends.base.FlowSource`: an
NFLOG group (nftables, iptables; :class:`~stockade.agent.nflog.NflogReader`) or the eBPF
datapath's flow events (:class:`EventFlowReader` turns each new-connection event into the same
:class:`~stockade.agent.nflog.LoggedPacket`). Three parts, each testable alone:

* :class:`FlowBuffer` - pending summaries keyed by (flow key, side, verdict, rule): a packet of
  a known key only bumps its count and last-seen time; a new key takes a slot. At most
  ``max_entries`` slots: when full, packets of new keys are counted in :attr:`FlowBuffer.dropped`
  and discarded (memory stays bounded however long the controller is away). Batches taken for
  an upload that fails are merged back.
* :class:`HttpFlowSender` - ``POST /api/v1/agents/{id}/flows`` (:mod:`stockade.visibility.wire`)
  on its own connection (uploads never queue behind the long-poll), the controller's CA pinned.
* :class:`FlowCollector` - a reader thread (a :class:`FlowReader`, opened in that thread) and
  an uploader thread that sends a batch every ``interval`` seconds (sooner when a batch is
  full), backs off while the controller is unreachable, and always reports the cumulative
  ``dropped`` count: buffer drops, kernel overruns (NFLOG ``ENOBUFS``, eBPF ring buffer full)
  and batches the controller refused. Nothing is lost silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import httpx

from stockade import __version__
from stockade.agent.backoff import Backoff, BackoffPolicy
from stockade.agent.enforcer import Enforcer
from stockade.agent.http_client import (
    API_PREFIX,
    CONNECT_TIMEOUT,
    REQUEST_TIMEOUT,
    controller_urls,
    pinned_context,
    raise_for,
)
from stockade.agent.nflog import VERDICTS, LoggedPacket, NflogReader
from stockade.agent.signing import AgentAuth
from stockade.agent.state import Credential
from stockade.agent.transport import ControllerUnreachableError
from stockade.backends.base import EventFlows, FlowEventStream, NflogFlows
from stockade.backends.flowlog import FlowEvent, FlowReason
from stockade.compiler.ir import Direction
from stockade.errors import StockadeError
from stockade.evaluator import Verdict
from stockade.model.addresses import IPAddress
from stockade.model.services import Proto
from stockade.visibility.flows import FlowKey, FlowRecord
from stockade.visibility.wire import MAX_RECORDS, FlowBatch, batch_to_wire

log = logging.getLogger("stockade.agent.flows")
_Slot = tuple[FlowKey, Direction, Verdict, str]


class FlowBuffer:
    """Bounded pending flow summaries (thread-safe)."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self.dropped = 0
        self._lock = threading.Lock()
        self._slots: dict[_Slot, list[float]] = {}  # -> [count, first, last]

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def add(self, p: LoggedPacket) -> bool:
        """Record one logged packet; False (and counted as dropped) when the buffer is full."""
        return self._merge((p.key, p.side, p.verdict, p.rule_id), p.count, p.time, p.time)

    def _merge(self, slot: _Slot, count: int, first: float, last: float) -> bool:
        with self._lock:
            found = self._slots.get(slot)
            if found is not None:
                found[0] += count
                found[1] = min(found[1], first)
                found[2] = max(found[2], last)
                return True
            if len(self._slots) >= self.max_entries:
                self.dropped += count
                return False
            self._slots[slot] = [count, first, last]
            return True

    def take(self, n: int) -> list[FlowRecord]:
        """Remove and return up to ``n`` summaries, oldest first."""
        out = []
        with self._lock:
            for slot in list(self._slots)[:n]:
                count, first, last = self._slots.pop(slot)
                key, side, verdict, rule = slot
                out.append(FlowRecord(key, side, verdict, rule, int(count), first, last))
        return out

    def put_back(self, records: Iterable[FlowRecord]) -> None:
        """Merge summaries of a failed upload back (dropped if no room is left)."""
        for r in records:
            self._merge((r.key, r.side, r.verdict, r.rule_id), r.count, r.first_seen, r.last_seen)


class FlowSender(Protocol):
    def send(self, batch: FlowBatch) -> None:
        """Upload one batch; ControllerUnreachableError: try later; other StockadeError: refused."""
        ...

    def close(self) -> None: ...


class HttpFlowSender:
    """Uploads batches to the controller over HTTPS (CA pinned) with the agent's token; with
    several controller replicas, a batch one could not take goes to the next at once."""

    def __init__(self, credential: Credential, ca_pem: str | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._path = f"/agents/{credential.agent_id}/flows"
        self._clients = [httpx.Client(
            base_url=url + API_PREFIX,
            verify=pinned_context(ca_pem) if ca_pem else True,
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            transport=transport,
            headers={"User-Agent": f"stockade-agent/{__version__}"},
            auth=AgentAuth(credential),  # bearer token + the host key's signature
        ) for url in controller_urls(credential.controller)]
        self._current = 0

    def send(self, batch: FlowBatch) -> None:
        body = batch_to_wire(batch)
        for _attempt in range(len(self._clients)):
            try:
                resp = self._clients[self._current].post(self._path, json=body)
                raise_for(resp)
                return
            except httpx.HTTPError as exc:
                last = ControllerUnreachableError(f"POST {self._path}: {type(exc).__name__}: {exc}")
            except RuntimeError as exc:  # closed during shutdown
                raise ControllerUnreachableError(str(exc)) from exc
            except ControllerUnreachableError as exc:  # 429 / 5xx
                last = exc
            self._current = (self._current + 1) % len(self._clients)
        raise last

    def close(self) -> None:
        for c in self._clients:
            c.close()


class FlowReader(Protocol):
    """Logged first packets, as they come (NflogReader, EventFlowReader, a list in tests)."""

    @property
    def overruns(self) -> int:
        """Packets the kernel could not hand over, cumulative."""
        ...

    def read(self, timeout: float) -> list[LoggedPacket]: ...

    def close(self) -> None: ...


IsLocal = Callable[[IPAddress], bool]
ReaderFactory = Callable[[int, IsLocal | None], FlowReader]  # (NFLOG group, is_local) -> reader


def _open_reader(group: int, is_local: IsLocal | None) -> FlowReader:
    return NflogReader(group, is_local=is_local)


def logged_packet(event: FlowEvent) -> LoggedPacket:
    """An eBPF flow event as the packet NFLOG would have logged for the same connection."""
    key = FlowKey(event.src, event.dst, event.proto or Proto.ANY, event.port)
    return LoggedPacket(key, event.direction, VERDICTS[event.action], event.rule_id, event.timestamp)


class EventFlowReader:
    """Reads the datapath's flow events (the eBPF ring buffer) as logged packets.

    Only first packets of new connections are reported, like NFLOG; a flow whose verdict a
    later policy changed (``REVALIDATED``) is counted by the datapath, not reported again.
    """

    def __init__(self, stream: FlowEventStream) -> None:
        self.stream = stream

    @property
    def overruns(self) -> int:
        return self.stream.lost()

    def read(self, timeout: float) -> list[LoggedPacket]:
        return [logged_packet(e) for e in self.stream.poll(timeout) if e.reason is FlowReason.NEW]

    def close(self) -> None:
        self.stream.close()


class FlowCollector:
    """Reads the flow source, buffers, uploads. ``start()`` spawns two daemon threads; ``stop()`` ends them."""

    def __init__(
        self,
        sender: FlowSender,
        *,
        group: int,
        interval: float = 2.0,
        batch_size: int = 5000,
        max_entries: int = 50_000,
        is_local: Callable[[IPAddress], bool] | None = None,
        backoff: BackoffPolicy | None = None,
        reader_factory: ReaderFactory = _open_reader,
        source_name: str | None = None,
        retry_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sender = sender
        self.group = group
        self.interval = interval
        self.batch_size = min(batch_size, MAX_RECORDS)
        self.buffer = FlowBuffer(max_entries)
        self.is_local = is_local
        self.reader_factory = reader_factory
        self.source_name = source_name or f"NFLOG group {group}"
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.uploaded = 0  # summaries the controller accepted
        self.batches = 0
        self.refused = 0  # summaries in batches the controller refused
        self.overruns = 0  # kernel-side losses, as reported by the reader
        self._backoff = Backoff(backoff or BackoffPolicy(initial=0.5, maximum=30.0))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reported_dropped = -1

    @property
    def dropped(self) -> int:
        """Everything lost so far: buffer full, kernel overruns, refused batches (cumulative)."""
        return self.buffer.dropped + self.overruns + self.refused

    def start(self, *, read: bool = True) -> None:
        if read:
            self._spawn(self._read_loop, "stockade-flows-read")
        self._spawn(self._upload_loop, "stockade-flows-upload")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self.sender.close()

    def record(self, packets: Sequence[LoggedPacket]) -> None:
        for p in packets:
            self.buffer.add(p)
        if len(self.buffer) >= self.batch_size:
            self._wake.set()

    def flush_now(self) -> None:
        """Upload without waiting for the interval (tests, shutdown)."""
        self._wake.set()

    # ---- threads ----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        reader: FlowReader | None = None
        failures = 0
        while not self._stop.is_set():
            if reader is None:
                try:
                    reader = self.reader_factory(self.group, self.is_local)
                    log.info("reading flows from %s", self.source_name)
                except (OSError, StockadeError) as exc:
                    failures += 1
                    (log.warning if failures == 1 else log.debug)(
                        "cannot read %s (%s); flows are not reported, retrying every %.0f s",
                        self.source_name, exc, self.retry_seconds)
                    self._stop.wait(self.retry_seconds)
                    continue
                failures = 0
            try:
                self.record(reader.read(0.5))
                self.overruns = reader.overruns
            except (OSError, StockadeError) as exc:
                log.warning("reading %s failed (%s); reopening", self.source_name, exc)
                reader.close()
                reader = None
        if reader is not None:
            reader.close()

    def _upload_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            delay = self.upload_pending()
            if delay:
                self._stop.wait(delay)

    def upload_pending(self) -> float:
        """Send everything buffered (and the dropped count if it changed); the delay to back off, or 0."""
        while True:
            batch = self.buffer.take(self.batch_size)
            dropped = self.dropped
            if not batch and dropped == self._reported_dropped:
                return 0.0
            try:
                self.sender.send(FlowBatch(self.clock(), dropped, tuple(batch)))
            except ControllerUnreachableError as exc:
                self.buffer.put_back(batch)
                delay = self._backoff.next_delay()
                log.info("flow upload: controller unreachable (%s); %d summaries kept, retry in %.1fs",
                         exc, len(self.buffer), delay)
                return delay
            except StockadeError as exc:
                self.refused += len(batch)
                log.warning("flow upload refused (%s): %d summaries dropped", exc, len(batch))
                return self._backoff.next_delay()
            self._backoff.reset()
            self._reported_dropped = dropped
            self.uploaded += len(batch)
            self.batches += 1
            if len(batch) < self.batch_size:
                return 0.0


def reader_factory_for(flows: NflogFlows | EventFlows, netns: str | None) -> tuple[ReaderFactory, str]:
    """How to open a reader of ``flows`` (in the reader thread), and its name for the log."""
    if isinstance(flows, NflogFlows):

        def nflog(group: int, is_local: IsLocal | None) -> FlowReader:
            return NflogReader(group, is_local=is_local, netns=netns)

        return nflog, f"NFLOG group {flows.group}"

    def events(group: int, is_local: IsLocal | None) -> FlowReader:
        return EventFlowReader(flows.open())

    return events, "the eBPF flow-event ring buffer"


def _is_local(local_addresses: Callable[[], Iterable[IPAddress]]) -> IsLocal:
    def is_local(addr: IPAddress) -> bool:
        return addr in set(local_addresses())

    return is_local


def open_reader_now(enforcer: Enforcer, local_addresses: Callable[[], Iterable[IPAddress]]) -> FlowReader | None:
    """The enforcer's NFLOG reader, bound now in the calling thread (None: no NFLOG source).

    For a caller about to put a first policy in force where nothing reads yet (a new pod's
    namespace): NFLOG discards what no socket is bound to, so a reader opened after the apply misses
    the first connections. Hand it to :func:`collector_for` (``reader=``). Raises OSError /
    StockadeError when it cannot be bound."""
    flows = enforcer.flows
    if not isinstance(flows, NflogFlows):
        return None
    factory, _name = reader_factory_for(flows, enforcer.netns)
    return factory(flows.group, _is_local(local_addresses))


def open_reader_early(enforcer: Enforcer, what: str) -> tuple[FlowReader | None, bool]:
    """:func:`open_reader_now` for a new pod's namespace, BEFORE its first policy goes in force
    (its collector, made after the apply, reads it first): (the reader or None, whether binding
    succeeded). A reader opened once the runtime had enrolled missed the pod's first connections;
    under the node protocol the node even acknowledged the pod's revision before that reader
    existed, so a connection made at convergence was never reported. A failure is logged and the
    collector keeps trying (as a host agent's does)."""
    try:
        return open_reader_now(enforcer, lambda: enforcer.policy.local_addresses if enforcer.policy else ()), True
    except (OSError, StockadeError) as exc:
        log.warning("%s: flow reader not bound before the first apply (%s); its collector retries", what, exc)
        return None, False


def _handing_over(opened: FlowReader, then: ReaderFactory) -> ReaderFactory:
    """``opened`` at the first call (a reader the caller bound earlier), ``then``'s after (reopens)."""
    pending = [opened]

    def factory(group: int, is_local: IsLocal | None) -> FlowReader:
        return pending.pop() if pending else then(group, is_local)

    return factory


def collector_for(credential: Credential, ca_pem: str | None, enforcer: Enforcer,
                  local_addresses: Callable[[], Iterable[IPAddress]], *,
                  reader: FlowReader | None = None) -> FlowCollector | None:
    """A started collector for an agent whose backend is a flow source (None for any other);
    ``reader``: one already bound (:func:`open_reader_now`), read first."""
    flows = enforcer.flows
    if flows is None or not credential.controller.startswith(("http://", "https://")):
        if reader is not None:
            reader.close()
        return None
    factory, name = reader_factory_for(flows, enforcer.netns)
    if reader is not None:
        factory = _handing_over(reader, factory)
    group = flows.group if isinstance(flows, NflogFlows) else 0
    # a ring buffer exists from the first apply on: look again soon rather than in 30 s
    retry = 30.0 if isinstance(flows, NflogFlows) else 1.0
    collector = FlowCollector(HttpFlowSender(credential, ca_pem), group=group, is_local=_is_local(local_addresses),
                              reader_factory=factory, source_name=name, retry_seconds=retry)
    collector.start()
    return collector
