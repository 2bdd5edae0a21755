"""Importers: the rules people already have -> Stockade policy as code, with a report.

One module per source format (``iptables``, ``nftables``, ``windows``, ``illumio``, ``networkpolicy``) behind the
table in :mod:`stockade.importers.registry`; Linux rulesets share the chain flattener
(:mod:`~stockade.importers.chains`) and the first-match -> precedence translation
(:mod:`~stockade.importers.translate`), whose peers become proposed labels
(:mod:`~stockade.importers.labels`). Every result carries a report
(:mod:`~stockade.importers.report`): carried over, approximated, not expressible, out of scope,
bad input, each with its file and line or JSON path. Nothing is imported wider than the original.
Pure: no I/O (the CLI and the controller read the files).
"""

from stockade.importers.registry import IMPORTERS, get_importer, run_import
from stockade.importers.report import Finding, ImportResult, Origin, Outcome, report_data, report_json, report_text
from stockade.importers.source import ImportOptions, Source

__all__ = ["IMPORTERS", "Finding", "ImportOptions", "ImportResult", "Origin", "Outcome", "Source", "get_importer",
           "report_data", "report_json", "report_text", "run_import"]
