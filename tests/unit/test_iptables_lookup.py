"""The iptables lookup layout walks to the same rule as the list it replaces.

A small interpreter of the rendered chains (the subset the renderer writes: ``-p``, ``!
-p``, ``--dport``, ``-m set``, ``-m icmp``, ``-g``, ``-j RETURN/DROP/NFLOG``, chain end)
follows a packet from ``<prefix>-IN``/``-OUT`` exactly as x_tables does with ``-g``: a
RETURN or a chain end goes back to the caller of the head. Random policies with up to 120
rules on random ports and ranges (so the port trees are several levels deep), in every
tier, mode and direction, with ``any`` and ICMP rules, are checked against a brute-force
precedence walk: override-deny, allow, deny (first rule of the tier in order), default.
The deciding rule must be the same (its id is what NFLOG and ``explain`` report), and so
must the verdict. The kernel test ``tests/kernel/test_iptables_lookup.py`` checks that the
kernel walks the chains the same way.
"""

from __future__ import annotations

import ipaddress
import random
import re
import shlex
from dataclasses import dataclass

import pytest

from stockade.backends.iptables.model import ChainNames, Layout
from stockade.backends.iptables.render import IptablesVariant, ipset_name, render_iptables
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

PREFIX = "STK"
PEERS = 5
TIERS = (Action.OVERRIDE_DENY, Action.ALLOW, Action.DENY)


@dataclass(frozen=True)
class Packet:
    peer_index: int  # the peer address: 10.0.0.<index>; peer set p<k> holds some of them
    proto: str  # "tcp", "udp", "icmp"
    port: int  # TCP/UDP destination port, ICMP type


def _peer_members(rng: random.Random) -> dict[str, frozenset[int]]:
    return {f"p{k}": frozenset(i for i in range(8) if rng.random() < 0.4) for k in range(PEERS)}


def _services(rng: random.Random) -> tuple[ServiceEntry, ...]:
    out: list[ServiceEntry] = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.05:
            out.append(ServiceEntry(Proto.ANY))
        elif kind < 0.12:
            out.append(ServiceEntry(Proto.ICMP, rng.choice((0, 8, 3))))
        elif kind < 0.17:
            out.append(ServiceEntry(rng.choice((Proto.TCP, Proto.UDP))))  # every port
        else:
            lo = rng.randint(1, 200)
            hi = lo + (rng.randint(0, 12) if rng.random() < 0.3 else 0)
            out.append(ServiceEntry(rng.choice((Proto.TCP, Proto.TCP, Proto.UDP)), lo, hi))
    return tuple(out)


def random_policy(rng: random.Random, mode: EnforcementMode) -> tuple[HostPolicy, dict[str, frozenset[int]]]:
    members = _peer_members(rng)
    rules: list[HostRule] = []
    count = rng.choice((1, 5, 20, 60, 120))
    for i in range(count):
        action = rng.choices(TIERS, (1, 6, 2))[0]
        direction = rng.choice((Direction.INBOUND, Direction.OUTBOUND))
        rules.append(HostRule(action, direction, f"ruleset/r/{i}", f"p{rng.randrange(PEERS)}", _services(rng)))
    rules.sort(key=lambda r: TIERS.index(r.action))  # the compiler's precedence order
    sets = []
    for name, idx in members.items():
        v4 = tuple(ipaddress.ip_network(f"10.0.0.{i}") for i in sorted(idx))
        sets += [AddressSet(name, Family.V4, v4), AddressSet(name, Family.V6, ())]
    local = (ipaddress.ip_address("10.9.9.9"),)
    return HostPolicy("h", mode, local, tuple(rules), tuple(sorted(sets)), Failsafe(management=())), members


def _matches(e: ServiceEntry, pkt: Packet) -> bool:
    if e.proto is Proto.ANY:
        return True
    if e.proto.value != pkt.proto:
        return False
    if e.first is None:
        return True
    last = e.last if e.last is not None else e.first
    return e.first <= pkt.port <= last


def expected(hp: HostPolicy, members: dict[str, frozenset[int]], direction: Direction, pkt: Packet) -> str:
    for action in TIERS:
        for r in hp.rules:
            mine = r.action is action and r.direction is direction and pkt.peer_index in members[r.peer]
            if mine and any(_matches(e, pkt) for e in r.services):
                return r.rule_id
    return "default"


# ---- the interpreter ------------------------------------------------------------------------

_SET_RE = re.compile(rf"^{PREFIX}-(p\d+)-v4$")


class Walker:
    def __init__(self, chains: dict[str, tuple[str, ...]], members: dict[str, frozenset[int]]) -> None:
        self.chains = {name: [shlex.split(line) for line in lines] for name, lines in chains.items()}
        self.members = members
        self.steps = 0

    def _line_matches(self, tokens: list[str], pkt: Packet) -> bool:
        i = 0
        while i < len(tokens):
            t = tokens[i]
            if t == "!" and tokens[i + 1] == "-p":
                if pkt.proto == tokens[i + 2]:
                    return False
                i += 3
            elif t == "-p":
                if pkt.proto != tokens[i + 1]:
                    return False
                i += 2
            elif t == "-m":
                i += 2
            elif t == "--dport":
                lo, _, hi = tokens[i + 1].partition(":")
                if not int(lo) <= pkt.port <= int(hi or lo):
                    return False
                i += 2
            elif t == "--icmp-type":
                if pkt.port != int(tokens[i + 1]):
                    return False
                i += 2
            elif t == "--match-set":
                found = _SET_RE.match(tokens[i + 1])
                assert found, tokens
                if pkt.peer_index not in self.members[found.group(1)]:
                    return False
                i += 3
            elif t.startswith(("--hashlimit", "--connbytes")) or t == "--comment":
                i += 2
            elif t in ("-j", "-g"):
                return True
            else:
                raise AssertionError(f"the interpreter does not know {t!r} in {tokens}")
        return True

    def run(self, chain: str, pkt: Packet) -> tuple[str, str]:
        """(verdict, comment of the verdict line) from the head chain ``chain``."""
        current, i = chain, 0
        while True:
            lines = self.chains[current]
            if i >= len(lines):
                return "RETURN", ""  # fell off the end: back to the caller of the head
            tokens = lines[i]
            i += 1
            self.steps += 1
            if not self._line_matches(tokens, pkt):
                continue
            kind, target = tokens[-2], tokens[-1]
            comment = tokens[tokens.index("--comment") + 1] if "--comment" in tokens else ""
            if kind == "-g":
                current, i = target, 0
            elif target in ("RETURN", "DROP"):
                return target, comment
            elif target == "NFLOG":
                continue
            else:
                raise AssertionError(f"unexpected target in {tokens}")


def _chains(hp: HostPolicy) -> dict[str, tuple[str, ...]]:
    art = render_iptables(hp, PREFIX, IptablesVariant.LEGACY)
    out = {}
    for c in art.ruleset(Family.V4).chains:
        cleaned = []
        for line in c.rules:
            # NFLOG arguments are not matches: drop them for the walker
            cleaned.append(re.sub(r" --nflog-prefix \S+( --nflog-group \d+)?$", "", line))
        out[c.name] = tuple(cleaned)
    return out


@pytest.mark.parametrize("mode", [EnforcementMode.FULL, EnforcementMode.SELECTIVE, EnforcementMode.VISIBILITY])
def test_lookup_walk_decides_by_the_same_rule_as_the_list(mode: EnforcementMode) -> None:
    rng = random.Random(f"iptables-lookup-{mode.value}")
    names = ChainNames(PREFIX)
    deep = 0
    for _ in range(40):
        hp, members = random_policy(rng, mode)
        chains = _chains(hp)
        assert all(names.owns(n) for n in chains), [n for n in chains if not names.owns(n)]
        assert all(len(n) <= 28 for n in chains)
        deep += sum(1 for n in chains if re.search(r"-[tu][1-9]\d*$", n) is not None)
        walker = Walker(chains, members)
        for _ in range(100):
            pkt = Packet(rng.randrange(8), rng.choice(("tcp", "tcp", "udp", "icmp")), rng.randint(0, 210))
            if pkt.proto == "icmp":
                pkt = Packet(pkt.peer_index, "icmp", rng.choice((0, 3, 8, 11)))
            for direction, head in ((Direction.INBOUND, names.inbound), (Direction.OUTBOUND, names.outbound)):
                verdict, comment = walker.run(head, pkt)
                want = expected(hp, members, direction, pkt)
                assert (comment or "default") == want or (want == "default" and comment == ""), (pkt, direction)
                if want == "default":
                    full = mode is EnforcementMode.FULL
                    assert verdict == ("DROP" if full else "RETURN"), (pkt, direction)
                else:
                    rule = next(r for r in hp.rules if r.rule_id == want)
                    blocked = rule.action is not Action.ALLOW and mode is not EnforcementMode.VISIBILITY
                    assert verdict == ("DROP" if blocked else "RETURN"), (pkt, direction, want)
    assert deep > 50  # the trees were several levels deep, not single leaves


def test_a_packet_walks_a_few_lines_whatever_the_rule_count() -> None:
    """1,000 allow rules on distinct ports: the last one is reached in ~40 lines (index of ~12, ~11, 8 x 2)."""
    rules = tuple(
        HostRule(Action.ALLOW, Direction.INBOUND, f"ruleset/b/{i}", "p0", (ServiceEntry(Proto.TCP, 1000 + i),))
        for i in range(1000)
    )
    sets = (AddressSet("p0", Family.V4, (ipaddress.ip_network("10.0.0.1"),)), AddressSet("p0", Family.V6, ()))
    hp = HostPolicy("h", EnforcementMode.FULL, (), rules, sets, Failsafe(management=()))
    chains = _chains(hp)
    walker = Walker(chains, {"p0": frozenset({1})})
    assert walker.run(ChainNames(PREFIX).inbound, Packet(1, "tcp", 1999)) == ("RETURN", "ruleset/b/999")
    assert walker.steps <= 48, walker.steps  # the list layout: 1,000+ lines
    listed = render_iptables(hp, PREFIX, IptablesVariant.LEGACY, layout=Layout.LIST)
    assert len(listed.ruleset(Family.V4).chain(ChainNames(PREFIX).inbound).rules) > 1000  # what it replaces


def test_set_names_in_lookup_lines_are_the_peer_sets() -> None:
    rng = random.Random(5)
    hp, _ = random_policy(rng, EnforcementMode.FULL)
    sets = {ipset_name(PREFIX, s.name, s.family) for s in hp.sets}
    text = "\n".join(line for lines in _chains(hp).values() for line in lines)
    assert set(re.findall(r"--match-set (\S+) ", text)) <= sets


def test_only_chains_of_our_layout_are_ours() -> None:
    """A foreign chain that merely starts with our prefix is never parsed, flushed or deleted."""
    names = ChainNames("STOCKADE")
    for name in ("STOCKADE-IN", "STOCKADE-INPUT", "STOCKADE-IN-a", "STOCKADE-OUT-d-u12", "STOCKADE-IN-end"):
        assert names.owns(name), name
    foreign = ("STOCKADE-LOOKALIKE", "STOCKADE-IN-x", "STOCKADE-IN-a-t", "STOCKADEX-IN-a", "DOCKER")
    for name in foreign:
        assert not names.owns(name), name


def test_hashlimit_table_name_fits_the_kernel() -> None:
    """xt_hashlimit keeps 15 characters of a table name; the longest prefix still fits."""
    hp, _ = random_policy(random.Random(3), EnforcementMode.FULL)
    art = render_iptables(hp, "ABCDEFGHIJKL", IptablesVariant.LEGACY)
    text = "\n".join(r for c in art.ruleset(Family.V4).chains for r in c.rules)
    names = set(re.findall(r"--hashlimit-name (\S+)", text))
    assert names and all(len(n) <= 15 for n in names), names
