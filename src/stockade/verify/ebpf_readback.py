"""Read back what the eBPF backend has LOADED and turn it into the prover's ruleset IR.

The eBPF datapath (``stockade/bpf/stockade.bpf.c``) is fixed code plus data: what decides a
packet is (1) which program runs at each interface's tc ingress/egress hook and (2) the
contents of the generation trie in force. So the read-back has two parts:

* **Programs, by tag.** Every Ethernet interface must run, at ingress and egress, a program
  whose kernel tag is the tag of the instructions Stockade built from its own object file
  (:func:`expected_tags`: the kernel hashes the instructions with map descriptors zeroed,
  SHA-256 on recent kernels, SHA-1 before), and whose maps are Stockade's pinned maps (a tag
  does not cover map references). Any other program, a hook without ours, or foreign maps
  fail the proof: the model of the fixed code below is only true of that code.
* **Maps.** ``stk_current`` (generation in force, mode) and that generation's LPM trie, with
  the kernel's longest-prefix-match semantics applied to whatever entries are there (nested
  or overlapping entries, as a mutation could leave, are resolved as the kernel resolves
  them). Entries no lookup of the datapath can take the way the model reads them (unknown
  kinds, partial identity prefixes, unknown verdicts or protocols) are refused.
* **The tunnel** (encrypted rules, :mod:`.tunnel`): ``stk_current``'s WireGuard interface index
  is resolved to the link it names: the WireGuard interface running Stockade's tunnel programs
  (by tag, our maps only) is :attr:`Steering.TUNNEL`; an Ethernet interface (the redirect would
  send encrypted traffic out in the clear, and its own packets would count as "from the
  tunnel") is ``CLEAR``; index 0 or no such link is ``NONE`` (the redirect fails: dropped); a
  link of another kind, or the tunnel without our programs (its packets would be unfiltered),
  is refused. ``stk_current``'s fwmark must be wireguard-go's socket mark (or 0).

The fixed code becomes one chain per hook (:func:`datapath_rules`), in the program's order:
ICMPv6 neighbour discovery passes; a packet of a known flow (``established``) or an ICMP
error quoting one (``related``) passes; loopback is never attached (passes); otherwise the
peer's identity (address classes of the trie's peer entries) selects a chain of the policy
entries for (direction, protocol, port or ICMP type); a miss is the mode's default; in
visibility mode a block is only "would-block" and passes. The flow table's state space is
narrower than conntrack's (:data:`~stockade.verify.loaded.LoadedRuleset.flow_states`). With a
tunnel (:func:`tunnel_rules`): egress, wireguard-go's fwmark passes first; a packet of an
encrypted flow, or one an ``allow-encrypted`` entry admits, is steered (a ``mark`` verdict: the
redirect) and passes; ingress, a packet of an encrypted flow not on the tunnel is dropped and an
``allow-encrypted`` entry accepts only on the tunnel (else drops, in every mode).
"""

from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from pathlib import Path

from stockade.backends.ebpf import netlink as rtnl
from stockade.backends.ebpf import syscall as bpf
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ebpf.identity import L4, Verdict
from stockade.backends.ebpf.loader import PROGRAMS, TUNNEL_PROGRAMS, Current, TcHook, load_object
from stockade.backends.ebpf.render import FAMILY_OF_KIND, KEY_SIZE, KIND_POLICY, POLICY_FIXED_BITS
from stockade.backends.wireguard import SOCKET_MARK, STEER_MARK
from stockade.bpf.build import object_path
from stockade.errors import ApplyError, ProofError, UnmodelledConstructError
from stockade.model.addresses import Family, Range
from stockade.model.workloads import EnforcementMode
from stockade.verify.loaded import (
    Addr,
    AddressSet,
    AddrIn,
    Chain,
    ConnEncrypted,
    CtState,
    FamilyRules,
    Field,
    HookName,
    IntIn,
    Kind,
    LoadedRuleset,
    Loopback,
    Match,
    PacketMark,
    Rule,
    Steering,
    Tunnel,
)
from stockade.verify.loaded import Verdict as RuleVerdict

_KEY = struct.Struct("=IB16s3x")
_VALUE = struct.Struct("=II")
_BITS = {Family.V4: 32, Family.V6: 128}
_ICMP = {Family.V4: L4.ICMP.value, Family.V6: L4.ICMPV6.value}
_DIRECTION = {0: HookName.INPUT, 1: HookName.OUTPUT}
_LD_IMM64 = 0x18
_PSEUDO_MAP = (1, 2)  # BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE
ND_TYPES = (133, 137)


# ---- programs ----------------------------------------------------------------------------------


def program_tags(insns: bytes) -> frozenset[str]:
    """The kernel's tag of ``insns`` (map references' immediates zeroed, as the kernel does
    before hashing): SHA-256 (Linux >= 6.18) and SHA-1 (before) prefixes."""
    code = bytearray(insns)
    was_ld_map = False
    for off in range(0, len(code), 8):
        op, regs = code[off], code[off + 1]
        if not was_ld_map and op == _LD_IMM64 and (regs >> 4) in _PSEUDO_MAP:
            was_ld_map = True
            code[off + 4 : off + 8] = b"\0\0\0\0"
        elif was_ld_map and op == 0 and regs == 0 and code[off + 2 : off + 4] == b"\0\0":
            was_ld_map = False
            code[off + 4 : off + 8] = b"\0\0\0\0"
        else:
            was_ld_map = False
    raw = bytes(code)
    return frozenset({hashlib.sha256(raw).hexdigest()[:16], hashlib.sha1(raw).hexdigest()[:16]})


@lru_cache(maxsize=4)
def _tags_of(path: str, mtime_ns: int, tunnel: bool = False) -> dict[TcHook, frozenset[str]]:
    obj, _ = load_object(Path(path))
    fds = dict.fromkeys(obj.maps, 0)
    programs = TUNNEL_PROGRAMS if tunnel else PROGRAMS
    return {hook: program_tags(obj.program(section).with_maps(fds)) for hook, section, _ in programs}


def expected_tags(tunnel: bool = False) -> dict[TcHook, frozenset[str]]:
    """The tags of the programs Stockade builds, per hook, from its own object file (``tunnel``:
    those for the WireGuard interface, built for a link without an Ethernet header)."""
    path = object_path()
    return _tags_of(str(path), path.stat().st_mtime_ns, tunnel)


def check_programs(backend: EbpfBackend, our_map_ids: frozenset[int]) -> tuple[str, ...]:
    """Every protected interface runs our program at both hooks; returns notes on foreign filters."""
    loader = backend.loader
    tags = expected_tags()
    links = loader.list_interfaces()
    if not links:
        raise UnmodelledConstructError("eBPF", "no Ethernet interface to protect")
    hooks = tuple((link.index, hook.parent) for link in links for hook in TcHook)
    names = {link.index: link.name for link in links}
    ours: dict[tuple[str, TcHook], rtnl.TcFilter] = {}
    notes: list[str] = []
    for f in rtnl.filters(loader.netns, hooks):
        hook = TcHook.INGRESS if f.parent == rtnl.PARENT_INGRESS else TcHook.EGRESS
        where = f"{names.get(f.ifindex, f.ifindex)} {hook.value}"
        if f.pref == loader.pref and f.handle == 1 and f.kind == "bpf":
            ours[(names.get(f.ifindex, str(f.ifindex)), hook)] = f
        elif f.pref < loader.pref:
            raise UnmodelledConstructError(where, f"a foreign tc filter ({f.kind}, pref {f.pref}) runs before ours")
        else:
            notes.append(f"{where}: tc filter {f.kind} pref {f.pref} runs after ours (assumed not to widen)")
    for link in links:
        for hook in TcHook:
            attached = ours.get((link.name, hook))
            where = f"{link.name} {hook.value}"
            if attached is None:
                raise UnmodelledConstructError(where, "no Stockade program attached (packets unfiltered)")
            if attached.tag not in tags[hook]:
                raise UnmodelledConstructError(where, f"program tag {attached.tag} is not the one Stockade built")
            fd = bpf.prog_fd_by_id(attached.prog_id)
            try:
                used = frozenset(bpf.prog_info(fd).map_ids)
            finally:
                bpf.close_fd(fd)
            if not used <= our_map_ids:
                raise UnmodelledConstructError(where, "the program uses maps that are not Stockade's pinned maps")
    return tuple(notes)


# ---- trie entries ------------------------------------------------------------------------------


def _lpm_ranges(entries: list[tuple[int, int, int]], top: int, miss: int) -> list[tuple[int, int, int]]:
    """Nested or disjoint prefixes (first, last, value) -> disjoint (first, last, value)
    covering 0..top, the longest covering prefix winning (``miss`` where none covers)."""
    entries = sorted(entries, key=lambda e: (e[0], -e[1]))
    out: list[tuple[int, int, int]] = []
    stack: list[tuple[int, int]] = []  # (last, value) of the open prefixes
    pos = 0

    def emit(upto: int) -> None:
        nonlocal pos
        if pos <= upto:
            value = stack[-1][1] if stack else miss
            if out and out[-1][2] == value and out[-1][1] + 1 == pos:
                out[-1] = (out[-1][0], upto, value)
            else:
                out.append((pos, upto, value))
            pos = upto + 1

    for first, last, value in entries:
        while stack and stack[-1][0] < first:
            emit(stack[-1][0])
            stack.pop()
        emit(first - 1)
        stack.append((last, value))
    while stack:
        emit(stack[-1][0])
        stack.pop()
    emit(top)
    return out


def _prefix(data: bytes, width: int, plen: int) -> tuple[int, int]:
    value = int.from_bytes(data, "big")
    host = width - plen
    first = (value >> host) << host
    return first, first + (1 << host) - 1


PolicyKey = tuple[int, int, int]  # identity, direction, protocol byte


Prefixes = list[tuple[int, int, int]]


def decode_trie(raw: dict[bytes, bytes]) -> tuple[dict[Family, Prefixes], dict[PolicyKey, Prefixes]]:
    """Peer prefixes per family (first, last, identity) and policy port prefixes per
    (identity, direction, protocol) (first, last, verdict); refuses what no lookup reads as such."""
    peers: dict[Family, list[tuple[int, int, int]]] = {Family.V4: [], Family.V6: []}
    policy: dict[PolicyKey, list[tuple[int, int, int]]] = {}
    protos = {p.value for p in L4}
    verdicts = (Verdict.ALLOW.value, Verdict.BLOCK.value, Verdict.ALLOW_ENCRYPTED.value)
    unpack_key, unpack_value = _KEY.unpack, _VALUE.unpack
    for key, value in raw.items():
        if len(key) != KEY_SIZE or len(value) != _VALUE.size:
            raise UnmodelledConstructError("eBPF trie", f"entry of {len(key)}/{len(value)} bytes")
        plen, kind, data = unpack_key(key)
        a, _rule = unpack_value(value)
        if plen < 8:
            raise UnmodelledConstructError("eBPF trie", f"an entry of prefix length {plen} (matches every kind)")
        family = FAMILY_OF_KIND.get(kind)
        if family is not None:
            width = _BITS[family]
            if plen - 8 > width:
                raise UnmodelledConstructError("eBPF trie", f"peer entry longer than an address ({plen - 8} bits)")
            first, last = _prefix(data[: width // 8], width, plen - 8)
            peers[family].append((first, last, a))
            continue
        if kind != KIND_POLICY:
            raise UnmodelledConstructError("eBPF trie", f"entry of kind {kind}")
        bits = plen - 8 - POLICY_FIXED_BITS
        if not 0 <= bits <= 16:
            raise UnmodelledConstructError("eBPF trie", f"policy entry of prefix length {plen}")
        identity, direction, proto, port = struct.unpack_from(">IBBH", data, 0)
        if direction not in _DIRECTION or proto not in protos:
            raise UnmodelledConstructError("eBPF trie", f"policy entry for direction {direction} protocol {proto}")
        if a not in verdicts:
            raise UnmodelledConstructError("eBPF trie", f"policy verdict {a}")
        first, last = _prefix(port.to_bytes(2, "big"), 16, bits)
        policy.setdefault((identity, direction, proto), []).append((first, last, a))
    return peers, policy


# ---- the model ---------------------------------------------------------------------------------


def _ident_set(identity: int) -> str:
    return f"identity_{identity}"


def _proto_match(family: Family, proto: int, first: int, last: int) -> tuple[Match, ...] | None:
    """What a policy entry (protocol byte, first..last) covers among this family's packets."""
    icmp = _ICMP[family]
    if proto == L4.OTHER.value:  # every protocol but TCP, UDP and this family's ICMP, port 0
        if first > 0:
            return None
        return (IntIn(Field.L4PROTO, tuple(sorted(((6, 6), (17, 17), (icmp, icmp)))), negate=True),)
    if proto in (L4.ICMP.value, L4.ICMPV6.value):
        if proto != icmp or first > 255:
            return None  # the other family's ICMP is keyed as OTHER: never looked up
        return IntIn(Field.L4PROTO, ((proto, proto),)), IntIn(Field.ICMP_TYPE, ((first, min(last, 255)),))
    return IntIn(Field.L4PROTO, ((proto, proto),)), IntIn(Field.DPORT, ((first, last),))


def datapath_rules(
    family: Family,
    mode: EnforcementMode,
    peers: list[tuple[int, int, int]],
    policy: dict[PolicyKey, list[tuple[int, int, int]]],
    *,
    tunnel: Steering | None = None,
    wg_mark: int = 0,
) -> FamilyRules:
    """The fixed program with these maps, as one base chain per hook (see the module doc).
    ``tunnel``: what ``stk_current``'s WireGuard interface index names (None: no tunnel fields
    and no ``allow-encrypted`` entry: the encrypted-flow checks cannot fire); ``wg_mark``: its
    fwmark (0 or wireguard-go's socket mark)."""
    if tunnel is None and any(v == Verdict.ALLOW_ENCRYPTED.value for es in policy.values() for _, _, v in es):
        tunnel = Steering.NONE
    top = (1 << _BITS[family]) - 1
    by_ident: dict[int, list[Range]] = {}
    for first, last, ident in _lpm_ranges(peers, top, 0):
        by_ident.setdefault(ident, []).append((first, last))
    sets = {_ident_set(i): AddressSet(family, tuple(r)) for i, r in by_ident.items()}
    default = Kind.DROP if mode is EnforcementMode.FULL else Kind.ACCEPT
    chains: dict[str, Chain] = {}
    hooks: dict[HookName, tuple[str, ...]] = {}
    accept = RuleVerdict(Kind.ACCEPT)
    grouped: dict[tuple[int, int], list[tuple[int, Prefixes]]] = {}
    for (ident, direction, proto), entries in sorted(policy.items()):
        grouped.setdefault((ident, direction), []).append((proto, entries))
    for direction, hook in _DIRECTION.items():
        rules: list[Rule] = []
        if hook is HookName.OUTPUT and wg_mark:
            rules.append(Rule((PacketMark(wg_mark),), accept, "wireguard-go's own packets"))
        if family is Family.V6:
            nd = IntIn(Field.ICMP_TYPE, (ND_TYPES,))
            rules.append(Rule((IntIn(Field.L4PROTO, ((58, 58),)), nd), accept, "neighbour discovery"))
        if tunnel is not None:
            rules += tunnel_rules(hook, tunnel, (ConnEncrypted(),), "encrypted flow")
        rules.append(Rule((CtState(frozenset({"established", "related"})),), accept, "known flow"))
        rules.append(Rule((Loopback(hook),), accept, "loopback: not attached"))
        peer = Addr.SADDR if hook is HookName.INPUT else Addr.DADDR
        for ident in sorted(by_ident):
            chain = f"{hook.value}_identity_{ident}"
            chains[chain] = Chain(chain, _policy_rules(family, mode, grouped.get((ident, direction), []), hook,
                                                       tunnel or Steering.NONE))
            rules.append(Rule((AddrIn(peer, family, _ident_set(ident)),), RuleVerdict(Kind.JUMP, chain)))
        chains[hook.value] = Chain(hook.value, tuple(rules), policy=default)
        hooks[hook] = (hook.value,)
    return FamilyRules(family, chains, hooks, sets)


def _policy_rules(
    family: Family,
    mode: EnforcementMode,
    groups: list[tuple[int, Prefixes]],
    hook: HookName = HookName.INPUT,
    tunnel: Steering = Steering.NONE,
) -> tuple[Rule, ...]:
    """One identity's policy entries of one direction, ``groups`` (protocol byte, port
    prefixes) in protocol order, resolved by longest prefix into disjoint rules."""
    rules: list[Rule] = []
    miss = -1
    for proto, entries in groups:
        for first, last, verdict in _lpm_ranges(entries, 65535, miss):
            if verdict == miss:
                continue
            matches = _proto_match(family, proto, first, last)
            if matches is None:
                continue
            if verdict == Verdict.ALLOW_ENCRYPTED.value:
                rules += tunnel_rules(hook, tunnel, matches, "allow-encrypted")
                continue
            allow = verdict == Verdict.ALLOW.value or mode is EnforcementMode.VISIBILITY
            rules.append(Rule(matches, RuleVerdict(Kind.ACCEPT if allow else Kind.DROP)))
    return tuple(rules)


def tunnel_rules(hook: HookName, tunnel: Steering, matches: tuple[Match, ...], comment: str) -> list[Rule]:
    """The datapath's ``deliver`` for packets ``matches`` selects that go through the tunnel only
    (an encrypted flow's, or an ``allow-encrypted`` entry's): egress, steered (the redirect to
    ``stk_current``'s interface, whose fate :func:`~stockade.verify.tunnel.output_exit` applies)
    and passed; ingress, passed when it arrived on the interface ``stk_current`` names (the
    tunnel; with an Ethernet interface named instead, every packet that did not come through the
    tunnel counts as on it), else dropped, in every mode."""
    if hook is HookName.OUTPUT:
        return [Rule(matches, RuleVerdict(Kind.MARK), comment), Rule(matches, RuleVerdict(Kind.ACCEPT), comment)]
    out: list[Rule] = []
    if tunnel is not Steering.NONE:
        on_wg = Tunnel(HookName.INPUT, negate=tunnel is Steering.CLEAR)
        out.append(Rule((*matches, on_wg), RuleVerdict(Kind.ACCEPT), comment))
    out.append(Rule(matches, RuleVerdict(Kind.DROP), f"{comment}: in the clear"))
    return out


def tunnel_steering(backend: EbpfBackend, cur: Current, our_map_ids: frozenset[int],
                    wg_interface: str | None = None) -> tuple[Steering | None, tuple[str, ...]]:
    """What ``stk_current``'s WireGuard interface index names (see the module doc), and notes."""
    if cur.wg_mark not in (0, SOCKET_MARK):
        raise UnmodelledConstructError("stk_current", f"fwmark 0x{cur.wg_mark:x} (only wireguard-go's socket mark "
                                       f"0x{SOCKET_MARK:x} is modelled)")
    if not cur.wg_ifindex:
        return (Steering.NONE if cur.wg_mark else None), ()
    link = next((x for x in rtnl.links(backend.loader.netns) if x.index == cur.wg_ifindex), None)
    if link is None:
        return Steering.NONE, (f"eBPF: stk_current names interface index {cur.wg_ifindex}, which does not exist",)
    if wg_interface is not None and link.name != wg_interface and link.hw_type != rtnl.ARPHRD_ETHER:
        raise UnmodelledConstructError("stk_current", f"interface {link.name} is not the WireGuard interface "
                                       f"{wg_interface}")
    if link.hw_type == rtnl.ARPHRD_ETHER:
        return Steering.CLEAR, (f"eBPF: stk_current names {link.name}, an Ethernet interface, as the tunnel",)
    if link.hw_type != 65534:  # ARPHRD_NONE: WireGuard (kernel or wireguard-go's tun)
        raise UnmodelledConstructError(f"interface {link.name}", f"link type {link.link_type} as the tunnel")
    tags = expected_tags(tunnel=True)
    listed = rtnl.filters(backend.loader.netns, tuple((link.index, h.parent) for h in TcHook))
    for hook in TcHook:
        here = [x for x in listed if x.parent == hook.parent]
        where = f"{link.name} {hook.value}"
        first = min((x.pref for x in here), default=None)
        f = next((x for x in here if x.pref == backend.loader.pref and x.handle == 1 and x.kind == "bpf"), None)
        if f is None or first != backend.loader.pref:
            raise UnmodelledConstructError(where, "the WireGuard interface runs no Stockade program first "
                                           "(its packets would be unfiltered)")
        if f.tag not in tags[hook]:
            raise UnmodelledConstructError(where, f"program tag {f.tag} is not the tunnel program Stockade built")
        fd = bpf.prog_fd_by_id(f.prog_id)
        try:
            used = frozenset(bpf.prog_info(fd).map_ids)
        finally:
            bpf.close_fd(fd)
        if not used <= our_map_ids:
            raise UnmodelledConstructError(where, "the program uses maps that are not Stockade's pinned maps")
    return Steering.TUNNEL, (f"eBPF: the tunnel is {link.name} (index {link.index}), running Stockade's tunnel "
                             f"programs; encrypted egress is redirected to it (mark 0x{STEER_MARK:x} in the model)",)


def read_ebpf(table: str = "stockade", netns: str | None = None, wg_interface: str | None = None) -> LoadedRuleset:
    """What the eBPF backend with pins under ``table`` has loaded in ``netns``."""
    backend = EbpfBackend(netns=netns, table=table)
    try:
        return _read(backend, wg_interface)
    except (ApplyError, bpf.BpfError, OSError) as exc:
        raise ProofError(f"cannot read back the eBPF maps of {table}: {exc}") from exc
    finally:
        backend.close()


def _read(backend: EbpfBackend, wg_interface: str | None = None) -> LoadedRuleset:
    loader = backend.loader
    cur: Current | None = loader.current()
    if cur is None:
        if loader.attachments():
            raise UnmodelledConstructError("eBPF", "programs attached without Stockade's maps")
        return LoadedRuleset("ebpf", False, (), flow_states=True)
    map_ids = frozenset(bpf.map_info(m.fd).id for m in loader.maps.values())
    trie = loader.trie(cur.generation)
    if trie is None:
        raise UnmodelledConstructError(f"generation {cur.generation}", "the trie in force is missing")
    with trie:
        map_ids |= {bpf.map_info(trie.fd).id}
        raw = dict(trie.items())
    notes = check_programs(backend, map_ids)
    tunnel, tunnel_notes = tunnel_steering(backend, cur, map_ids, wg_interface)
    notes += tunnel_notes
    peers, policy = decode_trie(raw)
    families = tuple(datapath_rules(f, cur.mode, peers[f], policy, tunnel=tunnel, wg_mark=cur.wg_mark)
                     for f in (Family.V4, Family.V6))
    notes += (
        "eBPF: later IP fragments, malformed and non-IP packets and packets for other hosts are outside the model",
    )
    return LoadedRuleset("ebpf", True, families, notes, flow_states=True, steering=tunnel or Steering.NONE)

