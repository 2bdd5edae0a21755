"""Reading policy sources (files, directories, in-memory text) into a validated ``Policy``.

Steps: bytes -> text (UTF-8, BOM allowed) -> YAML nodes (``compose.compose_documents``,
never object construction) -> per-document parsing -> whole-policy cross-checks -> ``Policy``.
Any problem at any step becomes an ``Issue``; all of them are raised together in one
``ValidationError``. Nothing else escapes, whatever the input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from stockade.codec.collected import BUILTIN_ANY, Collected
from stockade.codec.documents import parse_document
from stockade.codec.tree import Reader
from stockade.errors import Issue, ValidationError
from stockade.model.labels import DEFAULT_LABEL_KEYS, LabelKey
from stockade.model.policy import Failsafe, Policy
from stockade.policyfile.compose import ComposeError, compose_documents
from stockade.policyfile.crossref import cross_check

POLICY_SUFFIXES = (".yaml", ".yml")
__all__ = ["BUILTIN_ANY", "load_documents", "load_policy", "load_sources", "policy_files"]


def policy_files(root: Path) -> list[Path]:
    """``root`` itself if it is a file, else every *.yaml / *.yml below it, sorted.

    Hidden files and directories (starting with ".") are skipped; symlinked
    directories are not followed.
    """
    if not root.is_dir():
        return [root]
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if name.endswith(POLICY_SUFFIXES) and not name.startswith("."):
                found.append(Path(directory) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_policy(path: str | Path) -> Policy:
    """Load a policy file, or every policy file under a directory, into one Policy."""
    root = Path(path)
    if not root.exists():
        raise ValidationError([Issue(str(root), 0, "", "no such file or directory")])
    files = policy_files(root)
    if not files:
        raise ValidationError([Issue(str(root), 0, "", "no *.yaml or *.yml files found")])
    sources: list[tuple[str, bytes | str]] = []
    read_errors: list[Issue] = []
    for file in files:
        try:
            sources.append((str(file), file.read_bytes()))
        except OSError as exc:
            read_errors.append(Issue(str(file), 0, "", f"cannot read: {exc.strerror or exc}"))
    if read_errors:
        raise ValidationError(read_errors)
    return load_sources(sources)


def load_documents(text: str, source: str) -> Policy:
    """Load multi-document YAML text (for example an API bulk import) named ``source``."""
    return load_sources([(source, text)])


def load_sources(sources: Iterable[tuple[str, bytes | str]]) -> Policy:
    """Load several named sources as one policy, in the order given."""
    acc = Collected()
    for source, data in sources:
        _read_source(source, data, acc)
    if acc.unreadable_sources == 0:
        # Cross-checks on a policy with unreadable parts would only add noise.
        acc.issues.extend(cross_check(acc))
    if acc.issues:
        raise ValidationError(acc.issues)
    policy = _assemble(acc)
    leftover = policy.validate()  # safety net: the model's own checks, without positions
    if leftover:
        raise ValidationError(leftover)
    return policy


def _decode(source: str, data: bytes | str, acc: Collected) -> str | None:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        acc.issues.append(Issue(source, line, "", f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"))
        return None


def _read_source(source: str, data: bytes | str, acc: Collected) -> None:
    text = _decode(source, data, acc)
    if text is None:
        acc.unreadable_sources += 1
        return
    reader = Reader(source, acc.issues)
    try:
        for node in compose_documents(text):
            parse_document(reader, node, acc)
    except ComposeError as exc:
        acc.issues.append(Issue(source, exc.line, "", exc.message))
        acc.unreadable_sources += 1


def _assemble(acc: Collected) -> Policy:
    """The Policy from a clean accumulator: every collection sorted by name."""
    keys = {k: LabelKey(k) for k in DEFAULT_LABEL_KEYS}
    keys.update({k.name: k for k in acc.label_keys})
    services = {s.name: s for s in acc.services}
    services.setdefault(BUILTIN_ANY.name, BUILTIN_ANY)
    return Policy(
        label_keys=tuple(keys[k] for k in sorted(keys)),
        label_groups=tuple(sorted(acc.label_groups, key=lambda g: g.name)),
        workloads=tuple(sorted(acc.workloads, key=lambda w: w.name)),
        ip_lists=tuple(sorted(acc.ip_lists, key=lambda i: i.name)),
        services=tuple(services[s] for s in sorted(services)),
        rulesets=tuple(sorted(acc.rulesets, key=lambda r: r.name)),
        deny_rules=tuple(sorted(acc.deny_rules, key=lambda d: d.name)),
        failsafe=acc.settings[0] if acc.settings else Failsafe(),
    )
