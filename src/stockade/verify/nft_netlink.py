"""Decode an nf_tables netlink dump (:mod:`stockade.backends.nftables.dump`) into the prover's IR, strictly.

The fast twin of :mod:`.nft_readback` (which parses ``nft -j list table``): the same
:class:`~stockade.verify.loaded.LoadedRuleset` from the kernel's own bytecode, without nft
and without JSON (see the dump module for what ``nft -j`` costs at 1,000 rules). Pure: it
takes the dumped attributes and runs nothing. Like the JSON parser it fails closed: every
expression, register use, set type and chain kind is either translated exactly or refused
with :class:`~stockade.errors.UnmodelledConstructError` naming the rule. Understood:

* loads: ``meta`` nfproto / l4proto / iif / oif / iifname / oifname, ``payload`` of the
  network header (IPv4/IPv6 saddr, daddr, after a ``meta nfproto`` dependency) and of the
  transport header (tcp/udp sport, dport; icmp/icmpv6 type; tcp flags, after a ``meta
  l4proto`` dependency), ``ct state``, ``bitwise`` masks (no xor, no shifts);
* tests: ``cmp`` (all six operators where the field is an integer), ``range``, ``lookup``
  (named address sets, anonymous sets of addresses, ports, ICMP types and protocols,
  concatenated *dynamic* sets, and ``l4proto . th dport`` verdict maps);
* statements: ``counter``, ``log`` (no verdict), ``dynset`` add/update into a dynamic set,
  ``reject`` (a drop) and ``immediate`` verdicts (accept, drop, return, jump, goto).

Encrypted rules (:mod:`.tunnel`), when the WireGuard interface's name is given: ``iifname`` /
``oifname`` equal to it (the input interface; the output one only in a ``postrouting`` base
chain, where it is the device steering re-routed to), ``meta mark`` and ``ct mark`` tests of
the steering and socket marks, ``meta mark set`` of the steering mark (only in a ``type route``
output chain: the kernel re-routes after it), and the statements ``ct mark set`` of the steering
mark (the connection's mark: a later packet's ``enc`` bit) and ``tcp option maxseg size set``
(the MSS clamp), neither of which decides a verdict.

Anything else (other marks, other ct keys, NAT, limits, quotas, xtables compat, stateful objects,
flowtables, a dormant table ...) is refused. Rules whose expressions are byte-identical (in
the lookup layout most are: 155k rules, ~6k distinct) are decoded once.

The decoder also drops repeated matches within a rule (nft's implicit dependencies: ``tcp
dport 22`` is ``meta l4proto tcp`` + the port test, which the IR already writes as a protocol
match plus a port match); a conjunction is unchanged by it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from stockade.backends.nftables.dump import Attrs, TableDump, attr_list, attrs
from stockade.backends.wireguard import STEER_MARK
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family, Range, merge_ranges
from stockade.verify.loaded import (
    AddressSet,
    AddrIn,
    ConnEncrypted,
    CtState,
    FamilyIs,
    Field,
    HookName,
    InDynamicSet,
    IntIn,
    Kind,
    LoadedRuleset,
    Loopback,
    MapElement,
    Match,
    PacketMark,
    Rule,
    TcpFlags,
    Tunnel,
    Verdict,
)
from stockade.verify.nft_readback import _Parser
from stockade.verify.nft_wire import (
    _ADDR_FIELDS,
    _CMP_OPS,
    _CT_NAMES,
    _CT_STATE_BITS,
    _HEAD,
    _HOOKNUMS,
    _META_NAMES,
    CT_MARK,
    DATA_VERDICT,
    META_IIF,
    META_IIFNAME,
    META_L4PROTO,
    META_MARK,
    META_NFPROTO,
    META_OIF,
    META_OIFNAME,
    SET_ANONYMOUS,
    SET_MAP,
    TYPE_BITS,
    TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE,
    TYPE_IP6ADDR,
    TYPE_IPADDR,
    Load,
    _comment,
    _describe,
    _int,
    _intersect,
    _prefix,
    _ranges,
    _s32,
    _slot,
    _str,
    _u32,
    _value,
    _verdict,
)


class _Sets:
    """The table's sets, decoded: named address sets, dynamic sets, verdict maps and anonymous sets."""

    def __init__(self, dump: TableDump, parser: _Parser) -> None:
        self.parser = parser
        self.anon: dict[str, tuple[int, tuple[Range, ...]]] = {}  # name -> (key type, ranges)
        self.key_len: dict[str, int] = {}  # dynamic sets
        for s in dump.sets:
            name = _str(s.get(2, b""))
            flags = _u32(s.get(3, b"\0\0\0\0"))
            key_type = _u32(s.get(4, b"\0\0\0\0"))
            key_len = _u32(s.get(5, b"\0\0\0\0"))
            where = f"set {name}"
            elems = dump.elements.get(name, ())
            if flags & SET_MAP:
                self.map(name, key_type, _u32(s.get(6, b"\0\0\0\0")), elems, where, flags)
                continue
            if flags & SET_ANONYMOUS:
                self.anon[name] = (key_type, _ranges(elems, key_len, flags, where))
                continue
            if key_type >> TYPE_BITS:  # a concatenation: flow-log style, filled by the datapath
                parser.dynamic.add(name)
                self.key_len[name] = key_len
                continue
            if key_type not in (TYPE_IPADDR, TYPE_IP6ADDR):
                raise UnmodelledConstructError(where, f"set type {key_type}")
            family = Family.V4 if key_type == TYPE_IPADDR else Family.V6
            parser.sets[name] = AddressSet(family, _ranges(elems, key_len, flags, where))

    def map(self, name: str, key_type: int, data_type: int, elems: tuple[bytes, ...], where: str, flags: int) -> None:
        if flags & SET_ANONYMOUS:
            raise UnmodelledConstructError(where, "anonymous map")
        if key_type != (TYPE_INET_PROTOCOL << TYPE_BITS) | TYPE_INET_SERVICE or data_type != DATA_VERDICT:
            raise UnmodelledConstructError(where, f"map type {key_type} : {data_type}")
        out: list[MapElement] = []
        for payload in elems:
            for _, elem in attr_list(payload):
                e = attrs(elem)
                key = _value(e.get(1, b""))
                end = _value(e[10]) if 10 in e else key
                if len(key) != 8 or len(end) != 8 or key[0] != end[0]:
                    raise UnmodelledConstructError(where, f"map key {key.hex()}")
                proto = key[0]
                if proto not in (6, 17):
                    raise UnmodelledConstructError(where, f"dispatch on protocol {proto} (th dport is modelled for tcp/udp)")  # noqa: E501
                lo, hi = int.from_bytes(key[4:6], "big"), int.from_bytes(end[4:6], "big")
                out.append(MapElement(proto, lo, hi, _verdict(e.get(2, b""), where)))
        self.parser.maps[name] = tuple(out)




class _Rules:
    """Rule bytecode -> (matches, verdict), strictly; byte-identical expressions decoded once."""

    def __init__(self, sets: _Sets, wg_interface: str | None = None) -> None:
        self.wg_interface = wg_interface  # the WireGuard interface (None: no interface but lo is modelled)
        self.sets = sets
        self.parser = sets.parser
        self.cache: dict[bytes, tuple[tuple[Match, ...], Verdict]] = {}
        self.rule_cache: dict[bytes, Rule] = {}

    def rule(self, chain: str, msg: bytes) -> Rule:
        """One rule message of ``chain``. Its attributes are table, chain, handle, position,
        then expressions and user data: the bytes from the expressions on are the rule's
        content (equal content, one decode and one shared :class:`Rule`)."""
        off, end = 0, len(msg)
        while off + 4 <= end:
            length, kind = _HEAD(msg, off)
            if length < 4 or kind & 0x3FFF in (4, 5, 7):
                break
            off += (length + 3) & ~3
        content = msg[off:]
        rule = self.rule_cache.get(content)
        if rule is None:  # equal rules share one Rule: the interpreter's per-rule work is done once
            r = attrs(msg)
            where = f"chain {chain} rule {int.from_bytes(r.get(3, b''), 'big')}"
            if 5 in r:
                raise UnmodelledConstructError(where, "xtables compat expression")
            comment = _comment(r.get(7, b""))
            blob = r.get(4, b"")
            decoded = self.cache.get(blob)
            if decoded is None:
                decoded = self.cache[blob] = self.decode(blob, f"{where} ({comment})")
            rule = self.rule_cache[content] = Rule(decoded[0], decoded[1], comment)
        return rule

    def decode(self, blob: bytes, where: str) -> tuple[tuple[Match, ...], Verdict]:
        regs: dict[int, Load] = {}
        ctx: dict[str, Any] = {}
        matches: list[Match] = []
        ordered: dict[Field, int] = {}  # field -> index of its match from an ordering comparison
        verdict: Verdict | None = None
        steers = False  # ``meta mark set`` of the steering mark: the rule's verdict is MARK
        for _, expr in attr_list(blob):
            e = attrs(expr)
            name = _str(e.get(1, b""))
            a = attrs(e.get(2, b""))
            if verdict is not None:
                raise UnmodelledConstructError(where, "statement after the verdict")
            if name in ("counter", "log"):
                continue
            if name == "immediate":
                dreg = _u32(a.get(1, b"\0\0\0\0"))
                if dreg != 0:  # data for a statement: refused by the statement that uses it
                    regs[_slot(dreg, where)] = ("immediate", _value(a.get(2, b"")))
                    continue
                verdict = _verdict(a.get(2, b""), where)
            elif name == "reject":
                verdict = Verdict(Kind.DROP)
            elif name == "meta" and 3 in a:
                steers = self.mark_set(("meta", _u32(a.get(2, b"\0\0\0\0"))), regs.get(_slot(_u32(a[3]), where)),
                                       where) or steers
            elif name == "ct" and 4 in a:  # ``ct mark set``: marks the connection, decides nothing now
                self.mark_set(("ct", _u32(a.get(2, b"\0\0\0\0"))), regs.get(_slot(_u32(a[4]), where)), where)
            elif name == "exthdr" and 7 in a and _u32(a.get(6, b"\0\0\0\0")) == 1 and a.get(2, b"\0")[:1] == b"\x02":
                pass  # ``tcp option maxseg size set``: the MSS clamp, no verdict
            elif name == "meta":
                self.meta(a, regs, where)
            elif name == "payload":
                if 5 in a:
                    raise UnmodelledConstructError(where, "payload set statement")
                base, off, length = _u32(a[2]), _u32(a[3]), _u32(a[4])
                regs[_slot(_u32(a[1]), where)] = ("payload", base, off, length)
            elif name == "ct":
                key = _u32(a.get(2, b"\0\0\0\0"))
                if 3 in a or 4 in a or key not in (0, CT_MARK) or 1 not in a:
                    raise UnmodelledConstructError(where, f"ct {_CT_NAMES.get(key, key)}")
                if key == CT_MARK and self.wg_interface is None:
                    raise UnmodelledConstructError(where, "ct mark (no WireGuard interface known)")
                regs[_slot(_u32(a[1]), where)] = ("ct", key)
            elif name == "bitwise":
                if _u32(a.get(6, b"\0\0\0\0")) != 0 or int.from_bytes(_value(a.get(5, b"")), "big") != 0:
                    raise UnmodelledConstructError(where, "bitwise operation other than a mask")
                inner = regs.get(_slot(_u32(a[1]), where))
                if inner is None:
                    raise UnmodelledConstructError(where, "bitwise on an unloaded register")
                regs[_slot(_u32(a[2]), where)] = ("masked", inner, _value(a[4]))
            elif name == "byteorder":  # nft's vmap key: l4proto to network order, used by nothing else
                inner = regs.get(_slot(_u32(a[1]), where))
                if inner != ("meta", META_L4PROTO) or _u32(a.get(3, b"\0\0\0\0")) != 1:
                    raise UnmodelledConstructError(where, "byteorder conversion")
                regs[_slot(_u32(a[2]), where)] = ("hton", META_L4PROTO)
            elif name == "cmp":
                op = _CMP_OPS.get(_u32(a[2]))
                load = regs.get(_slot(_u32(a[1]), where))
                if op is None or load is None:
                    raise UnmodelledConstructError(where, "comparison")
                found = self.compare(load, op, _value(a[3]), ctx, where)
                if op in ("<", "<=", ">", ">=") and isinstance(found[-1], IntIn):
                    # nft writes ``tcp dport 943-959`` as ``>= 943`` and ``<= 959``: one range again
                    last = found[-1]
                    earlier = ordered.get(last.field)
                    if earlier is not None:
                        prev = matches[earlier]
                        assert isinstance(prev, IntIn)
                        matches[earlier] = IntIn(last.field, _intersect(prev.ranges, last.ranges))
                        found = found[:-1]
                    else:
                        ordered[last.field] = len(matches) + len(found) - 1
                matches += found
            elif name == "range":
                load = regs.get(_slot(_u32(a[1]), where))
                if load is None or _u32(a[2]) not in (0, 1):
                    raise UnmodelledConstructError(where, "range")
                lo, hi = _value(a[3]), _value(a[4])
                matches += self.in_ranges(load, ((_int(lo), _int(hi)),), _u32(a[2]) == 1, ctx, where, None)
            elif name == "lookup":
                looked = self.lookup(a, regs, ctx, where)
                if isinstance(looked, Verdict):
                    verdict = looked
                else:
                    matches += looked
            elif name == "dynset":
                target = _str(a.get(1, b""))
                if _u32(a.get(3, b"\0\0\0\0")) not in (0, 1) or target not in self.parser.dynamic:
                    raise UnmodelledConstructError(where, f"set statement @{target}")
            else:
                raise UnmodelledConstructError(where, f"expression {name!r}")
        if steers:
            if verdict is not None:
                raise UnmodelledConstructError(where, "a verdict after the steering mark is set")
            verdict = Verdict(Kind.MARK)
        return tuple(dict.fromkeys(matches)), verdict or Verdict(Kind.CONTINUE)

    def mark_set(self, what: tuple[str, int], source: Load | None, where: str) -> bool:
        """``meta mark set`` / ``ct mark set`` from an immediate: only the steering mark (True: the
        packet's mark, which steers it)."""
        key = what[1]
        if key != (META_MARK if what[0] == "meta" else CT_MARK) or self.wg_interface is None:
            name = (_META_NAMES if what[0] == "meta" else _CT_NAMES).get(key, key)
            raise UnmodelledConstructError(where, f"{what[0]} {name} set")
        if source is None or source[0] != "immediate" or int.from_bytes(source[1], "little") != STEER_MARK:
            raise UnmodelledConstructError(where, f"{what[0]} mark set to anything but the steering mark")
        return what[0] == "meta"

    def meta(self, a: Attrs, regs: dict[int, Load], where: str) -> None:
        key = _u32(a.get(2, b"\0\0\0\0"))
        if 3 in a or 1 not in a:
            raise UnmodelledConstructError(where, f"meta {_META_NAMES.get(key, key)} set")
        wg = (META_MARK,) if self.wg_interface is not None else ()
        if key not in (META_NFPROTO, META_L4PROTO, META_IIF, META_OIF, META_IIFNAME, META_OIFNAME, *wg):
            raise UnmodelledConstructError(where, f"meta {_META_NAMES.get(key, key)}")
        regs[_slot(_u32(a[1]), where)] = ("meta", key)

    # ---- tests ---------------------------------------------------------------------------
    def compare(self, load: Load, op: str, data: bytes, ctx: dict[str, Any], where: str) -> list[Match]:
        kind = load[0]
        if kind == "meta" and load[1] == META_NFPROTO:
            family = {2: Family.V4, 10: Family.V6}.get(data[0] if data else -1)
            if op != "==" or family is None:
                raise UnmodelledConstructError(where, f"meta nfproto {op} {data.hex()}")
            ctx["family"] = family
            return [FamilyIs(family)]
        if kind == "meta" and load[1] == META_MARK and op in ("==", "!="):
            return [PacketMark(int.from_bytes(data[:4], "little"), op == "!=")]
        if kind == "ct" and load[1] == CT_MARK:
            if op not in ("==", "!=") or int.from_bytes(data[:4], "little") != STEER_MARK:
                raise UnmodelledConstructError(where, f"ct mark {op} {data.hex()} (only the steering mark)")
            return [ConnEncrypted(op == "!=")]
        if kind == "meta" and load[1] in (META_IIF, META_OIF, META_IIFNAME, META_OIFNAME):
            if op not in ("==", "!="):
                raise UnmodelledConstructError(where, f"interface {op}")
            if load[1] in (META_IIFNAME, META_OIFNAME) and b"\0" in data and self.wg_interface is not None \
                    and _str(data) == self.wg_interface:  # the tunnel: in, or out after steering (postrouting)
                side = HookName.INPUT if load[1] == META_IIFNAME else HookName.POSTROUTING
                return [Tunnel(side, op == "!=")]
            if load[1] in (META_IIF, META_OIF):
                is_lo = int.from_bytes(data[:4], "little") == 1  # lo is ifindex 1 in every namespace
                shown = "lo" if is_lo else f"ifindex {int.from_bytes(data[:4], 'little')}"
            else:
                is_lo = b"\0" in data and _str(data) == "lo"  # no NUL: a wildcard prefix match
                shown = _str(data) + ("" if b"\0" in data else "*")
            if not is_lo:
                raise UnmodelledConstructError(where, f"interface {shown!r} (only lo is modelled)")
            side = HookName.INPUT if load[1] in (META_IIF, META_IIFNAME) else HookName.OUTPUT
            return [Loopback(side, op == "!=")]
        if kind == "ct" or (kind == "masked" and load[1][0] == "ct"):
            return [self.ct_state(load, op, int.from_bytes(data, "little"), where)]  # host byte order
        if kind == "masked" and load[1][0] == "payload" and load[1][1] == 2:
            inner = load[1]
            if ctx.get("l4") != 6 or inner[2:] != (13, 1) or op not in ("==", "!="):
                raise UnmodelledConstructError(where, f"bitwise match on transport offset {inner[2]}")
            return [IntIn(Field.L4PROTO, ((6, 6),)), TcpFlags(_int(load[2]) & 0xFF, _int(data) & 0xFF, op == "!=")]
        if kind == "masked" and load[1][0] == "payload" and load[1][1] == 1:
            if op not in ("==", "!="):
                raise UnmodelledConstructError(where, f"address {op}")
            return self.address(load[1], _prefix(_int(load[2]), _int(data), len(data), where), op == "!=", ctx, where)
        if kind == "payload" and load[1] == 1:
            if op not in ("==", "!="):
                raise UnmodelledConstructError(where, f"address {op}")
            v = _int(data)
            return self.address(load, ((v, v),), op == "!=", ctx, where)
        v = _int(data)
        limit = (1 << (8 * len(data))) - 1
        if op in ("==", "!="):
            return self.in_ranges(load, ((v, v),), op == "!=", ctx, where, None)
        lo, hi = {"<": (0, v - 1), "<=": (0, v), ">": (v + 1, limit), ">=": (v, limit)}[op]
        return self.in_ranges(load, ((lo, hi),) if lo <= hi else (), False, ctx, where, None)

    @staticmethod
    def ct_state(load: Load, op: str, value: int, where: str) -> CtState:
        mask = int.from_bytes(load[2], "little") if load[0] == "masked" else None
        if mask is not None and value == 0 and op in ("==", "!="):
            bits = mask
            negate = op == "=="  # (state & mask) == 0: none of them
        elif mask is None and op in ("==", "!=") and value in _CT_STATE_BITS:
            bits, negate = value, op == "!="
        else:
            raise UnmodelledConstructError(where, f"ct state {op} {value:#x}")
        states = [s for b, s in _CT_STATE_BITS.items() if bits & b]
        if bits & ~sum(_CT_STATE_BITS) or not states:
            raise UnmodelledConstructError(where, f"ct state bits {bits:#x}")
        return CtState(frozenset(states), negate)

    def in_ranges(
        self, load: Load, ranges: tuple[Range, ...], negate: bool, ctx: dict[str, Any], where: str, key_type: int | None
    ) -> list[Match]:
        """A non-address field in ``ranges``: l4proto, ports, ICMP type."""
        ranges = merge_ranges(ranges)
        if load[0] == "meta" and load[1] == META_L4PROTO:
            if not negate and len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                ctx["l4"] = ranges[0][0]
            return [IntIn(Field.L4PROTO, ranges, negate)]
        if load[0] == "payload" and load[1] == 2:
            l4, off, length = ctx.get("l4"), load[2], load[3]
            if l4 in (6, 17) and length == 2 and off in (0, 2):
                field = Field.DPORT if off == 2 else Field.SPORT
                return [IntIn(Field.L4PROTO, ((l4, l4),)), IntIn(field, ranges, negate)]
            if l4 in (1, 58) and (off, length) == (0, 1):
                return [IntIn(Field.L4PROTO, ((l4, l4),)), IntIn(Field.ICMP_TYPE, ranges, negate)]
            raise UnmodelledConstructError(where, f"transport header offset {off} length {length} (l4proto {l4})")
        if load[0] == "payload" and load[1] == 1:
            return self.address(load, ranges, negate, ctx, where)
        raise UnmodelledConstructError(where, f"match on {_describe(load)}")

    def address(
        self, load: Load, ranges: tuple[Range, ...], negate: bool, ctx: dict[str, Any], where: str, name: str = ""
    ) -> list[Match]:
        family = ctx.get("family")
        full = 4 if family is Family.V4 else 16
        addr = _ADDR_FIELDS.get((family, load[2], full)) if family is not None else None
        if family is None or addr is None or not 0 < load[3] <= full or (name and load[3] != full):
            raise UnmodelledConstructError(where, f"network header offset {load[2]} length {load[3]}")
        if load[3] < full:  # nft loads only the bytes of a byte-aligned prefix: widen to addresses
            shift = 8 * (full - load[3])
            ranges = tuple((lo << shift, (hi << shift) | ((1 << shift) - 1)) for lo, hi in ranges)
        if not name:
            name = "literal:" + hashlib.sha256(repr((family.value, merge_ranges(ranges))).encode()).hexdigest()[:16]
            self.parser.sets[name] = AddressSet(family, merge_ranges(ranges))
        elif self.parser.sets[name].family is not family:
            raise UnmodelledConstructError(where, f"@{name} is not of {family.name}")
        return [FamilyIs(family), AddrIn(addr, family, name, negate)]

    def lookup(self, a: Attrs, regs: dict[int, Load], ctx: dict[str, Any], where: str) -> list[Match] | Verdict:
        name = _str(a.get(1, b""))
        slot = _slot(_u32(a.get(2, b"\0\0\0\0")), where)
        negate = bool(_u32(a.get(5, b"\0\0\0\0")) & 1)
        load = regs.get(slot)
        if load is None:
            raise UnmodelledConstructError(where, f"lookup in @{name} of an unloaded register")
        if 3 in a:  # a map lookup
            if _u32(a[3]) != 0 or name not in self.parser.maps or negate:
                raise UnmodelledConstructError(where, f"map lookup in @{name}")
            port = regs.get(slot + 1)
            if load not in (("meta", META_L4PROTO), ("hton", META_L4PROTO)) or port != ("payload", 2, 2, 2):
                raise UnmodelledConstructError(where, f"verdict map key {_describe(load)}")
            return Verdict(Kind.VMAP, name)
        if name in self.parser.dynamic:
            if negate:
                raise UnmodelledConstructError(where, f"negated lookup in @{name}")
            return self.dynamic_key(name, regs, slot, ctx, where)
        if name in self.sets.anon:
            _key_type, ranges = self.sets.anon[name]
            if load[0] == "payload" and load[1] == 1:
                return self.address(load, ranges, negate, ctx, where)
            return self.in_ranges(load, ranges, negate, ctx, where, _key_type)
        if name in self.parser.sets:
            if load[0] != "payload" or load[1] != 1:
                raise UnmodelledConstructError(where, f"lookup of {_describe(load)} in @{name}")
            return self.address(load, (), negate, ctx, where, name)
        raise UnmodelledConstructError(where, f"lookup in @{name} (not a set of this table)")

    def dynamic_key(self, name: str, regs: dict[int, Load], slot: int, ctx: dict[str, Any], where: str) -> list[Match]:
        out: list[Match] = []
        family, l4 = ctx.get("family"), ctx.get("l4")
        left = self.sets.key_len[name]
        while left > 0:
            load = regs.get(slot)
            if load is None:
                raise UnmodelledConstructError(where, f"lookup in @{name} of an unloaded register")
            if load[0] == "payload" and load[1] == 1 and family and (family, load[2], load[3]) in _ADDR_FIELDS:
                out.append(FamilyIs(family))
            elif load[0] == "payload" and load[1] == 2 and l4 in (6, 17) and load[3] == 2 and load[2] in (0, 2):
                out.append(IntIn(Field.L4PROTO, ((l4, l4),)))
            else:
                raise UnmodelledConstructError(where, f"concatenation part {_describe(load)}")
            slot += (load[3] + 3) // 4
            left -= (load[3] + 3) // 4 * 4
        if left:
            raise UnmodelledConstructError(where, f"key of @{name} does not match its loads")
        out.append(InDynamicSet(name))
        return out




def _chain(parser: _Parser, c: Attrs) -> None:
    name = _str(c.get(3, b""))
    body: dict[str, Any] = {"name": name}
    if 4 in c:
        hook = attrs(c[4])
        hooknum = _u32(hook.get(1, b"\xff\xff\xff\xff"))
        body["hook"] = _HOOKNUMS.get(hooknum, str(hooknum))
        body["prio"] = _s32(hook.get(2, b"\0\0\0\0"))
        body["type"] = _str(c.get(7, b""))
        body["policy"] = {1: "accept", 0: "drop"}.get(_u32(c.get(5, b"\0\0\0\1")), "?")
    parser.chain(body)


def parse_nft_dump(dump: TableDump | None, table: str, wg_interface: str | None = None) -> LoadedRuleset:
    """The IR of one ``inet`` table's netlink dump; ``None`` (no such table): nothing loaded.
    ``wg_interface``: the WireGuard interface of encrypted rules (None: its tests are refused)."""
    if dump is None:
        return LoadedRuleset("nftables", False, ())
    if _u32(dump.table.get(2, b"\0\0\0\0")) & 1:
        raise UnmodelledConstructError(table, "dormant table (it enforces nothing)")
    if dump.objects or dump.flowtables:
        raise UnmodelledConstructError(table, f"object kind: {dump.objects} stateful objects, {dump.flowtables} flowtables")  # noqa: E501
    parser = _Parser(table)
    sets = _Sets(dump, parser)
    for c in dump.chains:
        _chain(parser, c)
    rules = _Rules(sets, wg_interface)
    for chain, msgs in dump.rules:
        parser.chains.setdefault(chain, []).extend(rules.rule(chain, m) for m in msgs)
    return parser.result()
