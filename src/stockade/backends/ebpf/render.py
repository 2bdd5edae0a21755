"""Pure rendering of a HostPolicy into the eBPF backend's map contents (no I/O).

The artifact is the data the datapath (``stockade/bpf/stockade.bpf.c``) reads, as values:

* ``rules``: rule index -> rule id (index 0 is ``default``, the mode's verdict on a miss);
* ``identities``: identity -> the exact combination of peer sets (0: in no set);
* ``peers``: prefix -> identity, one LPM trie per family (see :mod:`ebpf_identity`);
* ``policy``: (direction, identity, protocol, first..last port or ICMP type) -> verdict and
  rule, disjoint intervals already resolved by precedence; the loader writes each as port
  prefixes into the policy LPM trie.

:meth:`EbpfArtifact.to_text` prints them as tables (``stockade render --backend ebpf``);
``read_back`` prints what the kernel holds in the same format. The byte layout of keys and
values (shared with the C structs) is here too: :func:`peer_key`, :func:`policy_items`...
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from stockade.backends.ebpf.identity import (
    BITS,
    DEFAULT_RULE,
    L4,
    Interval,
    Prefix,
    RuleContext,
    Verdict,
    direct_memberships,
    effective_sets,
    identity_order,
    port_prefixes,
)
from stockade.compiler.ir import Direction, HostPolicy
from stockade.errors import RenderError
from stockade.model.addresses import Family
from stockade.model.workloads import EnforcementMode

KERNEL_MODE: dict[EnforcementMode, int] = {
    EnforcementMode.FULL: 1,
    EnforcementMode.SELECTIVE: 2,
    EnforcementMode.VISIBILITY: 3,
}
MODE_OF_KERNEL = {v: k for k, v in KERNEL_MODE.items()}
KERNEL_DIRECTION: dict[Direction, int] = {Direction.INBOUND: 0, Direction.OUTBOUND: 1}
DIRECTION_OF_KERNEL = {v: k for k, v in KERNEL_DIRECTION.items()}
RULE_TEXT_SIZE = 128  # value size of the rule-name map
IDENT_TEXT_SIZE = 256  # value size of the identity-name map
POLICY_FIXED_BITS = 48  # identity (32) + direction (8) + protocol (8), then the port


@dataclass(frozen=True, order=True)
class PeerEntry:
    family: Family
    start: int  # network address as an integer
    prefixlen: int
    identity: int

    @property
    def network_text(self) -> str:
        if self.family is Family.V4:
            return f"{socket.inet_ntoa(self.start.to_bytes(4, 'big'))}/{self.prefixlen}"
        return f"{socket.inet_ntop(socket.AF_INET6, self.start.to_bytes(16, 'big'))}/{self.prefixlen}"


def peer_order(p: PeerEntry) -> tuple[int, int, int, int]:
    """Sort key of peer rows (much faster than the dataclass's generated comparison)."""
    return p.family.value, p.start, p.prefixlen, p.identity


@dataclass(frozen=True, order=True)
class SetInfo:
    name: str
    selector: str
    v4: int
    v6: int


@dataclass(frozen=True)
class EbpfTables:
    """The map contents of one generation, as readable rows (render and read-back alike)."""

    mode: EnforcementMode
    rules: tuple[str, ...]
    identities: tuple[tuple[int, str], ...]  # identity -> description (set names)
    peers: tuple[PeerEntry, ...]
    policy: tuple[Interval, ...]
    sets: tuple[SetInfo, ...] = ()

    def text(self) -> str:
        out = ["config", f"  mode  {self.mode.value}"]
        miss = "allow" if self.mode is EnforcementMode.SELECTIVE else "block"
        if self.mode is EnforcementMode.VISIBILITY:
            miss = "would-block (passed, reported)"
        out += [f"  miss  {miss} (rule 0 {DEFAULT_RULE})", "", "rules (index -> rule id)"]
        out += [f"  {i:>5}  {name}" for i, name in enumerate(self.rules)]
        if self.sets:
            out += ["", "sets (name -> selector; members v4/v6)"]
            out += [f"  {s.name}  {s.selector or '-'}  {s.v4}/{s.v6}" for s in self.sets]
        out += ["", "identities (identity -> peer sets)"]
        out += [f"  {i:>5}  {desc}" for i, desc in self.identities]
        for family in (Family.V4, Family.V6):
            rows = [p for p in self.peers if p.family is family]
            out += ["", f"peers_v{family.value} (prefix -> identity)  {len(rows)} entries"]
            out += [f"  {p.network_text:<43} {p.identity}" for p in rows]
        entries = sum(sum(1 for _ in port_prefixes(i.first, i.last)) for i in self.policy)
        out += ["", f"policy (direction identity protocol ports -> verdict rule)  {len(self.policy)} intervals, "
                f"{entries} trie entries"]
        for i in self.policy:
            ports = "any" if (i.first, i.last) == (0, 65535) else (
                str(i.first) if i.first == i.last else f"{i.first}-{i.last}")
            name = self.rules[i.rule] if i.rule < len(self.rules) else f"#{i.rule}"
            out.append(
                f"  {i.direction.value:<4} {i.identity:>5}  {i.proto.label:<7} {ports:<12} "
                f"{i.verdict.label:<6} {i.rule} {name}"
            )
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class EbpfArtifact:
    """The rendered maps. ``present`` False (idle): programs detached, maps removed."""

    workload: str
    mode: EnforcementMode
    present: bool
    host_policy: HostPolicy = field(repr=False, compare=False)

    @cached_property
    def context(self) -> RuleContext:
        return RuleContext.of(self.host_policy)

    @cached_property
    def memberships(self) -> dict[Family, dict[Prefix, frozenset[str]]]:
        return direct_memberships(self.host_policy)

    @cached_property
    def effective(self) -> dict[Family, dict[Prefix, frozenset[str]]]:
        return {f: effective_sets(t, BITS[f]) for f, t in self.memberships.items()}

    @cached_property
    def identity_sets(self) -> tuple[frozenset[str], ...]:
        """Identity i -> its sets (index 0: the empty combination)."""
        combos = identity_order(c for t in self.effective.values() for c in t.values())
        return (frozenset(), *combos)

    @cached_property
    def identity_index(self) -> dict[frozenset[str], int]:
        return {c: i for i, c in enumerate(self.identity_sets)}

    @property
    def rules(self) -> tuple[str, ...]:
        return self.context.rule_names

    @cached_property
    def peers(self) -> tuple[PeerEntry, ...]:
        index = self.identity_index
        out = [
            PeerEntry(family, start, plen, index[sets])
            for family, table in self.effective.items()
            for (start, plen), sets in table.items()
        ]
        out.sort(key=peer_order)
        return tuple(out)

    def trie_items(self) -> tuple[list[bytes], list[bytes]]:
        """Keys and values of the generation trie: every peer prefix, then the policy."""
        return self._trie_items

    @cached_property
    def _trie_items(self) -> tuple[list[bytes], list[bytes]]:
        index = self.identity_index
        keys: list[bytes] = []
        values: list[bytes] = []
        pack_key, pack_value = _KEY.pack, _VALUE.pack
        for family, table in self.effective.items():
            kind, size = KIND_PEER[family], 4 if family is Family.V4 else 16
            values_of = {sets: pack_value(index[sets], 0) for sets in set(table.values())}
            for (start, plen), sets in table.items():
                keys.append(pack_key(8 + plen, kind, start.to_bytes(size, "big")))
                values.append(values_of[sets])
        for key, value in policy_items(self.policy):
            keys.append(key)
            values.append(value)
        return keys, values

    @cached_property
    def policy(self) -> tuple[Interval, ...]:
        ctx = self.context
        rows = [r for i, sets in enumerate(self.identity_sets) for r in ctx.intervals(i, sets)]
        rows.sort()
        return tuple(rows)

    @cached_property
    def tables(self) -> EbpfTables:
        hp = self.host_policy
        sets: dict[str, list[int]] = {}
        selectors: dict[str, str] = {}
        for s in hp.sets:
            counts = sets.setdefault(s.name, [0, 0])
            counts[0 if s.family is Family.V4 else 1] += len(s.members)
            selectors[s.name] = s.selector
        info = tuple(SetInfo(n, selectors[n], c[0], c[1]) for n, c in sorted(sets.items()))
        idents = tuple((i, identity_text(c)) for i, c in enumerate(self.identity_sets))
        return EbpfTables(self.mode, self.rules, idents, self.peers, self.policy, info)

    def to_text(self) -> str:
        return self._text

    @cached_property
    def _text(self) -> str:
        head = f"# Stockade eBPF maps: workload {self.workload}, mode {self.mode.value}\n"
        if not self.present:
            return head + "# idle: the tc programs are detached and every map is removed\n"
        head += ("# tc clsact on each interface: ingress = inbound (peer is the source), "
                 "egress = outbound (peer is the destination)\n")
        wg = self.host_policy.wireguard
        if wg is not None:
            head += (f"# WireGuard: listen port {wg.listen_port}, {len(wg.peers)} peers; allow-encrypted: "
                     "only through the WireGuard interface (egress redirected into it, ingress only from it)\n")
        head += "\n"
        return head + self.tables.text()


def identity_text(sets: Iterable[str]) -> str:
    names = sorted(sets)
    return " ".join(names) if names else "-"


def render_ebpf(hp: HostPolicy) -> EbpfArtifact:
    """Render ``hp`` (pure; capabilities are checked by the backend first)."""
    if hp.mode is EnforcementMode.IDLE:
        return EbpfArtifact(hp.workload, hp.mode, False, hp)
    present = {(s.name, s.family) for s in hp.sets}
    for rule in hp.rules:
        for family in (Family.V4, Family.V6):
            if (rule.peer, family) not in present:
                raise RenderError(f"rule {rule.rule_id} references missing set {rule.peer} ({family.name})")
    for name in RuleContext.of(hp).rule_names:
        if len(name.encode()) >= RULE_TEXT_SIZE:
            raise RenderError(f"rule id {name!r} is longer than {RULE_TEXT_SIZE - 1} bytes")
    return EbpfArtifact(hp.workload, hp.mode, True, hp)


# ---- byte layout shared with stockade.bpf.c ------------------------------------------------

KIND_POLICY = 1
KIND_PEER = {Family.V4: 4, Family.V6: 6}
FAMILY_OF_KIND = {v: k for k, v in KIND_PEER.items()}
_KEY = struct.Struct("=IB16s3x")  # struct gen_key
_VALUE = struct.Struct("=II")  # struct gen_val
KEY_SIZE = _KEY.size
VALUE_SIZE = _VALUE.size


def peer_key(family: Family, start: int, prefixlen: int) -> bytes:
    """``struct gen_key`` of kind PEER4/PEER6: the kind byte, then the address prefix."""
    size = 4 if family is Family.V4 else 16
    return _KEY.pack(8 + prefixlen, KIND_PEER[family], start.to_bytes(size, "big"))


def peer_value(identity: int) -> bytes:
    return _VALUE.pack(identity, 0)


def policy_key(direction: Direction, identity: int, proto: L4, port: int, port_bits: int) -> bytes:
    """Kind POLICY: identity, direction and protocol in full, then ``port_bits`` of the port."""
    data = struct.pack(">IBBH", identity, KERNEL_DIRECTION[direction], proto.value, port)
    return _KEY.pack(8 + POLICY_FIXED_BITS + port_bits, KIND_POLICY, data)


def policy_value(verdict: Verdict, rule: int) -> bytes:
    return _VALUE.pack(verdict.value, rule)


def policy_items(rows: Iterable[Interval]) -> Iterator[tuple[bytes, bytes]]:
    """Each interval as port-prefix trie entries (key, value)."""
    for r in rows:
        value = policy_value(r.verdict, r.rule)
        for port, bits in port_prefixes(r.first, r.last):
            yield policy_key(r.direction, r.identity, r.proto, port, bits), value


def peer_items(peers: Iterable[PeerEntry]) -> Iterator[tuple[bytes, bytes]]:
    for p in peers:
        yield peer_key(p.family, p.start, p.prefixlen), peer_value(p.identity)


def decode_entry(key: bytes, value: bytes) -> PeerEntry | Interval:
    """A generation-trie entry back as a peer row or a (single-prefix) policy interval."""
    prefixlen, kind, data = _KEY.unpack(key)
    a, b = _VALUE.unpack(value)
    family = FAMILY_OF_KIND.get(kind)
    if family is not None:
        size = 4 if family is Family.V4 else 16
        return PeerEntry(family, int.from_bytes(data[:size], "big"), prefixlen - 8, a)
    identity, direction, proto, port = struct.unpack_from(">IBBH", data, 0)
    bits = prefixlen - 8 - POLICY_FIXED_BITS
    last = port + (1 << (16 - bits)) - 1
    return Interval(DIRECTION_OF_KERNEL[direction], identity, L4(proto), port, last, Verdict(a), b)


def text_value(text: str, size: int) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raw = raw[: size - 4] + "…".encode()
    return raw.ljust(size, b"\0")[:size]


def merge_intervals(rows: Iterable[Interval]) -> tuple[Interval, ...]:
    """Adjacent intervals with the same verdict and rule fused (the canonical form)."""
    out: list[Interval] = []
    for r in sorted(rows):
        if out:
            p = out[-1]
            same = (p.direction, p.identity, p.proto, p.verdict, p.rule) == (
                r.direction, r.identity, r.proto, r.verdict, r.rule)
            if same and p.last + 1 == r.first:
                out[-1] = Interval(p.direction, p.identity, p.proto, p.first, r.last, p.verdict, p.rule)
                continue
        out.append(r)
    return tuple(out)
