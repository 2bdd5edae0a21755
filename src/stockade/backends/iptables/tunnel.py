"""``encrypt: true`` on the iptables+ipset backend: the rule text that steers encrypted rules'
traffic into the WireGuard interface and keeps it out of the clear (pure), and the
``iptables-restore`` section for the ``mangle`` table that carries the steering.

The device, its peers and the policy routing (``ip rule fwmark 0x5745 lookup 22341``) are the
shared :class:`stockade.backends.wireguard.Tunnel`, exactly as for nftables; only the rule
rendering differs. The same guards, in iptables' words:

``mangle`` table (its ``OUTPUT`` hook re-routes a packet whose mark changed, as nftables'
``type route`` chain does), per family:

* ``<prefix>-STEER`` (jumped to from ``OUTPUT``): a packet routed to ``lo`` (the host talking to
  itself, e.g. in its own encrypted rule's peer set) returns untouched; wireguard-go's own packets (its fwmark
  ``0x5747``) return untouched; a packet of an encrypted connection (``-m connmark``) gets the
  steering mark; so does the first packet an encrypted outbound allow matches (service match
  and the peer ipset as in the filter table), and its connection is marked (``CONNMARK``);
  marked SYNs get the tunnel's MSS (the socket sized its segments for the device it was routed
  to first; without the clamp a bulk transfer stalls).
* ``<prefix>-POST`` (from ``POSTROUTING``, where the device is the one re-routed to): a marked
  packet leaving by any other interface (wireguard-go dead, the interface or its route gone) is
  dropped: never sent in the clear.

``filter`` table, in the chains the renderer writes anyway:

* ``<prefix>-INPUT`` starts with the drop of a packet of an encrypted connection that did not
  arrive through the tunnel (before the established/related failsafe could accept a forged
  plaintext packet into an encrypted connection) and the accept of the peers' WireGuard UDP;
* ``<prefix>-OUTPUT`` starts with the accept of wireguard-go's own packets;
* an encrypted rule's entry drops the rule's traffic that is not in the tunnel first (inbound
  ``! -i <wg>``: WireGuard's cryptokey routing guarantees the inner source address belongs to
  the sending key; outbound: not steered, ``-m mark ! --mark``), then marks the connection
  (``CONNMARK``: its replies take the tunnel too) and returns (accept).

Every line is written as ``iptables-save`` prints it back, so ``verify`` compares line by line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stockade.backends.iptables.scripts import save_table
from stockade.backends.wireguard import MTU, SOCKET_MARK, STEER_MARK
from stockade.compiler.ir import Direction, HostPolicy, HostRule, WireGuardConfig
from stockade.errors import RenderError
from stockade.model.addresses import Family
from stockade.model.rules import Action

TUNNEL_MSS = MTU - 60  # IPv6 header (40) + TCP header (20): fits both families
MANGLE_HOOKS = ("OUTPUT", "POSTROUTING")
_IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")


def mark_text(value: int) -> str:
    return f"0x{value:x}"


STEER = mark_text(STEER_MARK)
SOCK = mark_text(SOCKET_MARK)
SET_STEER = f"--set-xmark {STEER}/0xffffffff"


def validate_interface(name: str | None) -> str:
    if name is None or not _IFNAME_RE.match(name):
        raise RenderError(f"encrypted rules need a valid WireGuard interface name, got {name!r}")
    return name


def steer_chain(prefix: str) -> str:
    return f"{prefix}-STEER"


def post_chain(prefix: str) -> str:
    return f"{prefix}-POST"


def mangle_chain_names(prefix: str) -> tuple[str, str]:
    """Our mangle chains, in the order of :data:`MANGLE_HOOKS` (the hook that jumps to each)."""
    return steer_chain(prefix), post_chain(prefix)


# ---- filter table lines ---------------------------------------------------------------------


def plaintext_check(rule: HostRule, wg_interface: str) -> tuple[str, str]:
    """(prefix before the service match, suffix after the peer match) that select the rule's
    traffic *outside* the tunnel; iptables-save prints ``! -i`` before ``-p``."""
    if rule.direction is Direction.INBOUND:
        return f"! -i {wg_interface}", ""
    return "", f"-m mark ! --mark {STEER}"


def encrypted_entry(match: str, peer: str, rule: HostRule, comment: str, wg_interface: str,
                    logs: tuple[str, str] | None) -> list[str]:
    """An encrypted allow at one service match: its traffic outside the tunnel dropped, then the
    connection marked for the tunnel (``CONNMARK``: replies take it too) and accepted. ``logs``:
    the (drop, accept) flow-log matches and targets when flow logging is on."""
    before, after = plaintext_check(rule, wg_interface)
    head = " ".join(x for x in (match, peer) if x)
    outside = " ".join(x for x in (before, head, after) if x)
    lines = [f"{outside} {logs[0].replace('-j NFLOG', comment + ' -j NFLOG', 1)}"] if logs else []
    lines.append(f"{outside} {comment} -j DROP")
    if logs:
        lines.append(f"{head} {logs[1].replace('-j NFLOG', comment + ' -j NFLOG', 1)}")
    return [*lines, f"{head} {comment} -j CONNMARK {SET_STEER}", f"{head} {comment} -j RETURN"]


def input_guard(hp: HostPolicy, wg_interface: str, peer_ipsets: list[str]) -> list[str]:
    """The head of ``<prefix>-INPUT``: encrypted connections only from the tunnel; WireGuard UDP
    from the encrypted rules' peer sets (``peer_ipsets``, one family's; never a list of peers, so
    a peer change is a peer delta and the rules stay as they are)."""
    lines = [f'! -i {wg_interface} -m connmark --mark {STEER} -m comment --comment "failsafe:encrypted" -j DROP']
    if hp.wireguard is not None:
        port = hp.wireguard.listen_port
        accept = '-m comment --comment "failsafe:wireguard" -j RETURN'
        lines += [f"-p udp -m udp --dport {port} -m set --match-set {name} src {accept}" for name in peer_ipsets]
    return lines


def output_guard() -> list[str]:
    """The head of ``<prefix>-OUTPUT``: wireguard-go's own packets pass."""
    return [f"-m mark --mark {SOCK} -m comment --comment \"failsafe:wireguard\" -j RETURN"]


# ---- mangle table --------------------------------------------------------------------------


@dataclass(frozen=True)
class MangleRuleset:
    """One family's steering chains: ``(name, rules)`` for ``<prefix>-STEER`` and ``<prefix>-POST``."""

    family: Family
    steer: tuple[str, ...]
    post: tuple[str, ...]


def mangle_ruleset(hp: HostPolicy, family: Family, prefix: str, wg_interface: str,
                   peer_matches: list[tuple[str, str]]) -> MangleRuleset:
    """``peer_matches``: (service match, peer set match) of every encrypted outbound allow, in order."""
    steer = [
        "-o lo -j RETURN",  # to the host itself: never the tunnel (marked, the POST guard would drop it)
        f"-m mark --mark {SOCK} -j RETURN",
        f"-m connmark --mark {STEER} -j MARK {SET_STEER}",
        *(" ".join(x for x in (match, peer, f"-j MARK {SET_STEER}") if x) for match, peer in peer_matches),
        f"-m mark --mark {STEER} -j CONNMARK {SET_STEER}",
        f"-p tcp -m mark --mark {STEER} -m tcp --tcp-flags SYN SYN -j TCPMSS --set-mss {TUNNEL_MSS}",
    ]
    post = [f"! -o {wg_interface} -m mark --mark {STEER} -m comment --comment \"failsafe:encrypted\" -j DROP"]
    return MangleRuleset(family, tuple(steer), tuple(post))


def encrypted_outbound(hp: HostPolicy) -> list[HostRule]:
    return [r for r in hp.rules if r.encrypt and r.action is Action.ALLOW and r.direction is Direction.OUTBOUND]


@dataclass(frozen=True)
class MangleState:
    """What one family's mangle table holds of ours: chain rules and the built-in chains' jumps."""

    chains: dict[str, tuple[str, ...]]
    jumps: tuple[tuple[str, str], ...]  # (built-in chain, rule spec) whose target is ours

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps


NO_MANGLE = MangleState({}, ())


def parse_mangle_save(text: str, prefix: str) -> MangleState:
    """Our chains and the jumps to them, from ``iptables-save -t mangle``."""
    ours = frozenset(mangle_chain_names(prefix))
    declared, rules = save_table(text, "mangle")
    chains = {n: tuple(rules[n]) for n in declared if n in ours}
    jumps = tuple((hook, s) for hook in MANGLE_HOOKS for s in rules.get(hook, ())
                  if s.split()[-1] in ours and s.split()[-2] in ("-j", "-g"))
    return MangleState(chains, jumps)


def mangle_script(want: MangleRuleset | None, state: MangleState, prefix: str) -> str:
    """The ``*mangle`` section bringing our part from ``state`` to ``want`` (None: remove it);
    "" when there is nothing to do. Built-in chains are never flushed; only our jumps are touched."""
    if want is None and state.empty:
        return ""
    names = mangle_chain_names(prefix)
    lines = ["*mangle"]
    present = [n for n in names if n in state.chains]
    wanted = list(names) if want is not None else []
    lines += [f":{n} - [0:0]" for n in dict.fromkeys((*wanted, *present))]  # create, or flush
    if want is not None:
        lines += [f"-A {names[0]} {r}" for r in want.steer]
        lines += [f"-A {names[1]} {r}" for r in want.post]
    for hook, chain in zip(MANGLE_HOOKS, names, strict=True):
        exact = f"-j {chain}"
        jumps = [s for h, s in state.jumps if h == hook]
        lines += [f"-D {hook} {s}" for s in jumps if s != exact]
        count = sum(1 for s in jumps if s == exact)
        if want is not None:
            lines += [f"-D {hook} {exact}"] * (count - 1) if count else [f"-I {hook} 1 {exact}"]
        else:
            lines += [f"-D {hook} {exact}"] * count
    if want is None:
        lines += [f"-X {n}" for n in present]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def mangle_problems(want: MangleRuleset | None, state: MangleState, prefix: str) -> list[str]:
    """What differs between the steering chains expected and those the kernel holds (tamper)."""
    tag = "IPv4" if want is None or want.family is Family.V4 else "IPv6"
    names = mangle_chain_names(prefix)
    if want is None:
        return [f"mangle chain {n} exists but no rule encrypts" for n in sorted(state.chains)]
    problems: list[str] = []
    for name, rules in zip(names, (want.steer, want.post), strict=True):
        got = state.chains.get(name)
        if got is None:
            problems.append(f"{tag} mangle chain {name} is missing")
        elif got != rules:
            problems.append(f"{tag} mangle chain {name} differs")
    for hook, chain in zip(MANGLE_HOOKS, names, strict=True):
        count = sum(1 for h, s in state.jumps if h == hook and s == f"-j {chain}")
        if count != 1:
            problems.append(f"{tag} mangle {hook} has {count} jumps to {chain}, expected 1")
    return problems


__all__ = [
    "MangleRuleset",
    "MangleState",
    "WireGuardConfig",
    "encrypted_entry",
    "input_guard",
    "mangle_problems",
    "mangle_ruleset",
    "mangle_script",
    "output_guard",
    "parse_mangle_save",
    "plaintext_check",
    "validate_interface",
]
