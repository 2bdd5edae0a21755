"""Label index and selector membership (Felix's calculation graph, Cilium's selector cache).

``LabelIndex`` maps each label to the workloads carrying it, so a label selector's
members are an intersection of a few sets rather than a scan of every workload.
``SelectorIndex`` answers "which selectors match this label set" by looking only at
selectors that require one of those labels (plus the few that require none).

Both index labels by a plain string (``label_key``) rather than the ``Label`` dataclass:
a string caches its hash, a dataclass recomputes it in Python on every set lookup, and at
125,000 workloads those lookups were the largest single cost of a full compile.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from stockade.model.labels import Label, LabelGroup
from stockade.model.selectors import AllWorkloads, LabelSelector, Selector


def label_key(lab: Label) -> str:
    """One string per label, unambiguous (NUL never occurs in a label key)."""
    return lab.key + "\0" + lab.value


def label_keys(labels: Iterable[Label]) -> frozenset[str]:
    return frozenset(lab.key + "\0" + lab.value for lab in labels)


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


class _Matcher:
    """A label selector compiled to string sets: require <= labels, no exclude, every group."""

    __slots__ = ("exclude", "groups", "require", "sid")

    def __init__(self, sid: int, sel: LabelSelector, groups: dict[str, LabelGroup]) -> None:
        self.sid = sid
        self.require = label_keys(sel.require)
        self.exclude = label_keys(sel.exclude)
        self.groups = tuple(label_keys(groups[g].labels()) for g in sel.groups)

    def matches(self, keys: frozenset[str]) -> bool:
        return (
            self.require <= keys
            and self.exclude.isdisjoint(keys)
            and all(not g.isdisjoint(keys) for g in self.groups)
        )


class SelectorIndex:
    """Finds the workload-selecting selectors matched by a label set without a full scan.

    Selectors are known by an integer id chosen by the caller; ``matching`` returns ids.
    """

    def __init__(self, groups: dict[str, LabelGroup]) -> None:
        self.groups = groups
        self.by_label: dict[str, list[_Matcher]] = defaultdict(list)
        self.unconditional: list[_Matcher] = []
        self.everything: list[int] = []  # AllWorkloads
        self.mentioned: set[str] = set()  # label keys some selector looks at
        self._seen: set[int] = set()
        self._pending: list[_Matcher] = []  # added since the buckets were last filled
        self._uses: dict[str, int] = defaultdict(int)  # label -> selectors requiring it

    def add(self, sid: int, sel: Selector) -> None:
        if sid in self._seen:
            return
        if isinstance(sel, LabelSelector):
            self._seen.add(sid)
            m = _Matcher(sid, sel, self.groups)
            self.mentioned |= m.require | m.exclude
            for g in m.groups:
                self.mentioned |= g
            if sel.require:
                for lab in m.require:
                    self._uses[lab] += 1
                self._pending.append(m)
            else:
                self.unconditional.append(m)
        elif isinstance(sel, AllWorkloads):
            self._seen.add(sid)
            self.everything.append(sid)

    def _fill(self) -> None:
        """Bucket each selector under its least used required label.

        Under its first label, ``app=backend`` of 10,000 namespaced selectors put them all in one
        bucket that every backend pod scanned (30 s of a 100,000-pod compile); ``ns=...`` is rare.
        Selectors added later keep the bucket chosen then, which is still correct.
        """
        for m in self._pending:
            self.by_label[min(m.require, key=lambda lab: (self._uses[lab], lab))].append(m)
        self._pending.clear()

    def matching(self, keys: frozenset[str]) -> set[int]:
        """Ids of the selectors matching a label set given as ``label_keys``."""
        if self._pending:
            self._fill()
        found = set(self.everything)
        for m in self.unconditional:
            if m.matches(keys):
                found.add(m.sid)
        by_label = self.by_label
        for lab in keys:
            for m in by_label.get(lab, ()):
                if m.matches(keys):
                    found.add(m.sid)
        return found
