"""Selectors: which workloads or addresses a rule's consumers, providers or scope mean.

A selector is one of:

* ``LabelSelector`` - every workload carrying all ``require`` labels, at least one
  label of each named label group, and none of the ``exclude`` labels;
* ``IPListSelector`` - the addresses of a named IP list (managed or not);
* ``AllWorkloads`` - every workload.

An empty label selector is rejected when policy is loaded: "nothing" is never "everything".
"""

from __future__ import annotations

from dataclasses import dataclass

from stockade.model.labels import Label, LabelGroup


@dataclass(frozen=True, order=True)
class LabelSelector:
    require: tuple[Label, ...] = ()
    groups: tuple[str, ...] = ()
    exclude: tuple[Label, ...] = ()

    def canonical(self) -> str:
        memo = self.__dict__
        cached: str | None = memo.get("_canonical")
        if cached is None:
            parts = [lab.key + "=" + lab.value for lab in self.require]  # str(lab), without the call
            if self.groups:
                parts += ["group:" + g for g in self.groups]
            if self.exclude:
                parts += ["!" + lab.key + "=" + lab.value for lab in self.exclude]
            # memo; not a field, so eq/hash/order ignore it (the instance dict, as object.__setattr__)
            cached = memo["_canonical"] = "labels(" + ",".join(parts) + ")"
        return cached

    def matches(self, labels: frozenset[Label], groups: dict[str, LabelGroup]) -> bool:
        if any(lab not in labels for lab in self.require):
            return False
        if any(lab in labels for lab in self.exclude):
            return False
        return all(groups[g].matches(labels) for g in self.groups)

    def is_satisfiable(self) -> bool:
        """False when one key is required with two values, or a label is required and excluded."""
        keys = [lab.key for lab in self.require]
        if len(keys) != len(set(keys)):
            return False
        return not set(self.require) & set(self.exclude)

    def merged(self, other: LabelSelector) -> LabelSelector:
        """The conjunction of two label selectors (used to confine a rule to its scope)."""
        return LabelSelector(
            tuple(sorted(set(self.require) | set(other.require))),
            tuple(sorted(set(self.groups) | set(other.groups))),
            tuple(sorted(set(self.exclude) | set(other.exclude))),
        )

    def mentioned_labels(self, groups: dict[str, LabelGroup]) -> tuple[Label, ...]:
        found = set(self.require) | set(self.exclude)
        for g in self.groups:
            found |= set(groups[g].labels())
        return tuple(sorted(found))


@dataclass(frozen=True, order=True)
class IPListSelector:
    ip_list: str

    def canonical(self) -> str:
        return f"iplist({self.ip_list})"


@dataclass(frozen=True, order=True)
class AllWorkloads:
    def canonical(self) -> str:
        return "all"


Selector = LabelSelector | IPListSelector | AllWorkloads

ALL_WORKLOADS = AllWorkloads()


def selector_sort_key(sel: Selector) -> str:
    return sel.canonical()


def confine(sel: Selector, scope: LabelSelector) -> Selector | None:
    """``sel`` restricted to ``scope``; None when the result can match nothing.

    IP lists are addresses, not workloads, so they are never confined.
    """
    if isinstance(sel, IPListSelector):
        return sel
    merged = scope if isinstance(sel, AllWorkloads) else sel.merged(scope)
    if not merged.require and not merged.groups and not merged.exclude:
        return ALL_WORKLOADS
    return merged if merged.is_satisfiable() else None
