"""Encrypted rules on iptables in the proof: the options of the steering, and the mangle table.

The iptables backend steers encrypted rules' traffic with the ``mangle`` table
(:mod:`stockade.backends.iptables.tunnel`): ``OUTPUT`` jumps to ``<prefix>-STEER`` (``MARK`` the
steering mark on packets of encrypted connections and on what an encrypted outbound allow matches;
the kernel re-routes a packet whose mark changed in mangle ``OUTPUT``), ``POSTROUTING`` jumps to
``<prefix>-POST`` (a marked packet not leaving by the WireGuard interface is dropped); the filter
table's guards test ``-i <wg>``, ``-m connmark --mark`` and ``-m mark --mark``. When the WireGuard
interface's name is known the read-back models them (else they are refused, as before):

* options: ``-i <wg>`` (arrived through the tunnel), ``-o <wg>`` (only in mangle ``POSTROUTING``:
  the device steering re-routed to), ``-m mark --mark V[/0xffffffff]`` and ``-m connmark --mark
  0x5745[/0xffffffff]`` (see :mod:`.tunnel` for the marks modelled);
* targets: ``MARK --set-xmark 0x5745/0xffffffff`` (only in chains mangle ``OUTPUT`` reaches: the
  packet is steered), ``CONNMARK --set-xmark 0x5745/0xffffffff`` (the connection's mark: no verdict
  now), ``TCPMSS --set-mss N`` (the clamp: no verdict);
* the mangle table's ``OUTPUT`` and ``POSTROUTING`` chains become base chains of the output hook
  (before and after the filter's ``OUTPUT``), their chains named ``mangle:<name>``; rules in its
  ``PREROUTING`` / ``INPUT`` / ``FORWARD`` are noted, as other tables' are.
"""

from __future__ import annotations

from stockade.backends.wireguard import STEER_MARK
from stockade.errors import UnmodelledConstructError
from stockade.verify.loaded import Chain, ConnEncrypted, HookName, Kind, Match, PacketMark, Tunnel, Verdict

MANGLE = "mangle:"
MANGLE_HOOKS = {"OUTPUT": 0, "POSTROUTING": 1}  # order among the output hook's base chains (filter in between)


def mark_value(text: str, where: str) -> int:
    """``V`` or ``V/0xffffffff`` (a full mask; anything else is refused)."""
    value, slash, mask = text.partition("/")
    try:
        v = int(value, 0)
        if slash and int(mask, 0) != 0xFFFFFFFF:
            raise ValueError(mask)
    except ValueError as exc:
        raise UnmodelledConstructError(where, f"mark {text!r} (only a full mask is modelled)") from exc
    return v


def mark_match(module: str, text: str, negate: bool, where: str) -> Match:
    """``-m mark --mark`` / ``-m connmark --mark``."""
    value = mark_value(text, where)
    if module == "mark":
        return PacketMark(value, negate)
    if value != STEER_MARK:
        raise UnmodelledConstructError(where, f"connmark {text!r} (only the steering mark is modelled)")
    return ConnEncrypted(negate)


def interface_match(flag: str, negate: bool) -> Match:
    """``-i <wg>`` / ``-o <wg>`` (the latter checked to be in mangle POSTROUTING by :func:`check_chains`)."""
    return Tunnel(HookName.INPUT if flag == "-i" else HookName.POSTROUTING, negate)


def tunnel_target(name: str, tokens: list[str], i: int, where: str) -> tuple[Verdict, int] | None:
    """``MARK`` / ``CONNMARK`` / ``TCPMSS`` as the steering writes them (None: not one of them)."""
    if name not in ("MARK", "CONNMARK", "TCPMSS"):
        return None
    opts = tokens[i:i + 2]
    want = "--set-mss" if name == "TCPMSS" else "--set-xmark"
    if len(opts) != 2 or opts[0] != want or len(tokens) > i + 2:
        raise UnmodelledConstructError(where, f"{name} {' '.join(tokens[i:])}")
    if name != "TCPMSS" and mark_value(opts[1], where) != STEER_MARK:
        raise UnmodelledConstructError(where, f"{name} to {opts[1]} (only the steering mark is modelled)")
    return Verdict(Kind.MARK if name == "MARK" else Kind.CONTINUE), i + 2


def _reach(chains: dict[str, Chain], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in chains:
            continue
        seen.add(name)
        todo += [r.verdict.target for r in chains[name].rules if r.verdict.kind in (Kind.JUMP, Kind.GOTO)]
    return seen


def check_chains(chains: dict[str, Chain]) -> None:
    """The steering mark is set only where mangle OUTPUT reaches (a re-route follows), the tunnel
    tested as output interface only where mangle POSTROUTING reaches."""
    marking = _reach(chains, MANGLE + "OUTPUT")
    post = _reach(chains, MANGLE + "POSTROUTING")
    for name, chain in chains.items():
        for r in chain.rules:
            if r.verdict.kind is Kind.MARK and name not in marking:
                raise UnmodelledConstructError(f"chain {name}", "MARK outside the mangle OUTPUT chains")
            if name not in post and any(isinstance(m, Tunnel) and m.side is HookName.POSTROUTING for m in r.matches):
                raise UnmodelledConstructError(f"chain {name}", "-o <tunnel> outside mangle POSTROUTING")
