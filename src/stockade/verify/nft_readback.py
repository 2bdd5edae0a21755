"""Parse ``nft -j list table inet <table>`` into the prover's IR (:mod:`.loaded`), strictly.

Pure: it takes the JSON objects (as :meth:`NftRunner.list_table_json` returns them) and never
runs anything. Every expression, statement, set type and chain kind it meets is either
translated exactly or refused with :class:`~stockade.errors.UnmodelledConstructError`
naming the rule; nothing is skipped. What is understood:

* sets of ``ipv4_addr`` / ``ipv6_addr`` (elements: addresses, prefixes, ranges), and
  concatenated sets, which are taken as *dynamic* (their contents are datapath state: a
  lookup in them is an unknown bit the proof quantifies over, and ``add @set`` is allowed
  into them only);
* verdict maps typed ``inet_proto . inet_service`` looked up by ``meta l4proto . th dport``
  (TCP and UDP elements only);
* base chains of type ``filter`` at ``input`` / ``output`` (``prerouting`` / ``postrouting``
  count for the same direction; ``forward`` is read but outside the host proof, see notes);
* matches on ``ct state``, ``meta l4proto|nfproto|iif|oif|iifname|oifname`` (interface
  ``lo`` only), ``ip``/``ip6`` ``saddr|daddr``, ``tcp``/``udp`` ``sport|dport``,
  ``icmp``/``icmpv6 type``, ``tcp flags`` under a mask, with ``==``, ``!=``, ``in`` and the
  integer comparisons; statements ``counter``, ``log`` (no verdict) and the verdicts
  ``accept``, ``drop``, ``reject`` (a drop), ``return``, ``jump``, ``goto``, ``vmap``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from typing import Any

from stockade.backends.nftables.render import ICMP_TYPE_NAMES, ICMPV6_TYPE_NAMES
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family, Range, merge_ranges
from stockade.verify.loaded import (
    CT_STATES,
    TCP_FLAG_BITS,
    Addr,
    AddressSet,
    AddrIn,
    Chain,
    CtState,
    FamilyIs,
    FamilyRules,
    Field,
    HookName,
    InDynamicSet,
    IntIn,
    Kind,
    LoadedRuleset,
    Loopback,
    MapElement,
    Match,
    Rule,
    TcpFlags,
    Tunnel,
    Verdict,
)

L4_NUMBERS = {
    "tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132, "dccp": 33,
    "gre": 47, "esp": 50, "ah": 51, "udplite": 136,
}  # fmt: skip
_ICMP_BY_NAME = {v: k for k, v in ICMP_TYPE_NAMES.items()}
_ICMPV6_BY_NAME = {v: k for k, v in ICMPV6_TYPE_NAMES.items()}
_HOOKS = {"input": HookName.INPUT, "prerouting": HookName.INPUT, "output": HookName.OUTPUT, "postrouting": HookName.OUTPUT}  # noqa: E501
_NO_VERDICT = ("counter", "log")
_VERDICTS = {"accept": Kind.ACCEPT, "drop": Kind.DROP, "reject": Kind.DROP, "return": Kind.RETURN}


class _Parser:
    def __init__(self, table: str) -> None:
        self.table = table
        self.sets: dict[str, AddressSet] = {}
        self.set_types: dict[str, object] = {}
        self.dynamic: set[str] = set()
        self.maps: dict[str, tuple[MapElement, ...]] = {}
        self.chains: dict[str, list[Rule]] = {}
        self.policies: dict[str, Kind | None] = {}
        self.hooks: dict[HookName, list[tuple[int, str]]] = {HookName.INPUT: [], HookName.OUTPUT: []}
        self.notes: list[str] = []
        self.route_chains: set[str] = set()  # ``type route`` output chains: a mark set there re-routes
        self.postrouting: set[str] = set()  # base chains at postrouting (the output interface is final)

    # ---- objects -------------------------------------------------------------------
    def item(self, obj: dict[str, Any]) -> None:
        if len(obj) != 1:
            raise UnmodelledConstructError(self.table, f"object {sorted(obj)}")
        kind, body = next(iter(obj.items()))
        if kind == "metainfo":
            return
        if kind == "table":
            if body.get("name") != self.table or body.get("family") != "inet":
                raise UnmodelledConstructError(self.table, f"table {body.get('family')} {body.get('name')}")
            return
        if body.get("table") != self.table or body.get("family") != "inet":
            raise UnmodelledConstructError(self.table, f"{kind} of another table")
        if kind == "set":
            self.set(body)
        elif kind == "map":
            self.map(body)
        elif kind == "chain":
            self.chain(body)
        elif kind == "rule":
            self.rule(body)
        else:
            raise UnmodelledConstructError(self.table, f"object kind {kind!r}")

    def set(self, body: dict[str, Any]) -> None:
        name = str(body["name"])
        typ = body.get("type")
        where = f"set {name}"
        self.set_types[name] = typ
        if isinstance(typ, list):  # concatenation: flow-log style, filled by the datapath
            self.dynamic.add(name)
            return
        if typ not in ("ipv4_addr", "ipv6_addr"):
            raise UnmodelledConstructError(where, f"set type {typ!r}")
        family = Family.V4 if typ == "ipv4_addr" else Family.V6
        ranges = [_element_range(e, family, where) for e in body.get("elem", ())]
        self.sets[name] = AddressSet(family, merge_ranges(ranges))

    def map(self, body: dict[str, Any]) -> None:
        name = str(body["name"])
        where = f"map {name}"
        if body.get("type") != ["inet_proto", "inet_service"] or body.get("map") != "verdict":
            raise UnmodelledConstructError(where, f"map type {body.get('type')!r} : {body.get('map')!r}")
        elems: list[MapElement] = []
        for key, value in body.get("elem", ()):
            parts = key.get("concat") if isinstance(key, dict) else None
            if not parts or len(parts) != 2:
                raise UnmodelledConstructError(where, f"map key {key!r}")
            proto = _l4(parts[0], where)
            if proto not in (6, 17):
                raise UnmodelledConstructError(where, f"dispatch on protocol {proto} (th dport is modelled for tcp/udp)")  # noqa: E501
            lo, hi = _int_range(parts[1], where)
            elems.append(MapElement(proto, lo, hi, _verdict_of(value, where)))
        self.maps[name] = tuple(elems)

    def chain(self, body: dict[str, Any]) -> None:
        name = str(body["name"])
        self.chains.setdefault(name, [])
        hook = body.get("hook")
        if hook is None:
            self.policies[name] = None
            return
        if body.get("type") == "route" and hook == "output":
            self.route_chains.add(name)
        elif body.get("type") != "filter":
            raise UnmodelledConstructError(f"chain {name}", f"base chain type {body.get('type')!r}")
        if hook == "postrouting":
            self.postrouting.add(name)
        policy = {"accept": Kind.ACCEPT, "drop": Kind.DROP}.get(str(body.get("policy", "accept")))
        if policy is None:
            raise UnmodelledConstructError(f"chain {name}", f"policy {body.get('policy')!r}")
        self.policies[name] = policy
        if hook == "forward":
            self.notes.append(f"base chain {name} (forward hook) is not part of the host proof")
            return
        if hook not in _HOOKS:
            raise UnmodelledConstructError(f"chain {name}", f"hook {hook!r}")
        self.hooks[_HOOKS[hook]].append((int(body.get("prio", 0)), name))

    def rule(self, body: dict[str, Any]) -> None:
        chain = str(body["chain"])
        where = f"chain {chain} rule {body.get('handle')} ({body.get('comment', '')})"
        matches: list[Match] = []
        verdict: Verdict | None = None
        for expr in body.get("expr", ()):
            if verdict is not None:
                raise UnmodelledConstructError(where, "statement after the verdict")
            (key, value), = expr.items()
            if key == "match":
                matches.extend(self.match(value, where))
            elif key in _NO_VERDICT:
                continue
            elif key == "set":
                target = str(value.get("set", "")).lstrip("@")
                if value.get("op") not in ("add", "update") or target not in self.dynamic:
                    raise UnmodelledConstructError(where, f"set statement {value.get('op')} @{target}")
            elif key == "vmap":
                self.check_dispatch_key(value.get("key"), where)
                data = str(value.get("data", ""))
                if not data.startswith("@"):
                    raise UnmodelledConstructError(where, "anonymous verdict map")
                verdict = Verdict(Kind.VMAP, data[1:])
            else:
                verdict = _verdict_of(expr, where)
        self.chains.setdefault(chain, []).append(
            Rule(tuple(matches), verdict or Verdict(Kind.CONTINUE), str(body.get("comment", "")))
        )

    @staticmethod
    def check_dispatch_key(key: Any, where: str) -> None:
        want = {"concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}
        if key != want:
            raise UnmodelledConstructError(where, f"verdict map key {key!r}")

    # ---- matches ----------------------------------------------------------------------
    def match(self, m: dict[str, Any], where: str) -> list[Match]:
        op = m.get("op")
        if op not in ("==", "!=", "in", "<", ">", "<=", ">="):
            raise UnmodelledConstructError(where, f"operator {op!r}")
        left, right = m.get("left"), m.get("right")
        negate = op == "!="
        if isinstance(left, dict) and "ct" in left and left["ct"] == {"key": "state"} and op in ("==", "!=", "in"):
            states = frozenset(_names(right, where))
            if not states <= set(CT_STATES):
                raise UnmodelledConstructError(where, f"ct state {sorted(states)}")
            return [CtState(states, negate)]
        if isinstance(left, dict) and "meta" in left:
            return self.meta(left["meta"].get("key"), op, right, negate, where)
        if isinstance(left, dict) and "payload" in left:
            return self.payload(left["payload"], op, right, negate, where)
        if isinstance(left, dict) and "&" in left:
            return self.flags(left["&"], op, right, negate, where)
        if isinstance(left, dict) and "concat" in left and op == "==":
            return self.dynamic_lookup(left["concat"], right, where)
        raise UnmodelledConstructError(where, f"match on {left!r}")

    def meta(self, key: Any, op: str, right: Any, negate: bool, where: str) -> list[Match]:
        if key in ("iif", "oif", "iifname", "oifname") and op in ("==", "!="):
            if right != "lo":
                raise UnmodelledConstructError(where, f"interface {right!r} (only lo is modelled)")
            side = HookName.INPUT if key.startswith("i") else HookName.OUTPUT
            return [Loopback(side, negate)]
        if key == "l4proto":
            return [IntIn(Field.L4PROTO, _int_ranges(right, op, where, _l4), negate)]
        if key == "nfproto" and op == "==" and right in ("ipv4", "ipv6"):
            return [FamilyIs(Family.V4 if right == "ipv4" else Family.V6)]
        raise UnmodelledConstructError(where, f"meta {key} {op}")

    def payload(self, p: dict[str, Any], op: str, right: Any, negate: bool, where: str) -> list[Match]:
        proto, fld = p.get("protocol"), p.get("field")
        if proto in ("ip", "ip6") and fld in ("saddr", "daddr") and op in ("==", "!="):
            family = Family.V4 if proto == "ip" else Family.V6
            name = self.address_operand(right, family, where)
            return [FamilyIs(family), AddrIn(Addr(fld), family, name, negate)]
        if proto in ("tcp", "udp") and fld in ("sport", "dport"):
            field = Field.DPORT if fld == "dport" else Field.SPORT
            ranges = _int_ranges(right, op, where, _port)
            return [IntIn(Field.L4PROTO, ((L4_NUMBERS[proto],) * 2,)), IntIn(field, ranges, negate)]
        if proto in ("icmp", "icmpv6") and fld == "type":
            table = _ICMP_BY_NAME if proto == "icmp" else _ICMPV6_BY_NAME

            def icmp_type(v: Any, w: str) -> int:
                if isinstance(v, str) and v in table:
                    return table[v]
                return _byte(v, w)

            ranges = _int_ranges(right, op, where, icmp_type)
            number = 1 if proto == "icmp" else 58
            return [IntIn(Field.L4PROTO, ((number, number),)), IntIn(Field.ICMP_TYPE, ranges, negate)]
        raise UnmodelledConstructError(where, f"payload {proto} {fld} {op}")

    def flags(self, operands: Any, op: str, right: Any, negate: bool, where: str) -> list[Match]:
        if (
            not isinstance(operands, list)
            or len(operands) != 2
            or operands[0] != {"payload": {"protocol": "tcp", "field": "flags"}}
            or op not in ("==", "!=")
        ):
            raise UnmodelledConstructError(where, f"bitwise match {operands!r}")
        mask = _flag_bits(operands[1], where)
        value = _flag_bits(right, where)
        return [IntIn(Field.L4PROTO, ((6, 6),)), TcpFlags(mask, value, negate)]

    def dynamic_lookup(self, parts: Any, right: Any, where: str) -> list[Match]:
        name = str(right).lstrip("@") if isinstance(right, str) and right.startswith("@") else ""
        if name not in self.dynamic:
            raise UnmodelledConstructError(where, f"concatenated lookup in {right!r}")
        out: list[Match] = []
        for part in parts:
            p = part.get("payload", {}) if isinstance(part, dict) else {}
            proto, fld = p.get("protocol"), p.get("field")
            if proto in ("ip", "ip6") and fld in ("saddr", "daddr"):
                out.append(FamilyIs(Family.V4 if proto == "ip" else Family.V6))
            elif proto in ("tcp", "udp") and fld in ("sport", "dport"):
                out.append(IntIn(Field.L4PROTO, ((L4_NUMBERS[proto],) * 2,)))
            else:
                raise UnmodelledConstructError(where, f"concatenation part {part!r}")
        out.append(InDynamicSet(name))
        return out

    def address_operand(self, right: Any, family: Family, where: str) -> str:
        if isinstance(right, str) and right.startswith("@"):
            name = right[1:]
            if name not in self.sets:
                raise UnmodelledConstructError(where, f"lookup in {right} (not an address set of this table)")
            if self.sets[name].family is not family:
                raise UnmodelledConstructError(where, f"{right} is not of {family.name}")
            return name
        elems = right["set"] if isinstance(right, dict) and "set" in right else [right]
        ranges = merge_ranges(_element_range(e, family, where) for e in elems)
        name = "literal:" + hashlib.sha256(repr((family.value, ranges)).encode()).hexdigest()[:16]
        self.sets[name] = AddressSet(family, ranges)
        return name

    def result(self) -> LoadedRuleset:
        for name, target in self.references():
            if target not in self.chains:
                raise UnmodelledConstructError(f"chain {name}", f"jump to unknown chain {target}")
        for name, rules in self.chains.items():  # where the tunnel's constructs mean what the model says
            for r in rules:
                if r.verdict.kind is Kind.MARK and name not in self.route_chains:
                    raise UnmodelledConstructError(f"chain {name}", "the steering mark set outside a route chain "
                                                   "(no re-route follows)")
                if any(isinstance(m, Tunnel) and m.side is HookName.POSTROUTING for m in r.matches) \
                        and name not in self.postrouting:
                    raise UnmodelledConstructError(f"chain {name}", "a test of the tunnel as output interface "
                                                   "before postrouting")
        chains = {n: Chain(n, tuple(rules), self.policies.get(n)) for n, rules in self.chains.items()}
        hooks = {h: tuple(n for _, n in sorted(v)) for h, v in self.hooks.items()}
        fams = tuple(
            FamilyRules(f, chains, hooks, self.sets, self.maps, frozenset(self.dynamic)) for f in (Family.V4, Family.V6)
        )
        return LoadedRuleset("nftables", True, fams, tuple(self.notes))

    def references(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name, rules in self.chains.items():
            for r in rules:
                if r.verdict.kind in (Kind.JUMP, Kind.GOTO):
                    out.append((name, r.verdict.target))
                if r.verdict.kind is Kind.VMAP:
                    if r.verdict.target not in self.maps:
                        raise UnmodelledConstructError(f"chain {name}", f"unknown map {r.verdict.target}")
                    out.extend((name, e.verdict.target) for e in self.maps[r.verdict.target] if e.verdict.target)
        return out


# ---- values -------------------------------------------------------------------------------


def _verdict_of(expr: Any, where: str) -> Verdict:
    if not isinstance(expr, dict) or len(expr) != 1:
        raise UnmodelledConstructError(where, f"statement {expr!r}")
    (key, value), = expr.items()
    if key in _VERDICTS:
        return Verdict(_VERDICTS[key])
    if key in ("jump", "goto") and isinstance(value, dict) and "target" in value:
        return Verdict(Kind.JUMP if key == "jump" else Kind.GOTO, str(value["target"]))
    raise UnmodelledConstructError(where, f"statement {key!r}")


def _element_range(e: Any, family: Family, where: str) -> Range:
    if isinstance(e, dict) and "elem" in e:
        e = e["elem"].get("val")
    try:
        if isinstance(e, str):  # inet_pton: 100k elements through ipaddress cost seconds
            af = socket.AF_INET if family is Family.V4 else socket.AF_INET6
            value = int.from_bytes(socket.inet_pton(af, e), "big")
            return value, value
        if isinstance(e, dict) and "prefix" in e:
            net = ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}")
            if net.version != family.value:
                raise ValueError(e)
            return int(net.network_address), int(net.broadcast_address)
        if isinstance(e, dict) and "range" in e:
            lo, hi = (ipaddress.ip_address(x) for x in e["range"])
            if lo.version != family.value or hi.version != family.value:
                raise ValueError(e)
            return int(lo), int(hi)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise UnmodelledConstructError(where, f"address element {e!r}") from exc
    raise UnmodelledConstructError(where, f"address element {e!r}")


def _l4(v: Any, where: str) -> int:
    if isinstance(v, str) and v in L4_NUMBERS:
        return L4_NUMBERS[v]
    return _byte(v, where)


def _byte(v: Any, where: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255:
        return v
    raise UnmodelledConstructError(where, f"value {v!r}")


def _port(v: Any, where: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535:
        return v
    raise UnmodelledConstructError(where, f"port {v!r}")


def _int_range(v: Any, where: str) -> Range:
    if isinstance(v, dict) and "range" in v:
        lo, hi = (_port(x, where) for x in v["range"])
        return lo, hi
    p = _port(v, where)
    return p, p


def _int_ranges(right: Any, op: str, where: str, conv: Any) -> tuple[Range, ...]:
    limit = 65535 if conv is _port else 255
    if op in ("<", ">", "<=", ">="):
        v = conv(right, where)
        lo, hi = {"<": (0, v - 1), "<=": (0, v), ">": (v + 1, limit), ">=": (v, limit)}[op]
        return ((lo, hi),) if lo <= hi else ()
    if isinstance(right, dict) and "set" in right:
        elems = right["set"]
    else:
        elems = right if isinstance(right, list) else [right]
    out: list[Range] = []
    for e in elems:
        if isinstance(e, dict) and "range" in e:
            lo, hi = (conv(x, where) for x in e["range"])
            out.append((lo, hi))
        else:
            v = conv(e, where)
            out.append((v, v))
    return merge_ranges(out)


def _names(right: Any, where: str) -> list[str]:
    if isinstance(right, str):
        return [right]
    if isinstance(right, dict) and "set" in right:
        right = right["set"]
    if isinstance(right, list) and all(isinstance(x, str) for x in right):
        return list(right)
    raise UnmodelledConstructError(where, f"names {right!r}")


def _flag_bits(v: Any, where: str) -> int:
    names = _names(v, where) if not isinstance(v, int) else []
    if isinstance(v, int):
        return v & 0xFF
    bits = 0
    for n in names:
        if n not in TCP_FLAG_BITS:
            raise UnmodelledConstructError(where, f"tcp flag {n!r}")
        bits |= TCP_FLAG_BITS[n]
    return bits


def parse_nft_table(items: list[dict[str, Any]] | None, table: str) -> LoadedRuleset:
    """The IR of one ``inet`` table's JSON listing; ``None`` (no such table): nothing loaded."""
    if items is None:
        return LoadedRuleset("nftables", False, ())
    parser = _Parser(table)
    for obj in items:
        parser.item(obj)
    return parser.result()
