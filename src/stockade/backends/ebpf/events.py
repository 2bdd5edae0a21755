"""Flow events from the datapath's ring buffer: one record per new-connection verdict.

The datapath writes a ``struct stk_event`` for the first packet of every connection it
evaluates (allowed, blocked, or would-be blocked in visibility mode) and when a
re-check after a policy change alters a flow's verdict. :class:`FlowEventReader`
maps the ``stk_events`` ring buffer (``BPF_MAP_TYPE_RINGBUF``) and decodes records into
:class:`FlowEvent`, the same facts the nftables backend's NFLOG prefixes carry
(``stk:a:`` / ``stk:d:`` / ``stk:pb:`` + rule id) plus the addresses and ports.

:class:`~stockade.backends.flowlog.FlowEvent` is shared with the agent, which turns these
events into flow reports exactly like NFLOG packets (``EbpfBackend.flow_source``).

Ring buffer layout (kernel ``bpf_ringbuf``): page 0 holds the consumer position (we
write it), page 1 the producer position, then the data area mapped twice so a record
never wraps. Each record has an 8-byte header: length with BUSY (bit 31) and DISCARD
(bit 30) flags, then the sample, padded to 8 bytes.
"""

from __future__ import annotations

import ipaddress
import mmap
import select
import struct
import time
from collections.abc import Callable

from stockade.backends.ebpf.loader import STAT_NAMES
from stockade.backends.ebpf.render import DIRECTION_OF_KERNEL
from stockade.backends.ebpf.syscall import BpfMap, possible_cpus
from stockade.backends.flowlog import FlowAction, FlowEvent, FlowReason
from stockade.compiler.ir import Direction
from stockade.model.addresses import Family
from stockade.model.services import Proto

EVENT_SIZE = 64
_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEAD = struct.Struct("=QIIBBBBBB2x")
_PROTO = {6: Proto.TCP, 17: Proto.UDP, 1: Proto.ICMP, 58: Proto.ICMPV6}


_ACTION = {1: FlowAction.ALLOW, 2: FlowAction.BLOCK, 3: FlowAction.WOULD_BLOCK}
_REASON = {1: FlowReason.NEW, 2: FlowReason.REVALIDATED}


def decode_event(raw: bytes, rule_name: Callable[[int, int], str], clock_offset: float) -> FlowEvent:
    ts, serial, rule, family, proto, direction, action, reason, icmp_type = _HEAD.unpack_from(raw, 0)
    sport, dport = struct.unpack_from(">HH", raw, 24)
    (ifindex,) = struct.unpack_from("=I", raw, 28)
    fam = Family.V4 if family == 4 else Family.V6
    size = 4 if fam is Family.V4 else 16
    src = ipaddress.ip_address(raw[32 : 32 + size])
    dst = ipaddress.ip_address(raw[48 : 48 + size])
    p = _PROTO.get(proto)
    if (p is Proto.ICMP and fam is Family.V6) or (p is Proto.ICMPV6 and fam is Family.V4):
        p = None
    icmp = p in (Proto.ICMP, Proto.ICMPV6)
    ported = p in (Proto.TCP, Proto.UDP)
    return FlowEvent(
        timestamp=ts / 1e9 + clock_offset,
        direction=DIRECTION_OF_KERNEL.get(direction, Direction.INBOUND),
        family=fam,
        ip_proto=proto,
        proto=p,
        src=src,
        dst=dst,
        src_port=sport if ported or icmp else None,
        dst_port=dport if ported else None,
        icmp_type=icmp_type if icmp and reason == 1 else None,
        action=_ACTION.get(action, FlowAction.BLOCK),
        rule_id=rule_name(serial, rule),
        reason=_REASON.get(reason, FlowReason.NEW),
        ifindex=ifindex,
        policy_serial=serial,
    )


class FlowEventReader:
    """Consumes the ring buffer; ``poll`` returns the events written since the last call."""

    def __init__(
        self,
        ring: BpfMap,
        data_size: int,
        rule_name: Callable[[int, int], str],
        counters: BpfMap | None = None,
    ) -> None:
        self.ring = ring
        self.rule_name = rule_name
        self.counters = counters  # stk_stats: the per-CPU "events lost" counter
        self.page = mmap.PAGESIZE
        self.size = data_size
        self.mask = data_size - 1
        self._consumer = mmap.mmap(ring.fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(
            ring.fd, self.page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self.page
        )
        self._poll = select.poll()
        self._poll.register(ring.fd, select.POLLIN)
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC
        self.clock_offset = time.time() - time.monotonic()

    def lost(self) -> int:
        """Events the datapath could not write (ring buffer full), cumulative."""
        if self.counters is None:
            return 0
        raw = self.counters.lookup(struct.pack("=I", STAT_NAMES.index("events_lost"))) or b""
        cpus = min(possible_cpus(), len(raw) // 8)
        return sum(struct.unpack_from("=Q", raw, 8 * c)[0] for c in range(cpus))

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        self.ring.close()
        if self.counters is not None:
            self.counters.close()

    def __enter__(self) -> FlowEventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drain(self) -> list[bytes]:
        """Raw samples available now (consumer position advanced past them)."""
        (cons,) = struct.unpack_from("=Q", self._consumer, 0)
        (prod,) = struct.unpack_from("=Q", self._producer, 0)
        out: list[bytes] = []
        while cons < prod:
            off = self.page + (cons & self.mask)
            (head,) = struct.unpack_from("=I", self._producer, off)
            if head & _BUSY:
                break
            length = head & ~(_BUSY | _DISCARD)
            if not head & _DISCARD:
                out.append(bytes(self._producer[off + 8 : off + 8 + length]))
            cons += (length + 8 + 7) & ~7
        struct.pack_into("=Q", self._consumer, 0, cons)
        return out

    def poll(self, timeout: float = 0.0) -> list[FlowEvent]:
        """Events available now, waiting up to ``timeout`` seconds for the first one."""
        samples = self.drain()
        if not samples and timeout > 0:
            self._poll.poll(int(timeout * 1000))
            samples = self.drain()
        return [decode_event(s, self.rule_name, self.clock_offset) for s in samples if len(s) >= EVENT_SIZE]
