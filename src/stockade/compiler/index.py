"""Label index and selector membership (Felix's calculation graph, Cilium's selector cache).

``LabelIndex`` maps each label to the workloads carrying it, so a label selector's
members are an intersection of a few sets rather than a scan of every workload.
``SelectorIndex`` answers "which selectors match this label set" by looking only at
selectors that require one of those labels (plus the few that require none).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from stockade.model.labels import Label, LabelGroup
from stockade.model.selectors import AllWorkloads, LabelSelector, Selector


class LabelIndex:
    """label -> names of workloads carrying it; plus every workload's labels."""

    def __init__(self) -> None:
        self.by_label: dict[Label, set[str]] = defaultdict(set)
        self.labels_of: dict[str, frozenset[Label]] = {}

    def add(self, name: str, labels: frozenset[Label]) -> None:
        self.labels_of[name] = labels
        for lab in labels:
            self.by_label[lab].add(name)

    def remove(self, name: str) -> None:
        for lab in self.labels_of.pop(name, frozenset()):
            members = self.by_label.get(lab)
            if members is not None:
                members.discard(name)
                if not members:
                    del self.by_label[lab]

    def members(self, sel: Selector, groups: dict[str, LabelGroup]) -> set[str]:
        """Names of workloads a workload-selecting selector matches (IP lists: none)."""
        if isinstance(sel, AllWorkloads):
            return set(self.labels_of)
        if not isinstance(sel, LabelSelector):
            return set()
        if sel.require:
            smallest = min(sel.require, key=lambda lab: len(self.by_label.get(lab, ())))
            candidates: Iterable[str] = self.by_label.get(smallest, set())
        else:
            candidates = self.labels_of
        return {n for n in candidates if sel.matches(self.labels_of[n], groups)}


class SelectorIndex:
    """Finds the workload-selecting selectors matched by a label set without a full scan."""

    def __init__(self, groups: dict[str, LabelGroup]) -> None:
        self.groups = groups
        self.by_label: dict[Label, list[Selector]] = defaultdict(list)
        self.unconditional: list[Selector] = []
        self._seen: set[Selector] = set()

    def add(self, sel: Selector) -> None:
        if sel in self._seen:
            return
        if isinstance(sel, LabelSelector):
            self._seen.add(sel)
            if sel.require:
                self.by_label[sel.require[0]].append(sel)
            else:
                self.unconditional.append(sel)
        elif isinstance(sel, AllWorkloads):
            self._seen.add(sel)
            self.unconditional.append(sel)

    def matching(self, labels: frozenset[Label]) -> set[Selector]:
        found: set[Selector] = set()
        for sel in self.unconditional:
            if isinstance(sel, AllWorkloads) or (
                isinstance(sel, LabelSelector) and sel.matches(labels, self.groups)
            ):
                found.add(sel)
        for lab in labels:
            for sel in self.by_label.get(lab, ()):
                if isinstance(sel, LabelSelector) and sel.matches(labels, self.groups):
                    found.add(sel)
        return found
