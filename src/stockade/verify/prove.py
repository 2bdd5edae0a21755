"""Prove that what is loaded equals the policy, per direction and family, or find a packet that differs.

:func:`prove` takes a HostPolicy (what the compiler says the host enforces) and a
:class:`~stockade.verify.loaded.LoadedRuleset` (what the kernel holds, read back) and decides,
for every packet of the modelled header space (:mod:`.space`), whether the kernel's verdict at
the input hook (inbound) and output hook (outbound) equals the policy's (:mod:`.spec`). When
not, it returns a concrete :class:`Packet` with both verdicts: chosen, where the difference
allows, as a NEW, non-loopback TCP SYN (else UDP, else ICMP) from/to a hint address, so the
lab can send it for real.

Pure: no I/O (the read-back adapters live in :mod:`.readback`).
"""

from __future__ import annotations

import gc
import ipaddress
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress, islice, repeat
from operator import add, attrgetter, itemgetter, le, ne

from stockade.compiler.ir import AddressSet, Direction, HostPolicy
from stockade.model.addresses import Family, IPAddress, IPNetwork, Range, merge_ranges
from stockade.verify.interpret import Interpreter
from stockade.verify.loaded import CT_STATES, FamilyRules, Field, HookName, LoadedRuleset, Steering
from stockade.verify.members import symbolic_members
from stockade.verify.rulematch import peer_field
from stockade.verify.rulescan import RuleScan, scan_rules
from stockade.verify.space import (
    SYN,
    AddressClass,
    BDDNode,
    HeaderSpace,
    _members_at,
    address_classes,
    atom_classes,
)
from stockade.verify.spec import CONTROLLER_PRED, PolicySpec
from stockade.verify.tunnel import loopback_allowed, loopback_domain

PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
# Up to this many host rules, set membership is tried as BDD variables first (no address sweep:
# flat in the number of peers). Session 5 stopped at 300 (its forward walk rebuilt every
# port's decision list under each new rule: 1,000 rules 9 s against the sweep's 6 s); built
# from the last rule up, with runs of equal verdicts merged (:mod:`.interpret`), 1,000 rules
# take ~1.5 s and grow linearly, so the limit is only a guard (tests set it to -1 to force
# the sweep).
SYMBOLIC_MEMBERS_MAX_RULES = 20_000


@dataclass(frozen=True)
class Packet:
    """One packet of the header space, as the lab can send it."""

    family: Family
    direction: Direction
    src: IPAddress
    dst: IPAddress
    l4proto: int
    sport: int
    dport: int
    icmp_type: int
    tcp_flags: int
    ct_state: str
    loopback: bool
    # encrypted rules (:mod:`.tunnel`): inbound, it arrived through the WireGuard interface;
    # outbound, the verdict is about it leaving through the tunnel (else in the clear)
    tunnel: bool = False
    encrypted_connection: bool = False  # its connection is marked encrypted
    socket_mark: bool = False  # it carries wireguard-go's socket mark
    route_ok: bool = True  # the steering route / redirect target is there

    def __str__(self) -> str:
        proto = PROTO_NAMES.get(self.l4proto, f"proto {self.l4proto}")
        if self.l4proto in (6, 17):
            what = f"{proto} {self.src}:{self.sport} -> {self.dst}:{self.dport}"
            if self.l4proto == 6:
                what += f" flags 0x{self.tcp_flags:02x}"
        elif self.l4proto in (1, 58):
            what = f"{proto} type {self.icmp_type} {self.src} -> {self.dst}"
        else:
            what = f"{proto} {self.src} -> {self.dst}"
        lo = " on lo" if self.loopback else ""
        if self.tunnel:
            lo += " via the WireGuard tunnel" if self.direction is Direction.INBOUND else " into the WireGuard tunnel"
        elif self.direction is Direction.OUTBOUND:
            lo += " (in the clear)" if (self.encrypted_connection or self.socket_mark or not self.route_ok) else ""
        if self.encrypted_connection:
            lo += " of an encrypted connection"
        if self.socket_mark:
            lo += " with wireguard-go's fwmark"
        if not self.route_ok:
            lo += " with the tunnel's route missing"
        return f"{self.direction.name.lower()} {what} ct {self.ct_state}{lo}"


@dataclass(frozen=True)
class Difference:
    packet: Packet
    policy_accepts: bool
    kernel_accepts: bool

    def __str__(self) -> str:
        def word(b: bool) -> str:
            return "accept" if b else "drop"

        return f"{self.packet}: policy says {word(self.policy_accepts)}, kernel does {word(self.kernel_accepts)}"


@dataclass(frozen=True)
class Proof:
    """The outcome: ``proven`` when no packet differs in any direction and family."""

    backend: str
    workload: str
    differences: tuple[Difference, ...]
    classes: int  # address classes checked, over every direction and family
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def proven(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        if self.proven:
            return f"proven: {self.backend} on {self.workload} equals its policy ({self.classes} address classes)"
        return "differs: " + "; ".join(str(d) for d in self.differences)


_HOSTMASKS = {top: [(1 << (top - plen)) - 1 for plen in range(top + 1)] for top in (32, 128)}
_ADDRESS = attrgetter("network_address._ip")
_PREFIXLEN = attrgetter("_prefixlen")
_FIRST, _LAST = itemgetter(0), itemgetter(1)


def _ranges(nets: Iterable[IPNetwork]) -> tuple[Range, ...]:
    """Merged integer ranges of ``nets``."""
    firsts, lasts = _bounds(nets)
    return tuple(zip(firsts, lasts, strict=True))


def _bounds(nets: Iterable[IPNetwork]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Merged integer ranges of ``nets`` as (their first addresses, their last addresses); C-level
    iterators when they are already canonical (sorted, disjoint, not adjacent: what the compiler
    emits), which matters at 100k members."""
    nets = list(nets)
    if not nets:
        return (), ()
    # the ipaddress objects' integer and prefix length attributes read directly (``int()`` and
    # the ``prefixlen`` property cost twice as much, and this runs once per member)
    los = list(map(_ADDRESS, nets))
    plens = list(map(_PREFIXLEN, nets))
    top = nets[0].max_prefixlen
    # a range's last address: the first plus the host mask (a table lookup per prefix length,
    # not a shift and two subtractions of 128-bit integers); host routes are their own last
    his = los if plens.count(top) == len(plens) else list(map(add, los, map(_HOSTMASKS[top].__getitem__, plens)))
    ends = list(map(add, his, repeat(1)))  # first address after each range
    if not all(map(le, ends, islice(los, 1, None))):  # unsorted or overlapping
        merged = merge_ranges(zip(los, his, strict=True))
        return tuple(map(_FIRST, merged)), tuple(map(_LAST, merged))
    # sorted and disjoint: fuse adjacent ranges where the next one starts at this one's end
    breaks = list(compress(range(len(los) - 1), map(ne, ends, islice(los, 1, None))))
    if len(breaks) == len(los) - 1:  # none adjacent
        return tuple(los), tuple(his)
    starts = (los[0], *map(los.__getitem__, map(add, breaks, repeat(1))))
    lasts = (*map(his.__getitem__, breaks), his[-1])
    return starts, lasts


_KnownRanges = dict[tuple[int, int, int], tuple[Range, ...]]  # by (length, first address, last address)


def _known_ranges(sets: Iterable[tuple[Range, ...]]) -> _KnownRanges:
    """Range tuples that exist already (the read-back's sets), by their length and ends."""
    return {(len(r), r[0][0], r[-1][1]): r for r in sets if r}


def _as_ranges(firsts: tuple[int, ...], lasts: tuple[int, ...], known: _KnownRanges) -> tuple[Range, ...]:
    """``zip(firsts, lasts)`` as a tuple of ranges: a tuple of ``known`` when one is equal, else a
    new one. The kernel's copy of a policy set (iptables' ipsets) is then shared: a proof makes
    no (first, last) pair per member, which would outlive it (cached) and cost the cyclic
    collector a traversal of ~500k young tuples (0.12 s) when it resumes."""
    if not firsts:
        return ()
    same = known.get((len(firsts), firsts[0], lasts[-1]))
    if same is not None and tuple(map(_FIRST, same)) == firsts and tuple(map(_LAST, same)) == lasts:
        return same
    return tuple(zip(firsts, lasts, strict=True))


# The agent proves the same HostPolicy after every apply and periodically: its sets' merged bounds
# (100k members: ~0.2 s) are kept per AddressSet object, by identity. The entry holds the set
# itself, so an id is never reused while cached; a frozen set's members never change, so a hit is
# exact. Only the two tuples of integers are kept, not a pair per range (see :func:`_as_ranges`).
_SET_BOUNDS: dict[int, tuple[AddressSet, tuple[int, ...], tuple[int, ...]]] = {}
_SET_BOUNDS_MAX = 4096


def _set_ranges(s: AddressSet, known: _KnownRanges) -> tuple[Range, ...]:
    hit = _SET_BOUNDS.get(id(s))
    if hit is not None and hit[0] is s:
        return _as_ranges(hit[1], hit[2], known)
    firsts, lasts = _bounds(s.members)
    if len(_SET_BOUNDS) >= _SET_BOUNDS_MAX:
        _SET_BOUNDS.clear()  # the sets of the policy in force come back at its next proof
    _SET_BOUNDS[id(s)] = (s, firsts, lasts)
    return _as_ranges(firsts, lasts, known)


class _Preds:
    """Address predicates of one family; equal member ranges share one predicate."""

    def __init__(self) -> None:
        self.ranges: list[tuple[Range, ...]] = []
        # by (length, first, last), then compared: hashing 100k ranges of 128-bit integers costs
        # more than comparing them with the one candidate that usually exists
        self._ids: dict[tuple[int, Range | None, Range | None], list[int]] = {}

    def add(self, ranges: tuple[Range, ...]) -> int:
        key = (len(ranges), ranges[0], ranges[-1]) if ranges else (0, None, None)
        same = self._ids.setdefault(key, [])
        for found in same:
            if self.ranges[found] is ranges or self.ranges[found] == ranges:
                return found
        found = len(self.ranges)
        same.append(found)
        self.ranges.append(ranges)
        return found


_PREFERENCES: tuple[tuple[str, object], ...] = (
    ("ct", "new"),
    ("lo", False),
    ("smark", False),
    ("rt", True),
    ("enc", False),
    ("wg", False),
    ("proto", 6),
    ("proto", 17),
    ("proto", 1),
    ("proto", 58),
    ("flags", SYN),
    ("sport", (32768, 60999)),
    ("dport", (1, 65535)),
)


def _prefer(space: HeaderSpace, diff: BDDNode) -> BDDNode:
    for what, value in _PREFERENCES:
        if what == "ct":
            extra = space.ct_in((str(value),))
        elif what == "lo":
            extra = ~space.loopback
        elif what in ("smark", "rt", "enc", "wg"):
            extra = space.var(what) if value else ~space.var(what)
        elif what == "proto":
            extra = space.proto(int(value))  # type: ignore[call-overload]
        elif what == "flags":
            extra = space.tcp_flags(0xFF, int(value))  # type: ignore[call-overload]
        else:
            bounds: tuple[int, int] = value  # type: ignore[assignment]
            lo, hi = bounds
            extra = space.field_in(Field.SPORT if what == "sport" else Field.DPORT, ((lo, hi),))
        narrowed = diff & extra
        if narrowed != space.false:
            diff = narrowed
    return diff


def _address(family: Family, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if family is Family.V4 else ipaddress.IPv6Address(value)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic collector paused for the proof, restored after (a no-op when it was off).

    The proof allocates ~10^6 small objects (BDD handles, tuples) right after a read-back made
    ~10^6 more (the rules): each allocation burst triggers full collections that traverse the
    whole rule graph, 0.3-2.5 s CPU of a 1-1.5 s proof at 1,000 rules x 100,000 peers (measured
    with the collector off, same read-backs). The proof's own garbage is acyclic (freed by
    reference counting); what is cyclic waits for the next collection after the proof. Nothing
    of the proof's semantics depends on it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def prove(hp: HostPolicy, loaded: LoadedRuleset, *, hints: Iterable[IPAddress] = ()) -> Proof:
    """Decide whether ``loaded`` gives ``hp``'s verdict to every packet (see the module doc)."""
    with _no_cyclic_gc():
        return _prove(hp, loaded, hints=hints)


def _prove(hp: HostPolicy, loaded: LoadedRuleset, *, hints: Iterable[IPAddress] = ()) -> Proof:
    start = time.perf_counter()
    hints = tuple(hints)
    dynamic = {name for fr in loaded.families for name in fr.dynamic_sets}
    space = HeaderSpace(dynamic)
    differences: list[Difference] = []
    n_classes = 0
    for family in (Family.V4, Family.V6):
        fam_rules = loaded.family(family) if loaded.present else None
        locals_: list[int | None] = [int(a) for a in hp.local_addresses if a.version == family.value] or [None]
        domain = space.domain(family)
        if loaded.flow_states:
            domain = domain & space.flow_domain(family)
        flows = loaded.flow_states
        encrypts = hp.wireguard is not None or any(r.encrypt for r in hp.rules)
        if not encrypts:
            domain = domain & ~space.var("enc")  # nothing of this policy marks a connection encrypted
        # one set of address classes per family, for both directions (finer than either needs)
        preds = _Preds()
        scan = scan_rules(fam_rules) if fam_rules is not None else None
        peer_sets = (  # the kernel's sets tested against the peer, at either hook
            [name for hook in (HookName.INPUT, HookName.OUTPUT) for name in scan.sets_of(peer_field(hook))]
            if fam_rules is not None and scan is not None
            else []
        )
        known = _known_ranges(fam_rules.sets[name].ranges for name in peer_sets) if fam_rules is not None else {}
        spec_pred: dict[str, int] = {s.name: preds.add(_set_ranges(s, known)) for s in hp.sets if s.family is family}
        controller = _ranges(n for n in hp.failsafe.controller if n.version == family.value)
        if controller:
            spec_pred[CONTROLLER_PRED] = preds.add(controller)
        kernel_pred: dict[str, int] = {}
        if fam_rules is not None:
            for name in peer_sets:
                kernel_pred[name] = preds.add(fam_rules.sets[name].ranges)
        members = None
        if len(hp.rules) <= SYMBOLIC_MEMBERS_MAX_RULES and fam_rules is not None:
            members = symbolic_members(space, family, preds.ranges, spec_pred, kernel_pred)
        # encrypted rules: a packet on lo has a local peer address (the steering marks by address)
        local_sigs = {_members_at(preds.ranges, x) for x in locals_ if x is not None} if encrypts else set()
        if members is not None and fam_rules is not None:
            # fast path: membership as BDD variables, no address sweep (see members.symbolic_members)
            symbolic, constraint = members
            if local_sigs:
                constraint = constraint & loopback_domain(space, local_sigs, symbolic)
            if all(
                _symbolic_equal(space, hp, family, direction, spec_pred, fam_rules, hook, kernel_pred, local,
                                symbolic, domain & constraint, flows, loaded.steering, scan)
                for direction, hook in ((Direction.INBOUND, HookName.INPUT), (Direction.OUTBOUND, HookName.OUTPUT))
                for local in locals_
            ):  # fmt: skip
                continue
        family_hints = [int(h) for h in hints if h.version == family.value]
        # the kernel's sets as atoms when they allow it (eBPF identities), else the full sweep
        atoms = atom_classes(preds.ranges, kernel_pred.values(), family, family_hints)
        classes = atoms if atoms is not None else address_classes(preds.ranges, family, family_hints)
        n_classes += len(classes)
        for direction, hook in ((Direction.INBOUND, HookName.INPUT), (Direction.OUTBOUND, HookName.OUTPUT)):
            spec = PolicySpec(space, hp, family, direction, spec_pred, flow_states=flows)
            spec_keys = frozenset(spec_pred.values())
            interps = [
                Interpreter(space, fam_rules, hook, kernel_pred, local, steering=loaded.steering, scan=scan)
                if fam_rules is not None else None
                for local in locals_
            ]
            found = _check(space, spec, spec_keys, interps, classes, domain, local_sigs)
            if found is not None:
                cls, local, assignment, policy_accepts = found
                local = local if local is not None else locals_[0]
                differences.append(_difference(space, family, direction, cls, local, assignment, policy_accepts))
    return Proof(
        loaded.backend, hp.workload, tuple(differences), n_classes, time.perf_counter() - start, loaded.notes
    )


def _symbolic_equal(
    space: HeaderSpace,
    hp: HostPolicy,
    family: Family,
    direction: Direction,
    spec_pred: dict[str, int],
    fam_rules: FamilyRules,
    hook: HookName,
    kernel_pred: dict[str, int],
    local: int | None,
    members: dict[int, BDDNode],
    domain: BDDNode,
    flow_states: bool = False,
    steering: Steering = Steering.ROUTE,
    scan: RuleScan | None = None,
) -> bool:
    spec = PolicySpec(space, hp, family, direction, spec_pred, flow_states=flow_states)
    want = spec.accept_symbolic(members) & domain
    interp = Interpreter(space, fam_rules, hook, kernel_pred, local, members, steering=steering, scan=scan)
    have = interp.hook_accept(frozenset()) & domain
    return bool(want == have)


def _check(
    space: HeaderSpace,
    spec: PolicySpec,
    spec_keys: frozenset[int],
    interps: list[Interpreter | None],
    classes: list[AddressClass],
    domain: BDDNode,
    local_sigs: set[frozenset[int]] | None = None,
) -> tuple[AddressClass, int | None, dict[str, bool], bool] | None:
    fallback = None
    no_lo = domain & ~space.loopback
    for cls in classes:
        dom = domain if loopback_allowed(local_sigs or set(), cls.members) else no_lo
        want = spec.accept(cls.members & spec_keys) & dom
        for interp in interps:
            have = (interp.hook_accept(cls.members) if interp is not None else space.true) & dom
            if have != want:
                diff = _prefer(space, space.bdd.apply("xor", have, want))
                assignment = space.pick(diff)
                policy_accepts = bool(space.bdd.let(assignment, want) == space.true)
                found = cls, interp.local if interp is not None else None, assignment, policy_accepts
                if not (assignment.get("enc") or assignment.get("smark")):
                    return found
                # only a packet of an encrypted connection (or wireguard-go's) differs here: an
                # address with a difference a new connection shows is easier to confirm for real
                fallback = fallback or found
    return fallback


def _difference(
    space: HeaderSpace,
    family: Family,
    direction: Direction,
    cls: AddressClass,
    local: int | None,
    assignment: dict[str, bool],
    policy_accepts: bool,
) -> Difference:
    v = space.decode(assignment)
    peer = _address(family, cls.example)
    me = _address(family, local if local is not None else 0)
    src, dst = (peer, me) if direction is Direction.INBOUND else (me, peer)
    ct = CT_STATES[v["ct"]] if v["ct"] < len(CT_STATES) else "invalid"
    packet = Packet(
        family, direction, src, dst, v[Field.L4PROTO.value], v[Field.SPORT.value], v[Field.DPORT.value],
        v[Field.ICMP_TYPE.value], v["tcp-flags"], ct, bool(v["lo"]),
        bool(v["wg"]), bool(v["enc"]), bool(v["smark"]), bool(v["rt"]),
    )  # fmt: skip
    return Difference(packet, policy_accepts, not policy_accepts)
