"""The import report: what was carried over, approximated, not expressible or out of scope.

Every importer returns an :class:`ImportResult`: the imported policy plus one
:class:`Finding` per construct worth telling a person about, each pointing at its origin as
``file:line`` (text formats) or ``file#/json/path`` (JSON formats). The report never hides a
difference: a construct Stockade cannot express is named, and the host it affects is left in
visibility mode (see :mod:`stockade.importers.translate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from stockade.model.policy import Policy
from stockade.model.workloads import EnforcementMode


class Outcome(Enum):
    """How one construct of the original came across (report order)."""

    CARRIED = "carried over"  # same meaning in Stockade
    APPROXIMATED = "approximated"  # carried, narrower or with a stated difference; never wider
    NOT_EXPRESSIBLE = "not expressible"  # Stockade cannot say it: the host stays in visibility mode
    OUT_OF_SCOPE = "out of scope"  # not a host's own traffic (NAT, forwarded traffic): left to its owner
    BAD_INPUT = "bad input"  # could not be read; the rest was imported

    def __lt__(self, other: Outcome) -> bool:
        return _ORDER[self] < _ORDER[other]


_ORDER = {o: i for i, o in enumerate(Outcome)}


@dataclass(frozen=True, order=True)
class Origin:
    """Where a construct is: a file and a line (text) or a JSON path (``#/rules/3``)."""

    file: str
    line: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"{self.file}#{self.path}"
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, order=True)
class Finding:
    """One reported construct: where it is, what it is, how it came across and why."""

    outcome: Outcome
    origin: Origin
    host: str
    construct: str
    note: str

    def __str__(self) -> str:
        host = f" [{self.host}]" if self.host else ""
        return f"{self.origin}{host}: {self.outcome.value}: {self.construct}: {self.note}"


@dataclass(frozen=True)
class ImportResult:
    """The imported policy (label-based where possible) and its report."""

    policy: Policy
    findings: tuple[Finding, ...]
    proposed_labels: tuple[tuple[str, tuple[str, ...]], ...] = ()  # label -> the addresses it stands for
    enforce_modes: tuple[tuple[str, EnforcementMode], ...] = ()  # host -> the mode its rules were written for

    def count(self, outcome: Outcome) -> int:
        return sum(1 for f in self.findings if f.outcome is outcome)


def report_text(result: ImportResult) -> str:
    """The report as text a person reads: counts, findings grouped by outcome, proposed labels."""
    lines = ["# stockade import report", ""]
    lines.append(", ".join(f"{o.value}: {result.count(o)}" for o in Outcome))
    for outcome in Outcome:
        found = [f for f in result.findings if f.outcome is outcome]
        if not found:
            continue
        lines += ["", f"## {outcome.value} ({len(found)})"]
        lines += [f"- {f}" for f in found]
    if result.proposed_labels:
        lines += ["", "## proposed labels (addresses that always appear together)"]
        lines += [f"- {label}: {', '.join(addrs)}" for label, addrs in result.proposed_labels]
    visibility = sorted(w.name for w in result.policy.workloads if w.description.startswith(VISIBILITY_NOTE))
    if visibility:
        lines += ["", "## hosts left in visibility mode", *[f"- {name}" for name in visibility]]
    return "\n".join(lines) + "\n"


def report_json(result: ImportResult) -> str:
    """The report as JSON (stable key order) for tools and the controller's answer."""
    return json.dumps(report_data(result), indent=2) + "\n"


def report_data(result: ImportResult) -> dict[str, object]:
    return {
        "counts": {o.value: result.count(o) for o in Outcome},
        "findings": [
            {"outcome": f.outcome.value, "origin": str(f.origin), "host": f.host, "construct": f.construct,
             "note": f.note}
            for f in result.findings
        ],
        "proposed_labels": {label: list(addrs) for label, addrs in result.proposed_labels},
        "visibility_hosts": sorted(
            w.name for w in result.policy.workloads if w.description.startswith(VISIBILITY_NOTE)
        ),
    }


VISIBILITY_NOTE = "imported: left in visibility mode"
