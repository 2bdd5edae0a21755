"""What a datapath says about connections: the NFLOG prefixes and the flow-event record.

Every Linux backend reports the verdict of the first packet of each new connection, with
the rule that decided it. The netfilter backends (nftables, iptables) log the packet to an
NFLOG group with a prefix written here and nowhere else: ``stk:a:<rule id>`` accepted,
``stk:d:<rule id>`` dropped, ``stk:pb:<rule id>`` would-be dropped (visibility mode,
accepted). The agent's NFLOG reader parses them back with :func:`parse_prefix`. The eBPF
datapath writes :class:`FlowEvent` records to a ring buffer instead, with the same three
actions (:class:`FlowAction`). Both ends of that seam import this module, so a renderer and
the reader can never disagree on a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from stockade.compiler.ir import Direction
from stockade.errors import RenderError
from stockade.model.addresses import Family, IPAddress
from stockade.model.services import Proto


class FlowAction(Enum):
    """The datapath's verdict on a new connection."""

    ALLOW = "allow"
    BLOCK = "block"
    WOULD_BLOCK = "would-block"  # visibility mode: allowed, reported as a would-be drop


class FlowReason(Enum):
    NEW = "new"  # first packet of a connection
    REVALIDATED = "revalidated"  # a flow re-checked after a policy change; its verdict changed


ACCEPT_LOG_PREFIX = "stk:a:"  # NFLOG prefix of accepted new connections: + rule id
DROP_LOG_PREFIX = "stk:d:"  # NFLOG prefix of dropped new connections: + rule id
LOG_PREFIX = "stk:pb:"  # NFLOG prefix of would-be drops in visibility mode: + rule id
PREFIXES: dict[FlowAction, str] = {
    FlowAction.ALLOW: ACCEPT_LOG_PREFIX,
    FlowAction.BLOCK: DROP_LOG_PREFIX,
    FlowAction.WOULD_BLOCK: LOG_PREFIX,
}


def validate_log_group(group: int) -> int:
    """``group`` when it is an NFLOG group number (0-65535); RenderError otherwise."""
    if not 0 <= group <= 65535:
        raise RenderError(f"log group {group} out of range 0-65535")
    return group


def log_prefix(action: FlowAction, rule_id: str) -> str:
    """The NFLOG prefix of ``action`` decided by ``rule_id`` (the renderer validates the id)."""
    return PREFIXES[action] + rule_id


def parse_prefix(prefix: str) -> tuple[FlowAction, str] | None:
    """``stk:a:ruleset/x/0`` -> (ALLOW, "ruleset/x/0"); None for a prefix Stockade did not write."""
    for action, head in PREFIXES.items():
        if prefix.startswith(head):
            return action, prefix[len(head) :]
    return None


@dataclass(frozen=True)
class FlowEvent:
    """One connection verdict at this host (direction: inbound = the peer is ``src``)."""

    timestamp: float  # wall-clock seconds
    direction: Direction
    family: Family
    ip_proto: int
    proto: Proto | None  # None: a protocol the policy model has no name for (matched by "any")
    src: IPAddress
    dst: IPAddress
    src_port: int | None  # ICMP echo: the identifier
    dst_port: int | None
    icmp_type: int | None
    action: FlowAction
    rule_id: str
    reason: FlowReason
    ifindex: int
    policy_serial: int

    @property
    def peer(self) -> IPAddress:
        return self.src if self.direction is Direction.INBOUND else self.dst

    @property
    def port(self) -> int | None:
        """The port the evaluator is asked about (ICMP: the type)."""
        return self.icmp_type if self.proto in (Proto.ICMP, Proto.ICMPV6) else self.dst_port
