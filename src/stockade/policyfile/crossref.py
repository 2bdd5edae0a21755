"""Whole-policy checks with positions: duplicates, references, label keys/values, addresses.

Runs over what ``documents.parse_document`` recorded from every source, in load order
(files sorted, documents in file order), so "first defined" is well defined and every
issue points at the file, line and field of the offending occurrence.
"""

from __future__ import annotations

import difflib

from stockade.codec.collected import Collected, Declaration, Kind
from stockade.codec.tree import Where, quote
from stockade.errors import Issue
from stockade.model.addresses import IPAddress
from stockade.model.labels import DEFAULT_LABEL_KEYS

BUILTIN_SERVICES = frozenset({"any"})


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
    return f" (did you mean {quote(close[0])}?)" if close else ""


def _duplicates(declarations: list[Declaration]) -> tuple[list[Issue], dict[Kind, set[str]]]:
    issues: list[Issue] = []
    first: dict[tuple[Kind, str], Where] = {}
    names: dict[Kind, set[str]] = {k: set() for k in Kind}
    for d in declarations:
        key = (d.kind, d.name)
        if key in first:
            if d.kind is Kind.SETTINGS:
                message = f"more than one Settings document (first at {first[key].location})"
            else:
                message = f"duplicate {d.kind.noun} {quote(d.name)} (first defined at {first[key].location})"
            issues.append(d.where.issue(message))
        else:
            first[key] = d.where
            names[d.kind].add(d.name)
    return issues, names


def cross_check(acc: Collected) -> list[Issue]:
    """Every problem that needs the whole policy, each with file:line:field."""
    issues, names = _duplicates(acc.declarations)
    names[Kind.SERVICE] |= BUILTIN_SERVICES

    for ref in acc.references:
        known = names[ref.kind]
        if ref.name not in known:
            issues.append(ref.where.issue(f"unknown {ref.kind.noun} {quote(ref.name)}{_suggest(ref.name, known)}"))

    allowed: dict[str, frozenset[str]] = {k: frozenset() for k in DEFAULT_LABEL_KEYS}
    for key in acc.label_keys:
        if key.name:
            allowed[key.name] = frozenset() if key.name in acc.open_label_keys else key.allowed
    declared = ", ".join(sorted(allowed))
    for use in acc.label_uses:
        if use.key not in allowed:
            hint = _suggest(use.key, set(allowed)) or f" (declared keys: {declared})"
            issues.append(use.key_where.issue(f"unknown label key {quote(use.key)}{hint}"))
        elif allowed[use.key] and use.value not in allowed[use.key]:
            values = ", ".join(sorted(allowed[use.key]))
            issues.append(
                use.value_where.issue(f"label value {use.key}={use.value} is not allowed (allowed: {values})")
            )

    owner: dict[IPAddress, tuple[str, Where]] = {}
    for claim in acc.claims:
        if not claim.workload:
            continue
        previous = owner.get(claim.address)
        if previous is None:
            owner[claim.address] = (claim.workload, claim.where)
        elif previous[0] != claim.workload:
            issues.append(
                claim.where.issue(
                    f"address {claim.address} already belongs to workload {quote(previous[0])} "
                    f"({previous[1].location})"
                )
            )
    return issues
