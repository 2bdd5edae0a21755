"""Parse ``iptables-save`` / ``ip6tables-save`` and ``ipset save`` into the prover's IR, strictly.

Pure. The whole ``filter`` table is read, not only Stockade's chains: an allow in Stockade's
chains is a ``RETURN`` to the built-in ``INPUT`` / ``OUTPUT`` chain, whose other rules and
policy still decide, so the proof covers every rule of those chains (foreign ones included).
``FORWARD`` is outside the host proof; rules in the other tables (raw, mangle, nat, security)
are listed in the notes as an assumption (the proof says nothing about them).

Understood options: ``-s``/``-d`` (a CIDR), ``-p``, ``-i``/``-o lo``, ``-m tcp|udp``
``--sport``/``--dport``/``--tcp-flags``, ``-m multiport --sports|--dports``, ``-m icmp
--icmp-type``, ``-m icmp6 --icmpv6-type`` (type only, no code), ``-m set --match-set NAME
src|dst`` (one dimension; ``hash:net`` / ``hash:ip`` sets), ``-m conntrack --ctstate``,
``-m state --state``, ``-m comment``, each negatable with ``!`` where iptables allows; targets
``ACCEPT``, ``DROP``, ``REJECT`` (a drop), ``RETURN``, ``NFLOG`` / ``LOG`` (no verdict), a
user chain (``-j``), ``-g``; ``-m connbytes`` / ``-m hashlimit`` only on rules without a verdict
(the log-once rules: whatever they match decides nothing). Encrypted rules' steering (the
WireGuard interface, marks, the mangle table's OUTPUT/POSTROUTING) when the interface is known:
:mod:`.ipt_tunnel`. Anything else raises :class:`~stockade.errors.UnmodelledConstructError`.

Speed (session 7): the lookup layout writes ~83,000 rule lines per family at 1,000 rules, but of
few distinct parts (`` -m tcp --dport 53``, ``-m set --match-set NAME src``, a comment ...). A
line is cut before each `` -m `` and each part parsed once per distinct text
(:func:`_parse_memo`, 2.3 -> 0.55 s CPU per family); any line where cutting could read
differently is parsed whole, and the whole-line parse stays as the reference
(``whole_lines=True``) a test holds the memo equal to. The ipsets are read over netlink
(:mod:`.ipset_readback`); :func:`parse_ipset_save` is the reference it is tested against.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice, repeat
from operator import add, itemgetter, lt

from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family, Range, merge_ranges
from stockade.verify import ipt_tunnel
from stockade.verify.loaded import (
    TCP_FLAG_BITS,
    Addr,
    AddressSet,
    AddrIn,
    Chain,
    CtState,
    FamilyRules,
    Field,
    HookName,
    IntIn,
    Kind,
    LoadedRuleset,
    Loopback,
    Match,
    Rule,
    TcpFlags,
    Verdict,
)

_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132, "gre": 47, "esp": 50, "ah": 51}
# matches on per-connection counts or rates: the flow-log rules use them to log once; accepted
# only on rules without a verdict (NFLOG), where what they match cannot change any verdict
_STATEFUL = {
    "connbytes": {"--connbytes", "--connbytes-dir", "--connbytes-mode"},
    "hashlimit": {
        "--hashlimit-upto", "--hashlimit-above", "--hashlimit-burst", "--hashlimit-mode", "--hashlimit-srcmask",
        "--hashlimit-dstmask", "--hashlimit-name", "--hashlimit-htable-size", "--hashlimit-htable-max",
        "--hashlimit-htable-expire", "--hashlimit-htable-gcinterval",
    },
}
_BUILTIN = {"INPUT": HookName.INPUT, "OUTPUT": HookName.OUTPUT}
_NO_VERDICT_TARGETS = {
    "NFLOG": {"--nflog-prefix", "--nflog-group", "--nflog-range", "--nflog-size", "--nflog-threshold"},
    "LOG": {"--log-prefix", "--log-level", "--log-tcp-sequence", "--log-tcp-options", "--log-ip-options", "--log-uid"},
}

# anything but printable ASCII, a single quote or a backslash: shlex.split decides
_QUOTING = re.compile(r"[^\x20-\x7e]|['\\]")


def _tokens(line: str) -> list[str]:
    """``shlex.split(line)``, without shlex where it cannot differ (5x the whole parse at
    1,000 rules): printable ASCII whose double-quoted parts are whole tokens (a space or the
    line's end on both sides), as ``iptables-save`` writes comments and log prefixes."""
    if _QUOTING.search(line):
        return shlex.split(line)
    parts = line.split('"')
    if len(parts) % 2 == 0:
        return shlex.split(line)  # an open quote: shlex raises
    out: list[str] = []
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if i % 2:
            before, after = parts[i - 1], parts[i + 1]
            if not ((i - 1 == 0 and before == "") or before.endswith(" ")):
                return shlex.split(line)
            if not ((i + 1 == last and after == "") or after.startswith(" ")):
                return shlex.split(line)
            out.append(part)
        else:
            out.extend(t for t in part.split(" ") if t)
    return out


def parse_ipset_save(text: str) -> dict[str, AddressSet]:
    """Sets of ``ipset save``: ``hash:net`` / ``hash:ip`` of inet/inet6; other types are refused
    when a rule uses them (kept out of the result). Members through ``inet_pton`` (100k lines
    through ``ipaddress`` cost seconds)."""
    kinds: dict[str, Family | None] = {}
    members: dict[str, list[Range]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "add" and len(parts) >= 3:
            name = parts[1]
            family = kinds.get(name)
            if family is None:
                continue  # a set of a type we do not model (refused if a rule uses it)
            if len(parts) > 3:  # element options (nomatch, timeout ...): not modelled
                kinds[name] = None
                continue
            members[name].append(_element(parts[2], family, name))
        elif parts[0] == "create" and len(parts) >= 3:
            name, typ = parts[1], parts[2]
            fam = parts[parts.index("family") + 1] if "family" in parts else "inet"
            ok = typ in ("hash:net", "hash:ip") and fam in ("inet", "inet6") and "nomatch" not in parts
            kinds[name] = (Family.V4 if fam == "inet" else Family.V6) if ok else None
            members[name] = []
        else:
            raise UnmodelledConstructError("ipset save", f"line {line!r}")
    return {n: AddressSet(f, merged_ranges(members[n])) for n, f in kinds.items() if f is not None}


def merged_ranges(ranges: list[Range]) -> tuple[Range, ...]:
    """:func:`merge_ranges`, with C-level iterators when the sorted ranges are already apart (no
    overlap, no adjacency: a set of single peers, the common case; 500k members at 1,000 rules
    x 100,000 peers, where the Python merge loop cost ~0.8 s)."""
    ranges.sort()
    his = map(add, map(itemgetter(1), ranges), repeat(1))
    if all(map(lt, his, map(itemgetter(0), islice(ranges, 1, None)))):
        return tuple(ranges)
    return merge_ranges(ranges)


def _element(text: str, family: Family, name: str) -> Range:
    addr, slash, plen = text.partition("/")
    bits = 32 if family is Family.V4 else 128
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET if bits == 32 else socket.AF_INET6, addr), "big")
        prefix = int(plen) if slash else bits
    except (OSError, ValueError) as exc:
        raise UnmodelledConstructError(f"ipset {name}", f"element {text!r}") from exc
    if not 0 <= prefix <= bits:
        raise UnmodelledConstructError(f"ipset {name}", f"element {text!r}")
    host = (1 << (bits - prefix)) - 1
    lo = value & ~host
    return lo, lo | host


_merged = merged_ranges


@dataclass(frozen=True)
class _Part:
    """What one part of a rule line says: its matches, its target (None: none), the stateful
    module it loaded ("" none) and whether it ended on a dangling ``!``."""

    matches: tuple[Match, ...]
    verdict: Verdict | None
    stateful: str
    dangling_not: bool
    sets: tuple[tuple[str, AddressSet], ...]  # the address sets its matches name


class _RuleParser:
    def __init__(self, family: Family, ipsets: dict[str, AddressSet], where: str,
                 wg_interface: str | None = None, unmodelled: Mapping[str, str] | None = None) -> None:
        self.unmodelled = unmodelled or {}
        self.wg_interface = wg_interface  # the tunnel of encrypted rules (None: its options are refused)
        self.family = family
        self.ipsets = ipsets
        self.sets: dict[str, AddressSet] = {}  # the sets named by the part being parsed
        self.where = where

    def refuse(self, what: str) -> UnmodelledConstructError:
        return UnmodelledConstructError(self.where, what)

    def literal(self, text: str) -> str:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise self.refuse(f"address {text!r}") from exc
        if net.version != self.family.value:
            raise self.refuse(f"address {text!r} of the other family")
        name = f"literal:{net}"
        self.sets[name] = AddressSet(self.family, ((int(net.network_address), int(net.broadcast_address)),))
        return name

    def ports(self, text: str, multi: bool) -> tuple[Range, ...]:
        out: list[Range] = []
        for part in text.split(",") if multi else [text]:
            lo_s, _, hi_s = part.partition(":")
            if not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
                raise self.refuse(f"port {part!r}")
            lo, hi = int(lo_s), int(hi_s or lo_s)
            if not 0 <= lo <= hi <= 65535:
                raise self.refuse(f"port {part!r}")
            out.append((lo, hi))
        return merge_ranges(out)

    def flags(self, text: str) -> int:
        bits = 0
        for name in text.lower().split(","):
            if name == "all":
                bits |= 0xFF
            elif name == "none":
                continue
            elif name in TCP_FLAG_BITS:
                bits |= TCP_FLAG_BITS[name]
            else:
                raise self.refuse(f"tcp flag {name!r}")
        return bits

    def parse(self, tokens: list[str]) -> tuple[list[Match], Verdict]:
        return self.finish([self.parse_part(tokens)])

    def finish(self, parts: list[_Part]) -> tuple[list[Match], Verdict]:
        """One rule from the parts of its line, in order (:func:`_split_line`)."""
        matches = [m for p in parts for m in p.matches]
        verdict = parts[-1].verdict or Verdict(Kind.CONTINUE)
        stateful = next((p.stateful for p in parts if p.stateful), "")
        if stateful:
            if verdict.kind is not Kind.CONTINUE:
                raise self.refuse(f"match module {stateful!r} deciding a verdict (counts and rates are not modelled)")
            return [], verdict  # a log-only rule: whatever it matches, it decides nothing
        return matches, verdict

    def parse_part(self, tokens: list[str]) -> _Part:
        matches: list[Match] = []
        verdict: Verdict | None = None
        self.sets = {}
        module = ""
        stateful = ""
        i = 0
        neg = False

        def take() -> str:
            nonlocal i
            if i >= len(tokens):
                raise self.refuse("option without value")
            i += 1
            return tokens[i - 1]

        while i < len(tokens):
            tok = take()
            if tok == "!":
                neg = True
                continue
            if tok in ("-s", "-d"):
                matches.append(AddrIn(Addr.SADDR if tok == "-s" else Addr.DADDR, self.family, self.literal(take()), neg))  # noqa: E501
            elif tok == "-p":
                p = take()
                if p == "all" and not neg:
                    pass
                else:
                    number = _PROTOS.get(p, int(p) if p.isdigit() and int(p) < 256 else -1)
                    if number < 0:
                        raise self.refuse(f"protocol {p!r}")
                    matches.append(IntIn(Field.L4PROTO, ((number, number),), neg))
            elif tok in ("-i", "-o") and self.wg_interface is not None and tokens[i:i + 1] == [self.wg_interface]:
                take()
                matches.append(ipt_tunnel.interface_match(tok, neg))
            elif tok == "--mark" and module in ("mark", "connmark") and self.wg_interface is not None:
                matches.append(ipt_tunnel.mark_match(module, take(), neg, self.where))
            elif tok in ("-i", "-o"):
                iface = take()
                if iface != "lo":
                    raise self.refuse(f"interface {iface!r} (only lo is modelled)")
                matches.append(Loopback(HookName.INPUT if tok == "-i" else HookName.OUTPUT, neg))
            elif tok == "-m":
                module = take()
                if module in _STATEFUL:
                    stateful = module
                elif module in ("mark", "connmark") and self.wg_interface is not None:
                    pass
                elif module not in ("tcp", "udp", "multiport", "icmp", "icmp6", "set", "conntrack", "state", "comment"):
                    raise self.refuse(f"match module {module!r}")
            elif module in _STATEFUL and tok in _STATEFUL[module]:
                take()  # a packet/byte count or rate: only allowed on rules without a verdict (below)
            elif tok in ("--dport", "--sport") and module in ("tcp", "udp"):
                field = Field.DPORT if tok == "--dport" else Field.SPORT
                matches.append(IntIn(field, self.ports(take(), False), neg))
            elif tok in ("--dports", "--sports") and module == "multiport":
                field = Field.DPORT if tok == "--dports" else Field.SPORT
                matches.append(IntIn(field, self.ports(take(), True), neg))
            elif tok == "--tcp-flags" and module == "tcp":
                mask = self.flags(take())
                matches.append(TcpFlags(mask, self.flags(take()), neg))
            elif tok in ("--icmp-type", "--icmpv6-type") and module in ("icmp", "icmp6"):
                t = take()
                if not t.isdigit() or int(t) > 255:
                    raise self.refuse(f"icmp type {t!r} (a type number without code is modelled)")
                matches.append(IntIn(Field.ICMP_TYPE, ((int(t), int(t)),), neg))
            elif tok == "--match-set" and module == "set":
                name, dims = take(), take()
                if dims not in ("src", "dst"):
                    raise self.refuse(f"set dimensions {dims!r}")
                if name not in self.ipsets:
                    why = self.unmodelled.get(name, "missing or of an unmodelled type")
                    raise self.refuse(f"ipset {name!r} ({why})")
                if self.ipsets[name].family is not self.family:
                    raise self.refuse(f"ipset {name!r} of the other family")
                self.sets[name] = self.ipsets[name]
                matches.append(AddrIn(Addr.SADDR if dims == "src" else Addr.DADDR, self.family, name, neg))
            elif tok in ("--ctstate", "--state") and module in ("conntrack", "state"):
                states = frozenset(s.lower() for s in take().split(","))
                if not states <= {"new", "established", "related", "invalid", "untracked"}:
                    raise self.refuse(f"ct state {sorted(states)}")
                matches.append(CtState(states, neg))
            elif tok == "--comment" and module == "comment":
                take()
            elif tok in ("-j", "-g"):
                verdict, i = self.target(tok, tokens, i)
            else:
                raise self.refuse(f"option {tok!r}")
            neg = False
        return _Part(tuple(matches), verdict, stateful, neg, tuple(self.sets.items()))

    def target(self, flag: str, tokens: list[str], i: int) -> tuple[Verdict, int]:
        if i >= len(tokens):
            raise self.refuse("target missing")
        name = tokens[i]
        i += 1
        if flag == "-g":
            return Verdict(Kind.GOTO, name), i
        if name in _NO_VERDICT_TARGETS:
            allowed = _NO_VERDICT_TARGETS[name]
            while i < len(tokens):
                if tokens[i] not in allowed:
                    raise self.refuse(f"{name} option {tokens[i]!r}")
                i += 1 if tokens[i] in ("--log-tcp-sequence", "--log-tcp-options", "--log-ip-options", "--log-uid") else 2  # noqa: E501
            return Verdict(Kind.CONTINUE), i
        if self.wg_interface is not None:
            steering = ipt_tunnel.tunnel_target(name, tokens, i, self.where)
            if steering is not None:
                return steering
        if name == "REJECT":
            if i < len(tokens) and tokens[i] == "--reject-with":
                i += 2
            return Verdict(Kind.DROP), i
        simple = {"ACCEPT": Kind.ACCEPT, "DROP": Kind.DROP, "RETURN": Kind.RETURN}
        if name in simple:
            return Verdict(simple[name]), i
        return Verdict(Kind.JUMP, name), i  # a user chain, or refused below as an unknown target


def _split_line(line: str) -> tuple[str, list[str]] | None:
    """``-A CHAIN body`` as the chain and the body's parts, each starting at a `` -m `` (a module
    and its options); None where splitting could differ from :func:`_tokens` (a quoted `` -m ``,
    quoting :func:`_tokens` leaves to shlex)."""
    head = line.split(" ", 2)
    if len(head) < 3 or head[0] != "-A" or '"' in head[1] or not (line.isascii() and line.isprintable()):
        return None
    if "'" in line or "\\" in line:  # quoting that _tokens leaves to shlex
        return None
    body = head[2]
    if '"' in body and " -m " in '"'.join(body.split('"')[1::2]):
        return None
    first, *rest = body.split(" -m ")
    return head[1], [first, *("-m " + r for r in rest)]


_Parsed = tuple[str, list[_Part], list[Match], Verdict]  # chain, parts, the rule's matches and verdict


def _parse_memo(line: str, parser: _RuleParser, memo: dict[str, _Part]) -> _Parsed | None:
    """The chain and parts of a rule line, each part parsed once per distinct text (at 1,000 rules
    the lookup layout writes ~83,000 lines of ~4,000 distinct shapes, from few distinct parts).
    The same as parsing the whole line (:meth:`_RuleParser.parse_part`): a part ends where the
    next ``-m`` starts a module, so only a part that took a value it did not have (refused), named
    a target before the last part, or ended in a dangling ``!`` could read differently: those, and
    any refusal, give None and the line is parsed whole (its error carries the line number)."""
    split = _split_line(line)
    if split is None:
        return None
    chain, texts = split
    parts: list[_Part] = []
    try:
        for text in texts:
            part = memo.get(text)
            if part is None:
                part = memo[text] = parser.parse_part(_tokens(text))
            parts.append(part)
    except (UnmodelledConstructError, ValueError):
        return None
    if any(p.verdict is not None or p.dangling_not for p in parts[:-1]):
        return None
    try:
        matches, verdict = parser.finish(parts)
    except UnmodelledConstructError:
        return None
    return chain, parts, matches, verdict


def parse_filter(save_text: str, family: Family, ipsets: dict[str, AddressSet],
                 wg_interface: str | None = None, *, whole_lines: bool = False,
                 unmodelled: Mapping[str, str] | None = None) -> tuple[FamilyRules, list[str]]:
    """The filter table of one ``iptables-save`` output as the IR, and notes on the rest
    (``wg_interface``: the mangle table's steering is modelled too, see :mod:`.ipt_tunnel`).
    Rule lines are parsed per part, once per distinct part (:func:`_parse_memo`); ``whole_lines``
    parses every line whole instead (the reference the memo is tested against). ``unmodelled``:
    why a set is missing from ``ipsets`` (named in the refusal of a rule that uses it)."""
    chains: dict[str, list[Rule]] = {}
    policies: dict[str, Kind | None] = {}
    sets: dict[str, AddressSet] = {}
    notes: list[str] = []
    table = ""
    fam = family.name
    shared = _RuleParser(family, ipsets, f"{fam} filter", wg_interface, unmodelled)  # for the memo: no line number
    memo: dict[str, _Part] = {}
    for lineno, raw in enumerate(save_text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if line == "COMMIT":
            continue
        prefix = ""
        if table == "mangle" and wg_interface is not None:
            prefix = ipt_tunnel.MANGLE
            if line.startswith("-A") and line.split()[1] in ("PREROUTING", "INPUT", "FORWARD"):
                notes.append(f"{family.name} table mangle {line.split()[1]} has rules (not modelled)")
                continue
        elif table != "filter":
            if line.startswith("-A"):
                notes.append(f"{family.name} table {table} has rules (not modelled: assumed not to drop or rewrite)")
            continue
        where = f"{fam} filter line {lineno}"
        if line.startswith(":"):
            name, policy = line[1:].split()[:2]
            name = prefix + name
            chains.setdefault(name, [])
            policies[name] = {"ACCEPT": Kind.ACCEPT, "DROP": Kind.DROP}.get(policy)
            if policy != "-" and policies[name] is None:
                raise UnmodelledConstructError(where, f"chain policy {policy!r}")
            continue
        fast = _parse_memo(line, shared, memo) if line.startswith("-A ") and not whole_lines else None
        if fast is None:  # the line as a whole, every refusal from here with its line number
            try:
                tokens = _tokens(line)
            except ValueError as exc:
                raise UnmodelledConstructError(where, f"unparsable line {line!r}") from exc
            if len(tokens) < 2 or tokens[0] != "-A":
                raise UnmodelledConstructError(where, f"line {line!r}")
            parser = _RuleParser(family, ipsets, f"{where} ({prefix + tokens[1]})", wg_interface, unmodelled)
            whole = [parser.parse_part(tokens[2:])]
            fast = (tokens[1], whole, *parser.finish(whole))
        name, parts, matches, verdict = fast
        chain = prefix + name
        for part in parts:
            if part.sets:
                sets.update(part.sets)
        if prefix and verdict.kind in (Kind.JUMP, Kind.GOTO):
            verdict = Verdict(verdict.kind, prefix + verdict.target)
        chains.setdefault(chain, []).append(Rule(tuple(matches), verdict))
    for name, rules in chains.items():
        for r in rules:
            if r.verdict.kind in (Kind.JUMP, Kind.GOTO) and r.verdict.target not in chains:
                raise UnmodelledConstructError(f"chain {name}", f"target {r.verdict.target!r} (no such chain)")
    if chains.get("FORWARD"):
        notes.append(f"{family.name} FORWARD has rules: not part of the host proof")
    built = {n: Chain(n, tuple(rs), policies.get(n)) for n, rs in chains.items()}
    hooks: dict[HookName, tuple[str, ...]] = {h: (n,) for n, h in _BUILTIN.items() if n in built}
    if wg_interface is not None:
        ipt_tunnel.check_chains(built)
        mangle = [ipt_tunnel.MANGLE + h for h in ipt_tunnel.MANGLE_HOOKS if built.get(ipt_tunnel.MANGLE + h)]
        if mangle:  # mangle OUTPUT before the filter's OUTPUT, mangle POSTROUTING after it
            hooks[HookName.OUTPUT] = tuple(n for n in (mangle[0] if mangle[0].endswith("OUTPUT") else "",
                                                       *hooks.get(HookName.OUTPUT, ()),
                                                       *(m for m in mangle if m.endswith("POSTROUTING"))) if n)
    return FamilyRules(family, built, hooks, sets), sorted(set(notes))


def parse_iptables(save_v4: str, save_v6: str, ipset_save: str, *, variant: str = "",
                   wg_interface: str | None = None) -> LoadedRuleset:
    """Both families' filter tables and the ipsets as one read-back (``wg_interface``: the
    WireGuard interface of encrypted rules; their mangle steering is then modelled)."""
    return parse_iptables_sets(save_v4, save_v6, parse_ipset_save(ipset_save), variant=variant,
                               wg_interface=wg_interface)


def parse_iptables_sets(save_v4: str, save_v6: str, ipsets: dict[str, AddressSet], *, variant: str = "",
                        wg_interface: str | None = None, unmodelled: Mapping[str, str] | None = None,
                        whole_lines: bool = False) -> LoadedRuleset:
    """:func:`parse_iptables` with the ipsets already read (over netlink: :mod:`.ipset_readback`)."""
    v4, n4 = parse_filter(save_v4, Family.V4, ipsets, wg_interface, whole_lines=whole_lines, unmodelled=unmodelled)
    v6, n6 = parse_filter(save_v6, Family.V6, ipsets, wg_interface, whole_lines=whole_lines, unmodelled=unmodelled)
    name = f"iptables-{variant}" if variant else "iptables"
    return LoadedRuleset(name, True, (v4, v6), tuple(n4 + n6))
