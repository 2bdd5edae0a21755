"""The importer registry: a plain table from import kind to ``module:function``.

Each importer is ``(sources, options) -> ImportResult``. A kind whose translation lives
elsewhere and is not wired yet (``networkpolicy``: the Kubernetes work provides it) is listed
with an empty target and fails with a clear "not available" error (none is, now).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from stockade.errors import Issue, ValidationError
from stockade.importers.report import ImportResult
from stockade.importers.source import ImportOptions, Source

Importer = Callable[[Sequence[Source], ImportOptions], ImportResult]

IMPORTERS: dict[str, str] = {
    "iptables": "stockade.importers.iptables:import_iptables",  # iptables-save, ip6tables-save, ipset save
    "nftables": "stockade.importers.nftables:import_nftables",  # nft -j list ruleset
    "windows": "stockade.importers.windows:import_windows",  # Get-NetFirewallRule export (docs/migration.md)
    "illumio": "stockade.importers.illumio:import_illumio",  # PCE REST API objects
    "networkpolicy": "stockade.importers.networkpolicy:import_networkpolicy",  # k8s.netpol_import's translation
}


def get_importer(kind: str) -> Importer:
    """The importer of ``kind``; an unknown kind names the known ones."""
    if kind not in IMPORTERS:
        known = ", ".join(sorted(IMPORTERS))
        raise ValidationError([Issue("", 0, "kind", f"unknown import kind {kind!r} (known: {known})")])
    target = IMPORTERS[kind]
    if not target:
        raise ValidationError([Issue("", 0, "kind", f"the {kind} importer is not available yet in this version of "
                                                   "Stockade")])
    module, _, attr = target.partition(":")
    fn: Importer = getattr(importlib.import_module(module), attr)
    return fn


def run_import(kind: str, sources: Sequence[Source], options: ImportOptions) -> ImportResult:
    if not sources:
        raise ValidationError([Issue("", 0, "files", "give at least one file to import")])
    return get_importer(kind)(sources, options)
