"""Pure rendering of a HostPolicy into Windows Firewall rules (a NetSecurity PowerShell script).

The artifact (:class:`WindowsArtifact`) is structured data: firewall rules in Stockade's own
rule group (``Stockade``), the dynamic keyword addresses they reference, and the profile
defaults; :mod:`stockade.backends.windows.script` turns it into the PowerShell text.

Windows evaluates every block rule before every allow rule, whatever the order, and then
the profile's default action. Stockade's precedence maps onto that as follows:

* **override-deny** -> block rules (block beats allow: exactly override-deny's meaning);
* **allow** -> allow rules (full mode only: selective and visibility default to allow);
* **deny** (selective mode) -> block rules for *the deny minus every allow that crosses it*:
  address and port set difference computed symbolically by
  :func:`stockade.backends.setalgebra.carve`, so the rules depend on the policy's rules only,
  and peer churn changes keyword addresses, never rules. In full mode a deny is not rendered
  (the default blocks it already). The renderer subtracts rather than refuses; the unit test
  ``tests/unit/test_windows_semantics.py`` proves the result equal to the reference evaluator
  on random policies;
* **failsafe**: allow rules in full mode (management ports inbound, controller outbound,
  ICMPv6 neighbour discovery); every block (override-deny included, as the evaluator checks
  the failsafe first) has the failsafe subtracted. Established flows are kept by Windows'
  stateful filtering; loopback is not filtered by Windows Firewall.
* **modes** through ``Set-NetFirewallProfile``: full -> Block/Block, selective -> Allow/Allow,
  visibility -> Allow/Allow with no Stockade rule at all and ``LogAllowed``/``LogBlocked`` on
  (Windows cannot log per rule: every connection is logged and the agent classifies the
  would-be drops with the evaluator), idle -> remove everything and reset the defaults to
  ``NotConfigured``.

A block piece that still covers "every other IP protocol" while some TCP/UDP/ICMP part was
carved out cannot be one rule: Windows' ``-Protocol`` takes one protocol, with no exclusion.
:attr:`OtherProtocols.EXPAND` renders it as one rule per remaining protocol number (a loop in
the script); :attr:`OtherProtocols.REFUSE` fails closed with UnsupportedFeatureError instead.

Peers: :attr:`PeerMode.DYNAMIC_KEYWORDS` (Windows 10/Server 2022 build 20348+) puts each peer
expression's addresses in a dynamic keyword address; a keyword never becomes empty (an empty
remote address means *any* to Windows), it then holds :data:`NOTHING_ADDRESS` (``100::``, in
the RFC 6666 discard-only prefix). :attr:`PeerMode.ADDRESS_LISTS` inlines ``-RemoteAddress``
lists and drops a rule whose list is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from stockade.backends.common import controller_port, limit_of
from stockade.backends.setalgebra import (
    LAYER4,
    ND_TYPES,
    BlockPiece,
    PeerExpr,
    ServiceSpace,
    Subtrahend,
    SubtrahendKind,
    carve,
)
from stockade.backends.windows.model import (
    ANY_REMOTE,
    BACKEND_NAME,
    OtherProtocols,
    PeerMode,
    ProfileAction,
    RemoteKind,
    WinAction,
    WinDirection,
    WindowsArtifact,
    WindowsPlan,
    WinKeyword,
    WinProtocol,
    WinRemote,
    WinRule,
    address_items,
)
from stockade.backends.windows.script import apply_script
from stockade.compiler.ir import Direction, HostPolicy, HostRule
from stockade.errors import RenderError, UnsupportedFeatureError
from stockade.model.addresses import AddressRanges, Family, Range
from stockade.model.rules import Action
from stockade.model.services import Proto
from stockade.model.workloads import EnforcementMode

_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


# ---- building ------------------------------------------------------------------------


def _validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise RenderError(f"address set name {name!r} is not a valid Windows keyword name ([A-Za-z0-9_]{{1,64}})")
    return name


def _win_direction(d: Direction) -> WinDirection:
    return WinDirection.INBOUND if d is Direction.INBOUND else WinDirection.OUTBOUND


_L4_PROTOCOL = {Proto.TCP: WinProtocol.TCP, Proto.UDP: WinProtocol.UDP, Proto.ICMP: WinProtocol.ICMPV4,
                Proto.ICMPV6: WinProtocol.ICMPV6}  # fmt: skip


def _full(proto: Proto, ranges: tuple[Range, ...]) -> bool:
    limit = limit_of(proto)
    return ranges == ((0, limit),)


@dataclass(frozen=True)
class _RuleShape:
    protocol: WinProtocol
    ports: tuple[Range, ...]
    icmp_types: tuple[Range, ...]


def space_shapes(space: ServiceSpace, rule_id: str, other: OtherProtocols) -> list[_RuleShape]:
    """The Windows rules (one protocol each) that together match ``space``."""
    if space.is_everything():
        return [_RuleShape(WinProtocol.ANY, (), ())]
    shapes: list[_RuleShape] = []
    for proto in LAYER4:
        ranges = space.ranges(proto)
        if not ranges:
            continue
        narrow = () if _full(proto, ranges) else ranges
        if proto.has_ports:
            shapes.append(_RuleShape(_L4_PROTOCOL[proto], narrow, ()))
        else:
            shapes.append(_RuleShape(_L4_PROTOCOL[proto], (), narrow))
    if space.other:
        if other is OtherProtocols.REFUSE:
            raise UnsupportedFeatureError(
                BACKEND_NAME,
                "an any-protocol block with a TCP/UDP/ICMP exception (Windows rules cannot exclude protocols)",
                rule_id,
            )
        shapes.append(_RuleShape(WinProtocol.OTHER, (), ()))
    return shapes


def _failsafe_subtrahends(hp: HostPolicy, direction: Direction) -> list[Subtrahend]:
    nd = ServiceSpace.single(Proto.ICMPV6, ND_TYPES)
    out = [Subtrahend(SubtrahendKind.EVERYWHERE, nd, why="failsafe:nd")]
    fs = hp.failsafe
    if direction is Direction.INBOUND and fs.management:
        out.append(Subtrahend(SubtrahendKind.EVERYWHERE, ServiceSpace.of(fs.management), why="failsafe:management"))
    if direction is Direction.OUTBOUND and fs.controller:
        port = fs.controller_port
        out.append(
            Subtrahend(
                SubtrahendKind.CONTROLLER, ServiceSpace.single(Proto.TCP, ((port, port),)), why="failsafe:controller"
            )
        )
    return out


class _Builder:
    def __init__(self, hp: HostPolicy, peer_mode: PeerMode, other: OtherProtocols) -> None:
        self.hp = hp
        self.peer_mode = peer_mode
        self.other = other
        self.rules: list[WinRule] = []
        self.keywords: dict[str, WinKeyword] = {}

    def remote(self, expr: PeerExpr) -> WinRemote | None:
        """The remote condition for ``expr``; None when a list would be empty (no rule)."""
        for name in (expr.base, *expr.minus):
            _validate_name(name)
        items = address_items(expr.resolve(self.hp))
        if self.peer_mode is PeerMode.ADDRESS_LISTS:
            return WinRemote(RemoteKind.LIST, addresses=items) if items else None
        name = expr.name
        self.keywords.setdefault(name, WinKeyword(name, expr, items))
        return WinRemote(RemoteKind.KEYWORD, keyword=name)

    def add(self, rule_id: str, direction: Direction, action: WinAction, remote: WinRemote, shape: _RuleShape) -> None:
        self.rules.append(
            WinRule(
                len(self.rules) + 1,
                rule_id,
                _win_direction(direction),
                action,
                shape.protocol,
                remote,
                shape.ports,
                shape.icmp_types,
            )
        )

    def add_space(
        self, rule_id: str, direction: Direction, action: WinAction, remote: WinRemote | None, space: ServiceSpace
    ) -> None:
        if remote is None or space.is_empty():
            return
        for shape in space_shapes(space, rule_id, self.other):
            self.add(rule_id, direction, action, remote, shape)

    def failsafe_allows(self) -> None:
        fs = self.hp.failsafe
        nd = ServiceSpace.single(Proto.ICMPV6, ND_TYPES)
        for direction in (Direction.INBOUND, Direction.OUTBOUND):
            self.add_space("failsafe:nd", direction, WinAction.ALLOW, ANY_REMOTE, nd)
        if fs.management:
            mgmt = ServiceSpace.of(fs.management)
            self.add_space("failsafe:management", Direction.INBOUND, WinAction.ALLOW, ANY_REMOTE, mgmt)
        if fs.controller:
            port = controller_port(fs.controller_port)
            items = address_items(AddressRanges.of(fs.controller))
            self.add_space(
                "failsafe:controller",
                Direction.OUTBOUND,
                WinAction.ALLOW,
                WinRemote(RemoteKind.LIST, addresses=items),
                ServiceSpace.single(Proto.TCP, ((port, port),)),
            )

    def block(self, rule: HostRule, crossing: list[HostRule]) -> None:
        subtrahends = _failsafe_subtrahends(self.hp, rule.direction)
        subtrahends += [
            Subtrahend(SubtrahendKind.PEER, ServiceSpace.of(a.services), peer=a.peer, why=a.rule_id) for a in crossing
        ]
        pieces: tuple[BlockPiece, ...] = carve(rule.peer, ServiceSpace.of(rule.services), subtrahends)
        for piece in pieces:
            self.add_space(rule.rule_id, rule.direction, WinAction.BLOCK, self.remote(piece.peer), piece.space)


def _check_sets(hp: HostPolicy) -> None:
    present = {(s.name, s.family) for s in hp.sets}
    for rule in hp.rules:
        for family in (Family.V4, Family.V6):
            if (rule.peer, family) not in present:
                raise RenderError(f"rule {rule.rule_id} references missing set {rule.peer} ({family.name})")


_DEFAULTS = {
    EnforcementMode.FULL: (ProfileAction.BLOCK, ProfileAction.BLOCK, False, True),
    EnforcementMode.SELECTIVE: (ProfileAction.ALLOW, ProfileAction.ALLOW, False, True),
    EnforcementMode.VISIBILITY: (ProfileAction.ALLOW, ProfileAction.ALLOW, True, True),
    EnforcementMode.IDLE: (ProfileAction.NOT_CONFIGURED, ProfileAction.NOT_CONFIGURED, False, False),
}


def render_windows(
    hp: HostPolicy,
    peer_mode: PeerMode = PeerMode.DYNAMIC_KEYWORDS,
    other_protocols: OtherProtocols = OtherProtocols.EXPAND,
) -> WindowsArtifact:
    """Render ``hp`` (pure). Capabilities are checked by the backend before this runs."""
    inbound, outbound, log_allowed, log_blocked = _DEFAULTS[hp.mode]
    if hp.mode is EnforcementMode.IDLE:
        plan = WindowsPlan(hp.workload, hp.mode, peer_mode, False, (), (), inbound, outbound, False, False)
        return WindowsArtifact(plan, apply_script(plan), hp)
    _check_sets(hp)
    b = _Builder(hp, peer_mode, other_protocols)
    if hp.mode is EnforcementMode.FULL:
        b.failsafe_allows()
    if hp.mode is not EnforcementMode.VISIBILITY:
        for rule in hp.rules:
            if rule.action is Action.OVERRIDE_DENY:
                b.block(rule, [])
            elif rule.action is Action.ALLOW and hp.mode is EnforcementMode.FULL:
                b.add_space(
                    rule.rule_id,
                    rule.direction,
                    WinAction.ALLOW,
                    b.remote(PeerExpr(rule.peer)),
                    ServiceSpace.of(rule.services),
                )
            elif rule.action is Action.DENY and hp.mode is EnforcementMode.SELECTIVE:
                crossing = [a for a in hp.rules if a.action is Action.ALLOW and a.direction is rule.direction]
                b.block(rule, crossing)
    plan = WindowsPlan(
        hp.workload,
        hp.mode,
        peer_mode,
        True,
        tuple(sorted(b.keywords.values(), key=lambda k: k.name)),
        tuple(b.rules),
        inbound,
        outbound,
        log_allowed,
        log_blocked,
    )
    return WindowsArtifact(plan, apply_script(plan), hp)


def rekeyword(plan: WindowsPlan, hp: HostPolicy) -> WindowsPlan:
    """The same rules with keyword addresses recomputed from ``hp``'s sets (for set deltas)."""
    keywords = tuple(WinKeyword(k.name, k.expr, address_items(k.expr.resolve(hp))) for k in plan.keywords)
    return replace(plan, keywords=keywords)
