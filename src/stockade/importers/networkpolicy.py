"""Kubernetes NetworkPolicy YAML -> Stockade policy, through the Kubernetes work's translation.

The translation itself lives in :mod:`stockade.k8s.netpol_import` (it shares the live sync's
NetworkPolicy parser); this adapter gives it the importers' shape: sources in, an
:class:`~stockade.importers.report.ImportResult` out. A converted policy is carried over, a policy
with anything that has no exact label equivalent is skipped whole (never wider: not expressible),
and the translation's notes (isolation is ``full`` mode; pods need the namespace label) are
reported as approximations. A file that is not YAML is bad input; the other files are imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from stockade.importers.report import Finding, ImportResult, Origin, Outcome
from stockade.importers.source import ImportOptions, Source
from stockade.k8s.netpol_import import to_policy_documents
from stockade.policyfile import load_documents


def import_networkpolicy(sources: Sequence[Source], options: ImportOptions) -> ImportResult:
    findings: list[Finding] = []
    texts: list[str] = []
    for s in sources:
        try:
            list(yaml.safe_load_all(s.text))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            findings.append(Finding(Outcome.BAD_INPUT, Origin(s.name, (mark.line + 1) if mark else 0), "", "YAML",
                                    str(exc).splitlines()[0]))
            continue
        texts.append(s.text)
    docs, report = to_policy_documents(texts)
    policy = load_documents(yaml.safe_dump_all(docs, sort_keys=False), "networkpolicy")
    where = sources[0].name if sources else ""
    for ref in report.converted:
        findings.append(Finding(Outcome.CARRIED, Origin(where, path=f"/{ref}"), "", f"NetworkPolicy {ref}",
                                "ruleset np." + ref.replace("/", ".")))
    for ref, why in report.skipped:
        findings.append(Finding(Outcome.NOT_EXPRESSIBLE, Origin(where, path=f"/{ref}"), "", f"NetworkPolicy {ref}",
                                f"skipped whole (never wider): {why}"))
    for note in report.notes:
        findings.append(Finding(Outcome.APPROXIMATED, Origin(where), "", "NetworkPolicy semantics", note))
    return ImportResult(policy, tuple(sorted(set(findings), key=lambda f: (f.outcome, f.origin, f.construct,
                                                                         f.note))))
