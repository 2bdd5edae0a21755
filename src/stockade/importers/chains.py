"""The shape every Linux ruleset importer reads into, and the one chain flattener.

iptables and nftables both evaluate ordered rules in chains with jumps, gotos and returns.
Their parsers (:mod:`stockade.importers.iptables`, :mod:`stockade.importers.nftables`) turn
each rule into a :class:`RawRule` (a :class:`Match` plus an :class:`Action`), naming anything
Stockade cannot match on; :func:`flatten` inlines user chains into one first-match list of
ACCEPT/DROP :class:`OrderedRule` per base chain, conservatively:

* a rule whose match Stockade cannot express: an ACCEPT is left out (never wider), a DROP is
  kept with the inexpressible condition ignored (wider drop = narrower policy);
* a conditional RETURN (or the end of a goto'd chain) skips the rest of its chain for the
  traffic it matches; later rules of that chain overlapping it are handled the same way
  (ACCEPT left out, DROP kept) and reported as approximated.

Windows Firewall rules are unordered but reduce to the same list (blocks first). The list is
turned into Stockade policy by :mod:`stockade.importers.translate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import ip_network

from stockade.importers.report import Finding, Origin, Outcome
from stockade.model.addresses import AddressRanges, Family
from stockade.model.services import ANY_SERVICE_ENTRY, Proto, ServiceEntry

ANY_ENTRIES: tuple[ServiceEntry, ...] = (ANY_SERVICE_ENTRY,)
MAX_DEPTH = 32


class Direction(Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Verdict(Enum):
    ACCEPT = "accept"
    DROP = "drop"


class Kind(Enum):
    ACCEPT = "accept"
    DROP = "drop"
    RETURN = "return"
    JUMP = "jump"
    GOTO = "goto"
    NOOP = "noop"  # LOG, counters, comments: no effect on the verdict


def _meet_ranges(a: AddressRanges | None, b: AddressRanges | None) -> AddressRanges | None:
    if a is None:
        return b
    if b is None:
        return a
    return a.minus(a.minus(b))


def _meet_entry(a: ServiceEntry, b: ServiceEntry) -> ServiceEntry | None:
    if a.proto is Proto.ANY:
        return b
    if b.proto is Proto.ANY:
        return a
    if a.proto is not b.proto:
        return None
    if a.first is None:
        return b
    if b.first is None:
        return a
    lo = max(a.first, b.first)
    hi = min(a.last if a.last is not None else a.first, b.last if b.last is not None else b.first)
    return ServiceEntry(a.proto, lo, hi) if lo <= hi else None


def meet_entries(a: tuple[ServiceEntry, ...], b: tuple[ServiceEntry, ...]) -> tuple[ServiceEntry, ...]:
    found = {m for x in a for y in b if (m := _meet_entry(x, y)) is not None}
    return tuple(sorted(found))


def _covers_entry(a: ServiceEntry, b: ServiceEntry) -> bool:
    return _meet_entry(a, b) == b


@dataclass(frozen=True)
class Match:
    """What a rule matches, from the host's point of view. ``None`` addresses mean any of the family.

    ``peer`` is the other end (source of inbound, destination of outbound), ``local`` this host's
    end; ``peer_names`` the named sets the peer came from (label names are proposed from them).
    """

    family: Family
    peer: AddressRanges | None = None
    local: AddressRanges | None = None
    entries: tuple[ServiceEntry, ...] = ANY_ENTRIES
    peer_names: tuple[str, ...] = ()

    def meet(self, other: Match) -> Match | None:
        """The conjunction of two matches; None when it matches nothing."""
        if self.family is not other.family:
            return None
        peer = _meet_ranges(self.peer, other.peer)
        local = _meet_ranges(self.local, other.local)
        entries = meet_entries(self.entries, other.entries)
        if (peer is not None and peer.is_empty()) or (local is not None and local.is_empty()) or not entries:
            return None
        names = self.peer_names if other.peer is None else other.peer_names if self.peer is None else ()
        return Match(self.family, peer, local, entries, names)

    def without_peers_of(self, skip: Match) -> Match | bool | None:
        """This minus ``skip`` when ``skip`` differs only in its peers (exact); False when not exact.

        None: nothing is left.
        """
        if not Match(self.family, None, skip.local, skip.entries).covers(
                Match(self.family, None, self.local, self.entries)):
            return False
        if skip.peer is None:
            return None
        mine = self.peer if self.peer is not None else AddressRanges.of(
            [ip_network("0.0.0.0/0" if self.family is Family.V4 else "::/0")])
        left = mine.minus(skip.peer)
        if left.is_empty():
            return None
        return Match(self.family, left, self.local, self.entries, self.peer_names)

    def overlaps(self, other: Match) -> bool:
        return self.meet(other) is not None

    def covers(self, other: Match) -> bool:
        """Everything ``other`` matches, this matches too."""
        if self.family is not other.family:
            return False
        for mine, theirs in ((self.peer, other.peer), (self.local, other.local)):
            if mine is not None and (theirs is None or not theirs.minus(mine).is_empty()):
                return False
        return all(any(_covers_entry(a, b) for a in self.entries) for b in other.entries)


@dataclass(frozen=True)
class RawRule:
    """One parsed rule of a chain, before flattening."""

    kind: Kind
    match: Match | None  # None: the rule can never match (e.g. another family)
    origin: Origin
    text: str
    target: str = ""  # JUMP/GOTO: the chain
    inexpressible: tuple[str, ...] = ()  # conditions Stockade cannot match, ignored in ``match``
    unconditional: bool = False  # no condition at all (an unconditional RETURN ends the chain)
    note: str = ""  # an approximation to report (REJECT as DROP, LOG not carried...)
    note_outcome: Outcome = Outcome.APPROXIMATED


@dataclass(frozen=True)
class OrderedRule:
    """One first-match rule of a flattened base chain."""

    verdict: Verdict
    match: Match
    origin: Origin
    text: str


@dataclass(frozen=True)
class BaseChain:
    """A flattened hook (INPUT or OUTPUT) of one family: ordered rules, then the default verdict."""

    direction: Direction
    family: Family
    default: Verdict
    rules: tuple[OrderedRule, ...]
    origin: Origin
    left_out: tuple[tuple[Match, Origin], ...] = ()  # accepts not carried: still worth probing


@dataclass(frozen=True)
class HostRules:
    """Everything one host's ruleset said, ready for translation."""

    host: str
    chains: tuple[BaseChain, ...]
    findings: tuple[Finding, ...] = ()
    visibility: bool = False  # an inexpressible construct touches this host's own traffic
    families: tuple[Family, ...] = field(default=(Family.V4, Family.V6))


@dataclass
class Flattener:
    """Inline user chains into first-match lists (see the module docstring)."""

    chains: Mapping[str, Sequence[RawRule]]
    host: str
    findings: list[Finding] = field(default_factory=list)
    visibility: bool = False
    left_out: list[tuple[Match, Origin]] = field(default_factory=list)

    def report(self, outcome: Outcome, origin: Origin, construct: str, note: str) -> None:
        self.findings.append(Finding(outcome, origin, self.host, construct, note))
        if outcome is Outcome.NOT_EXPRESSIBLE:
            self.visibility = True

    def flatten(self, chain: str, base: Match) -> list[OrderedRule]:
        out: list[OrderedRule] = []
        self._inline(chain, base, False, [], out, (chain,))
        return out

    def _inline(self, chain: str, ctx: Match, widened: bool, skips: list[Match], out: list[OrderedRule],
                stack: tuple[str, ...]) -> None:
        skips = list(skips)
        for rule in self.chains.get(chain, ()):
            if rule.match is None:
                continue
            here = ctx.meet(rule.match)
            if here is None:
                continue
            wide = widened or bool(rule.inexpressible)
            if rule.inexpressible:
                self.report(Outcome.NOT_EXPRESSIBLE, rule.origin, rule.text,
                            "cannot match " + ", ".join(rule.inexpressible) + _consequence(rule.kind))
            elif rule.note:
                self.report(rule.note_outcome, rule.origin, rule.text, rule.note)
            for s in skips:
                if not here.overlaps(s):
                    continue
                rest = here.without_peers_of(s)
                if rest is False:
                    break
                if rest is None:
                    here = None
                    break
                assert isinstance(rest, Match)
                here = rest
            if here is None:
                continue
            skipped = any(here.overlaps(s) for s in skips)
            if rule.kind is Kind.ACCEPT:
                if wide or skipped:
                    self.left_out.append((here, rule.origin))
                    if skipped and not wide:
                        self.report(Outcome.APPROXIMATED, rule.origin, rule.text,
                                    "an earlier conditional RETURN skips part of this chain: accept left out "
                                    "(narrower)")
                    continue
                out.append(OrderedRule(Verdict.ACCEPT, here, rule.origin, rule.text))
            elif rule.kind is Kind.DROP:
                if skipped:
                    self.report(Outcome.APPROXIMATED, rule.origin, rule.text,
                                "an earlier conditional RETURN skips part of this chain: drop kept for all "
                                "(narrower)")
                out.append(OrderedRule(Verdict.DROP, here, rule.origin, rule.text))
            elif rule.kind in (Kind.JUMP, Kind.GOTO):
                if rule.target in stack or len(stack) >= MAX_DEPTH:
                    self.report(Outcome.BAD_INPUT, rule.origin, rule.text, f"chain loop through {rule.target!r}")
                    continue
                if rule.target not in self.chains:
                    self.report(Outcome.BAD_INPUT, rule.origin, rule.text, f"no chain named {rule.target!r}")
                    continue
                self._inline(rule.target, here, wide, skips, out, (*stack, rule.target))
                if rule.kind is Kind.GOTO:
                    if rule.unconditional and not wide:
                        return
                    skips.append(here)
            elif rule.kind is Kind.RETURN:
                if rule.unconditional and not wide and not skipped:
                    return
                skips.append(here)


def _consequence(kind: Kind) -> str:
    if kind is Kind.ACCEPT:
        return ": the accept is left out (never wider); the host stays in visibility mode"
    if kind is Kind.DROP:
        return ": the drop is kept without that condition (narrower); the host stays in visibility mode"
    if kind is Kind.NOOP:
        return ": ignored; the host stays in visibility mode"
    return ": the condition is ignored (accepts inside are left out, drops kept); the host stays in visibility mode"
