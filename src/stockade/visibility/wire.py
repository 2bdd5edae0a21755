"""The agent -> controller flow upload format (pure encoding, shared by both ends).

``POST /api/v1/agents/{id}/flows`` with a JSON body::

    {"sent_at": 1764000000.5,          # the agent's clock when sending (the controller corrects skew)
     "dropped": 12,                    # summaries this agent dropped so far (cumulative, never reset)
     "records": [[src, dst, proto, port, side, verdict, rule_id, count, first_seen, last_seen], ...]}

Records are arrays rather than objects: a batch of thousands is a third of the size and parses
without per-record schema work. ``proto`` is ``tcp|udp|sctp|icmp|icmpv6|any``, ``port`` the
destination port or ICMP type (null for none), ``side`` ``out`` (reported by the source host)
or ``in`` (by the destination host), ``verdict`` ``allowed|potentially-blocked|blocked``,
times are unix seconds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.model.services import Proto
from stockade.visibility.flows import FlowKey, FlowRecord

MAX_RECORDS = 10_000  # per upload
MAX_RULE_ID = 128

SIDE_TEXT = {Direction.OUTBOUND: "out", Direction.INBOUND: "in"}
SIDE_OF_TEXT = {v: k for k, v in SIDE_TEXT.items()}


@dataclass(frozen=True)
class FlowBatch:
    sent_at: float
    dropped: int
    records: tuple[FlowRecord, ...]


def record_to_wire(r: FlowRecord) -> list[Any]:
    k = r.key
    return [str(k.src), str(k.dst), k.proto.value, k.port, SIDE_TEXT[r.side], r.verdict.value, r.rule_id, r.count,
            round(r.first_seen, 3), round(r.last_seen, 3)]


def batch_to_wire(batch: FlowBatch) -> dict[str, Any]:
    return {"sent_at": batch.sent_at, "dropped": batch.dropped, "records": [record_to_wire(r) for r in batch.records]}


def record_from_wire(x: Sequence[Any]) -> FlowRecord:
    """Decode one record; ValueError / TypeError / KeyError when malformed."""
    if len(x) != 10:
        raise ValueError("a record has 10 fields")
    src, dst, proto, port, side, verdict, rule, count, first, last = x
    key = FlowKey(ipaddress.ip_address(src), ipaddress.ip_address(dst), Proto(proto), _port(port))
    if key.src.version != key.dst.version:
        raise ValueError("source and destination of different families")
    if (key.proto is Proto.ICMP and key.src.version == 6) or (key.proto is Proto.ICMPV6 and key.src.version == 4):
        raise ValueError("ICMP protocol and address family disagree")  # the evaluator refuses such a flow
    if not isinstance(rule, str) or len(rule) > MAX_RULE_ID:
        raise ValueError("bad rule id")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count < 2**40:
        raise ValueError("bad count")
    first_f, last_f = float(first), float(last)
    if not 0 <= first_f <= last_f < 2**33:
        raise ValueError("bad times")
    return FlowRecord(key, SIDE_OF_TEXT[side], Verdict(verdict), rule, count, first_f, last_f)


def _port(port: Any) -> int | None:
    if port is None:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError("bad port")
    return port
