"""The iptables lookup layout: each precedence tier an index on the port, not a rule list.

iptables has no verdict map, so a tier is entered through a small index of chains over the
tier's port groups (:mod:`stockade.backends.portgroups`: the port axis cut into intervals, each
with the rules covering it in precedence order). For one family and direction (``<D>`` is ``IN``
or ``OUT``, ``<d>`` is ``I`` or ``O``, ``<t>`` the tier letter: ``o`` override-deny, ``a``
allow, ``d`` deny) the chains and their lines, as ``iptables-save`` prints them, are::

    <prefix>-<D>            head: management / controller lines, then  -g <first tier chain>
    <prefix>-<D>-<t>        tier chain, in this order:
                              TCP index lines, then UDP index lines (see below),
                              the tier's ICMP / any-protocol rules as rule entries whose service
                              match is [-p icmp -m icmp --icmp-type N] (or none: any protocol),
                              -g <next tier chain, or <prefix>-<D>-end>
    <prefix>-<D>-<t>-t<n>   TCP index chain n of the tier (u<n>: UDP), numbered depth first:
                              index lines, then  -g <next tier chain, or <prefix>-<D>-end>
    <prefix>-<D>-end        the mode default (always present, may be empty)

An index line is a *chunk* (a range of the port axis with its own index chain) or a line of
a *rule entry* (one rule at one port interval, written out); ``LO:HI`` is printed ``N`` when
LO == HI, and the ``-m tcp --dport`` part is left out for 0:65535::

    -p tcp -m tcp --dport LO:HI -g <prefix>-<D>-<t>-t<n>                                 (chunk)
    <service match> -m set --match-set <peer set> src|dst [once] -m comment --comment <rule id>
        -j NFLOG --nflog-prefix <stk:a:|stk:d:|stk:pb:><rule id> [--nflog-group G]  (one line)
    <service match> -m set --match-set <peer set> src|dst -m comment --comment <rule id> -j RETURN|DROP

A rule entry is its flow-log line (left out when flow logging is off, except visibility's
``stk:pb:``) then its verdict line (``RETURN``: allow, or visibility's would-be drop; ``DROP``:
deny), both carrying the rule id, so NFLOG and ``explain`` keep the deciding rule; ``[once]``
is present on UDP only (below).

Index lines are sorted by port and their port intervals are disjoint (several rule entries of
one group share an interval and keep precedence order). A part of the axis with at most
:data:`LEAF_RULES` rule entries is written inline; a larger one is cut into ``fan`` chunks, each
its own index chain, at most :data:`INDEX_LEVELS` levels below the tier chain, the fan-out
chosen so the last level holds ~8 entries (1,000 rules on distinct ports: ~12 x ~11 x 8). Why
two levels and not a binary tree: nf_tables (the iptables-nft variant) refuses rulesets whose
chains nest more than 16 deep (jumps and gotos alike, EMLINK), and the tiers follow one
another by goto. Depth here: built-in chain, entry, head, then per tier its chain and two
index levels, then the default: at most 12.

Every chain below the head is reached by ``-g`` (goto), so a ``RETURN`` anywhere below, or
falling off the end of a chain, returns to ``<prefix>-INPUT``/``-OUTPUT``/``-FORWARD`` after its
jump to the head: the allow verdict of the list layout, back to the built-in chain. A miss
anywhere in a tier ends with ``-g`` to the next tier. A TCP packet allowed by the 1,000th rule
walks ~40 lines (head, two index levels, the leaf's entries; port compares, one set lookup per
line of its own port) instead of ~1,000. No chain per rule: a first version had one (rule
entry ``-g`` rule chain) and measured ~2,300 chains per family at 1,000 rules, whose restore
(worst through iptables-nft: 8 s warm apply at 5,000 rules) dominated the apply. Peer sets are the
same ``hash:net`` sets as in the list layout, so a peer delta stays ``ipset`` element changes.
Rules piling on one port are still walked in their leaf; an any-port TCP/UDP rule is repeated
in every leaf of its tier.

Flow logging (rule entries and :func:`flow_log_lines` of the default): a packet reaching a
rule entry or the default is the first packet of a new connection (the failsafe returned
established and related ones), except
for a one-way UDP flow, whose every packet is NEW. An accepted one is logged once per
conntrack flow: its log line carries ``-m connbytes --connbytes 0:1 --connbytes-mode packets
--connbytes-dir original`` (the match turns conntrack accounting on in the namespace). A
dropped packet never confirms its conntrack entry (each packet looks like a first one), so a
drop's UDP log line carries a ``hashlimit`` on the 4-tuple instead (:func:`drop_once`: one log,
then silence until the flow has been idle 30 s). A full hashlimit table makes the match drop
the packet, which a drop verdict does anyway; accepted traffic never depends on a table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from stockade.backends.common import checked_rule_id
from stockade.backends.iptables.model import ChainNames, IptChain
from stockade.backends.portgroups import PROTO_NAMES, PortGroup, port_groups
from stockade.compiler.ir import Direction, HostRule
from stockade.model.addresses import Family
from stockade.model.rules import Action

LEAF_RULES = 8  # a part of the port axis with at most this many rule entries is written out
INDEX_LEVELS = 2  # index chains below a tier chain (nf_tables allows 16 nested chains in all)
TIER_LETTERS = {Action.OVERRIDE_DENY: "o", Action.ALLOW: "a", Action.DENY: "d"}
UDP_ONCE = "-m connbytes --connbytes 0:1 --connbytes-mode packets --connbytes-dir original"
UDP_FLOW_MS = 30_000  # nf_conntrack's timeout of an unreplied UDP flow


@dataclass(frozen=True)
class Tier:
    """The rules of one direction and tier with the lines their list part renders to."""

    action: Action
    rules: tuple[HostRule, ...]
    list_lines: tuple[str, ...]  # ICMP / any-protocol lines: each rule's log and verdict lines


def head_name(prefix: str, direction: Direction) -> str:
    names = ChainNames(prefix)
    return names.inbound if direction is Direction.INBOUND else names.outbound


def tier_chain(prefix: str, direction: Direction, action: Action) -> str:
    return f"{head_name(prefix, direction)}-{TIER_LETTERS[action]}"


def default_chain(prefix: str, direction: Direction) -> str:
    return f"{head_name(prefix, direction)}-end"


def port_text(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}:{hi}"


def port_match(proto: int, lo: int, hi: int) -> str:
    """``-p tcp -m tcp --dport LO:HI`` as iptables-save prints it (no port part for 0:65535)."""
    name = PROTO_NAMES[proto]
    if (lo, hi) == (0, 65535):
        return f"-p {name}"
    return f"-p {name} -m {name} --dport {port_text(lo, hi)}"


# ---- one tier --------------------------------------------------------------------------

RuleLines = Callable[[str, HostRule], list[str]]  # (service match, rule) -> its log and verdict lines


def _group_lines(group: PortGroup[HostRule], rule_lines: RuleLines) -> list[str]:
    match = port_match(group.proto, group.port_lo, group.port_hi)
    return [line for rule in dict.fromkeys(group.rules) for line in rule_lines(match, rule)]


class _TreeBuilder:
    """Builds one protocol's index over a tier's port groups (sorted, disjoint).

    :meth:`lines` returns the lines for the chain at hand and adds the chains below it: a
    part of the axis with at most :data:`LEAF_RULES` rule entries is written inline, a larger
    one is cut into ``fan`` contiguous chunks (balanced by rule entries), each reached by one
    ``--dport LO:HI -g`` line. ``levels`` bounds the chains below the tier chain (see
    :data:`INDEX_LEVELS`); the fan-out is chosen so the leaves still hold ~LEAF_RULES entries.
    """

    def __init__(self, base: str, letter: str, miss: str, rule_lines: RuleLines) -> None:
        self.base = base  # the tier chain name
        self.letter = letter  # "t" / "u"
        self.miss = miss
        self.rule_lines = rule_lines
        self.chains: list[IptChain] = []

    def lines(self, groups: tuple[PortGroup[HostRule], ...], levels: int) -> list[str]:
        weights = [len(dict.fromkeys(g.rules)) for g in groups]
        total = sum(weights)
        if total <= LEAF_RULES or levels == 0 or len(groups) == 1:
            return [line for g in groups for line in _group_lines(g, self.rule_lines)]
        fan = max(2, math.ceil((total / LEAF_RULES) ** (1 / levels)))
        out: list[str] = []
        for chunk in _chunks(groups, weights, fan):
            if len(chunk) == 1 and len(dict.fromkeys(chunk[0].rules)) == 1:
                out += _group_lines(chunk[0], self.rule_lines)  # one rule: no chain for it
                continue
            name = f"{self.base}-{self.letter}{len(self.chains)}"
            slot = len(self.chains)
            self.chains.append(IptChain(name, ()))  # placeholder: numbered before its children
            below = self.lines(chunk, levels - 1)
            self.chains[slot] = IptChain(name, (*below, f"-g {self.miss}"))
            span = port_match(chunk[0].proto, chunk[0].port_lo, chunk[-1].port_hi)
            out.append(f"{span} -g {name}")
        return out


def _chunks(
    groups: tuple[PortGroup[HostRule], ...], weights: list[int], fan: int
) -> list[tuple[PortGroup[HostRule], ...]]:
    """``groups`` cut into at most ``fan`` contiguous, non-empty chunks of about equal weight."""
    target = sum(weights) / fan
    out: list[tuple[PortGroup[HostRule], ...]] = []
    start, acc = 0, 0
    for i, w in enumerate(weights):
        acc += w
        if acc >= target * (len(out) + 1) and len(out) < fan - 1:
            out.append(groups[start : i + 1])
            start = i + 1
    if start < len(groups):
        out.append(groups[start:])
    return out


def tier_chains(
    prefix: str,
    direction: Direction,
    tier: Tier,
    family: Family,
    rule_lines: RuleLines,
    miss: str,
) -> list[IptChain]:
    """The tier chain and its index chains; [] when the tier has nothing for ``family``."""
    name = tier_chain(prefix, direction, tier.action)
    groups = port_groups(tier.rules, family, lambda r: r)
    if not groups and not tier.list_lines:
        return []
    lines: list[str] = []
    trees: list[IptChain] = []
    for proto in sorted(PROTO_NAMES):
        mine = tuple(g for g in groups if g.proto == proto)
        if mine:
            builder = _TreeBuilder(name, PROTO_NAMES[proto][0], miss, rule_lines)
            lines += builder.lines(mine, INDEX_LEVELS)
            trees += builder.chains
    lines += tier.list_lines
    lines.append(f"-g {miss}")
    return [IptChain(name, tuple(lines)), *trees]


# ---- flow logging ----------------------------------------------------------------------


def drop_once(prefix: str) -> str:
    """The per-flow memory of dropped UDP: a ``hashlimit`` table on the 4-tuple (one token an
    hour, forgotten 30 s after the flow's last packet). Its name: at most 15 characters."""
    return (
        "-m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 1 --hashlimit-mode srcip,srcport,dstip,dstport "
        f"--hashlimit-name {prefix[:10]}-drop --hashlimit-htable-expire {UDP_FLOW_MS}"
    )


def flow_log_lines(comment: str, nflog: str, udp: bool, drop_memory: str = "") -> list[str]:
    """The log line(s) before a verdict: every packet but UDP's, UDP's first of its flow only.

    ``comment`` is the ``-m comment ...`` part, ``nflog`` the ``-j NFLOG ...`` target; ``udp``
    False when the chain never sees UDP (one unconditional line). Accepted UDP is deduplicated
    by conntrack (:data:`UDP_ONCE`); a dropped packet never confirms its conntrack entry, so a
    drop passes ``drop_memory`` (:func:`drop_once`) instead."""
    if not udp:
        return [f"{comment} {nflog}"]
    return [f"! -p udp {comment} {nflog}", f"-p udp {drop_memory or UDP_ONCE} {comment} {nflog}"]


def checked_id(rule_id: str) -> str:
    return checked_rule_id(rule_id, "embedded in an iptables comment")
