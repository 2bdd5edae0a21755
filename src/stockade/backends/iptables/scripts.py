"""Pure script builders of the iptables+ipset backend, and the parser of ``iptables-save``.

An apply is a short sequence of scripts, each loaded by one binary and each atomic:

It builds on the data types of :mod:`stockade.backends.iptables.model` only; the renderer
(:mod:`stockade.backends.iptables.render`) uses these builders for an artifact's text.

1. ``ipset -exist restore`` (:func:`ipset_load_script`): every set's new members go into
   ``<name>-t`` (created or flushed), missing live sets are created empty, then
   ``swap <name>-t <name>`` puts each new member list in force at once. Afterwards
   ``<name>-t`` holds the previous members: a failed rules step swaps them back.
2. ``iptables-restore --noflush`` and ``ip6tables-restore --noflush``
   (:func:`rules_script`): declare (create or flush) our chains only, fill them, make the
   built-in chains hold exactly one jump to each entry chain we want and none to anything
   else of ours, delete our chains no longer wanted. The script depends on what the table
   holds now (:class:`FilterState`, parsed from ``iptables-save``), never on others' rules,
   and never flushes or changes a built-in or foreign chain.
3. ``ipset -exist restore`` (:func:`ipset_destroy_script`): destroy the ``-t`` sets and
   sets no rule of ours references any more.

:func:`rollback_script` puts a family's chains back as a :class:`FilterState` recorded
them (when the other family's restore failed). Removing everything is :func:`rules_script`
with an empty ruleset.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from stockade.backends.iptables.model import (
    ChainNames,
    FamilyRuleset,
    Hook,
    IpSet,
    IptChain,
    address_text,
    ipset_members,
)
from stockade.model.addresses import Family, IPNetwork

_SET_REF_RE = re.compile(r"--match-set (\S+) ")


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain whose target is one of our chains."""

    hook: Hook
    position: int  # 1-based, among the built-in chain's rules
    spec: str  # as iptables-save prints it after ``-A <hook> ``


@dataclass(frozen=True)
class FilterState:
    """What one family's filter table holds of ours (chains, jumps to them)."""

    family: Family
    chains: tuple[IptChain, ...]
    jumps: tuple[Jump, ...]

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps

    def chain_names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.chains)

    def referenced_sets(self) -> frozenset[str]:
        """ipset names our chains use (``-m set --match-set NAME dir``)."""
        return frozenset(m for c in self.chains for r in c.rules for m in _SET_REF_RE.findall(r))


def rule_target(spec: str) -> str | None:
    """The chain or target after ``-j``/``-g`` in a rule spec, None when there is none."""
    try:
        tokens = shlex.split(spec)
    except ValueError:
        tokens = spec.split()
    for i in range(len(tokens) - 2, -1, -1):
        if tokens[i] in ("-j", "-g", "--jump", "--goto"):
            return tokens[i + 1]
    return None


def save_table(text: str, table: str) -> tuple[list[str], dict[str, list[str]]]:
    """One table of ``iptables-save`` output: its chains in declaration order, and each chain's rule
    specs (after ``-A CHAIN``) in order."""
    declared: list[str] = []
    rules: dict[str, list[str]] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("*"):
            inside = line == f"*{table}"
        elif not inside:
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            declared.append(name)
            rules.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            rules.setdefault(chain, []).append(rest)
    return declared, rules


def parse_filter_save(text: str, prefix: str, family: Family) -> FilterState:
    """Our chains (:meth:`ChainNames.owns`) and the built-in chains' jumps to them, from
    ``iptables-save -t filter``."""
    names = ChainNames(prefix)
    hooks = {h.value: h for h in Hook}
    declared, rules = save_table(text, "filter")
    chains = tuple(IptChain(n, tuple(rules[n])) for n in declared if names.owns(n))
    jumps: list[Jump] = []
    for chain, specs in rules.items():
        hook = hooks.get(chain)
        if hook is None:
            continue
        for pos, s in enumerate(specs, start=1):
            target = rule_target(s)
            if target is not None and names.owns(target):
                jumps.append(Jump(hook, pos, s))
    return FilterState(family, chains, tuple(jumps))


# ---- rules (iptables-restore --noflush) -------------------------------------------------


def rules_script(ruleset: FamilyRuleset, state: FilterState, prefix: str) -> str:
    """Bring our part of the filter table from ``state`` to ``ruleset`` (empty: remove it all)."""
    names = ChainNames(prefix)
    wanted = [c.name for c in ruleset.chains]
    keep = frozenset(wanted)  # thousands of chains in the lookup layout: no list scans
    stale = [c.name for c in state.chains if c.name not in keep]
    lines = ["*filter"]
    lines += [f":{n} - [0:0]" for n in (*wanted, *stale)]  # creates, or flushes an existing chain
    for chain in ruleset.chains:
        lines += [f"-A {chain.name} {r}" for r in chain.rules]
    for hook in Hook:
        entry = names.entry(hook)
        exact = f"-j {entry}"
        jumps = [j for j in state.jumps if j.hook is hook]
        lines += [f"-D {hook.value} {j.spec}" for j in jumps if j.spec != exact]
        count = sum(1 for j in jumps if j.spec == exact)
        if hook in ruleset.hooks:
            lines += [f"-D {hook.value} {exact}"] * (count - 1) if count else [f"-I {hook.value} 1 {exact}"]
        else:
            lines += [f"-D {hook.value} {exact}"] * count
    lines += [f"-X {n}" for n in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def removal_script(state: FilterState, prefix: str) -> str | None:
    """Delete our chains and every jump to them; None when there is nothing of ours."""
    if state.empty:
        return None
    return rules_script(FamilyRuleset(state.family, (), ()), state, prefix)


def rollback_script(old: FilterState, applied: FamilyRuleset, prefix: str) -> str:
    """Undo a successful :func:`rules_script` of ``applied``: our chains and jumps as in ``old``."""
    names = ChainNames(prefix)
    old_names = [c.name for c in old.chains]
    had = frozenset(old_names)
    created = [c.name for c in applied.chains if c.name not in had]
    lines = ["*filter"]
    lines += [f":{n} - [0:0]" for n in (*old_names, *created)]
    for chain in old.chains:
        lines += [f"-A {chain.name} {r}" for r in chain.rules]
    for hook in Hook:
        if hook in applied.hooks:
            lines.append(f"-D {hook.value} -j {names.entry(hook)}")
        for j in sorted((j for j in old.jumps if j.hook is hook), key=lambda j: j.position):
            lines.append(f"-I {hook.value} {j.position} {j.spec}")
    lines += [f"-X {n}" for n in created]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---- ipset restore ----------------------------------------------------------------------


@dataclass(frozen=True)
class IpsetLoad:
    """The load-and-swap script; ``swap_line`` is the 1-based line of the first ``swap``."""

    text: str
    swap_line: int
    swapped: tuple[IpSet, ...]  # in the order of the swap lines


def ipset_load_script(sets: Iterable[IpSet]) -> IpsetLoad:
    """New members into ``<name>-t``, live sets created if missing, then one swap per set.

    The first line, ``list -n``, prints the names of the sets that existed before: the
    runner learns which sets are stale, or were created by this load, at no extra cost.
    """
    sets = tuple(sets)
    lines: list[str] = ["list -n"]
    for s in sets:
        tmp = s.temp_name
        lines += [s.create_line(tmp), f"flush {tmp}"]
        lines += [f"add {tmp} {address_text(m)}" for m in s.members]
    lines += [s.create_line(s.name) for s in sets]
    swap_line = len(lines) + 1
    lines += [f"swap {s.temp_name} {s.name}" for s in sets]
    return IpsetLoad("\n".join(lines) + "\n", swap_line, sets)


def ipset_swap_script(sets: Iterable[IpSet]) -> str:
    return "".join(f"swap {s.temp_name} {s.name}\n" for s in sets)


def ipset_destroy_script(names: Iterable[str]) -> str:
    """Destroy sets (run with ``-exist``: a missing one is not an error)."""
    return "".join(f"destroy {n}\n" for n in names)


def ipset_delta_script(
    changes: Iterable[tuple[str, tuple[IPNetwork, ...], tuple[IPNetwork, ...]]],
) -> str:
    """(set, added, removed) changes: first every set is named (a missing one stops the
    script before anything changed), then the deletions, then the additions."""
    changes = tuple(changes)
    lines = [f"list -n {name}" for name in dict.fromkeys(name for name, _, _ in changes)]
    for name, _, removed in changes:
        lines += [f"del {name} {address_text(m)}" for m in ipset_members(removed)]
    for name, added, _ in changes:
        lines += [f"add {name} {address_text(m)}" for m in ipset_members(added)]
    return "\n".join(lines) + "\n"
