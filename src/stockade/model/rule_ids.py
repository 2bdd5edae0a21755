"""Rule ids and the words a human reads for them: one numbering, 1-based, everywhere.

A rule's id (``ruleset/<name>/<j>``, ``deny/<name>``, ``default``, ``failsafe:<what>``,
``netpol/<ns>/<name>/<ingress|egress>/<j>`` and ``netpol/<ns>/<name>/<ingress|egress>``) is stored
(flow records, NFLOG prefixes in the rendered rulesets, golden files), so it keeps its 0-based
index ``j``. Whatever a person reads (CLI, console, explain output, impact texts, suggestions)
shows the rule's position counted from 1: ``ruleset/shop-prod/0`` is "ruleset shop-prod rule 1",
the first rule as the editor and the YAML file list it.
"""

from __future__ import annotations


def ruleset_rule_id(ruleset: str, index: int) -> str:
    """The stored id of rule ``index`` (0-based) of ``ruleset``."""
    return f"ruleset/{ruleset}/{index}"


def rule_title(rule_id: str) -> str:
    """``ruleset/shop-prod/0`` -> ``ruleset shop-prod rule 1``; other ids in words."""
    if rule_id.startswith("ruleset/"):
        name, _, index = rule_id[len("ruleset/"):].rpartition("/")
        if name and index.isdigit():
            return f"ruleset {name} rule {int(index) + 1}"
    if rule_id.startswith("deny/"):
        return f"deny rule {rule_id[len('deny/'):]}"
    if rule_id == "default":
        return "default (no rule matched: the mode's default)"
    if rule_id.startswith("failsafe:"):
        return f"the failsafe ({rule_id[len('failsafe:'):]})"
    if rule_id.startswith("netpol/"):  # netpol/<ns>/<name>/<ingress|egress>[/<i>]
        parts = rule_id[len("netpol/"):].split("/")
        if len(parts) == 4 and parts[3].isdigit():
            return f"NetworkPolicy {parts[0]}/{parts[1]} {parts[2]} rule {int(parts[3]) + 1}"
        if len(parts) == 3:
            return f"NetworkPolicy {parts[0]}/{parts[1]} ({parts[2]} isolated, no NetworkPolicy rule allows)"
    return rule_id
