"""Labels, declared label keys and label groups."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_LABEL_KEYS: tuple[str, ...] = ("app", "env", "loc", "role")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def is_valid_name(text: str) -> bool:
    """Names of labels, keys and objects: 1-63 chars of [A-Za-z0-9_.-], not starting with a symbol.

    The restriction keeps every name safe to embed in firewall rulesets and log prefixes.
    """
    return bool(_NAME_RE.match(text))


@dataclass(frozen=True, order=True)
class Label:
    """A key=value pair attached to a workload."""

    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


@dataclass(frozen=True, order=True)
class LabelKey:
    """A declared label key; ``allowed`` empty means any value."""

    name: str
    allowed: frozenset[str] = frozenset()

    def accepts(self, value: str) -> bool:
        return not self.allowed or value in self.allowed


@dataclass(frozen=True, order=True)
class LabelGroup:
    """A named set of labels of one key; matches a workload carrying any of them."""

    name: str
    key: str
    values: frozenset[str]

    def matches(self, labels: frozenset[Label]) -> bool:
        return any(lab.key == self.key and lab.value in self.values for lab in labels)

    def labels(self) -> tuple[Label, ...]:
        return tuple(sorted(Label(self.key, v) for v in self.values))
