"""Rulesets, allow rules and deny / override-deny rules.

Precedence (Illumio's): override-deny > allow > deny > the mode's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from stockade.model.selectors import LabelSelector, Selector


class Action(Enum):
    """Rule actions, listed in precedence order (first wins)."""

    OVERRIDE_DENY = "override-deny"
    ALLOW = "allow"
    DENY = "deny"

    def __lt__(self, other: Action) -> bool:
        return _ACTION_ORDER[self] < _ACTION_ORDER[other]


_ACTION_ORDER = {a: i for i, a in enumerate(Action)}


class ConsumerScope(Enum):
    INTRA = "intra"  # consumers are confined to the ruleset's scope
    GLOBAL = "global"  # extra-scope: consumers anywhere


@dataclass(frozen=True, order=True)
class AllowRule:
    """``consumers`` may reach ``providers`` on ``services`` (service names)."""

    consumers: tuple[Selector, ...]
    providers: tuple[Selector, ...]
    services: tuple[str, ...]
    consumers_scope: ConsumerScope = ConsumerScope.INTRA
    description: str = ""
    encrypt: bool = False  # the traffic flows only through WireGuard between the two workloads


@dataclass(frozen=True, order=True)
class Ruleset:
    """Rules that govern the workloads picked by ``scopes`` (any of them).

    An empty ``scopes`` tuple means the ruleset applies to all workloads.
    """

    name: str
    scopes: tuple[LabelSelector, ...]
    rules: tuple[AllowRule, ...]
    description: str = ""
    encrypt: bool = False  # every rule of the ruleset is encrypted

    def encrypts(self, index: int) -> bool:
        """Whether rule ``index`` (0-based) must be encrypted: its own flag or the ruleset's."""
        return self.encrypt or self.rules[index].encrypt


@dataclass(frozen=True, order=True)
class DenyRule:
    """Consumers may not reach providers on services; absolute when ``override``."""

    name: str
    consumers: tuple[Selector, ...]
    providers: tuple[Selector, ...]
    services: tuple[str, ...]
    override: bool = False
    description: str = ""

    @property
    def action(self) -> Action:
        return Action.OVERRIDE_DENY if self.override else Action.DENY
