"""Issue 14: the impact preview looks both ways, and rules are numbered from 1 wherever a human reads them.

``widenings`` finds the allow rules that reach more workloads in a draft (an emptied scope, a wider
selector, a new rule of an all-workloads ruleset), is not fooled by rules that only moved, and
each impact item says what happens in words with the deciding rule numbered from 1.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from stockade.evaluator import Verdict
from stockade.model import Label, Policy, Proto
from stockade.model.rule_ids import rule_title, ruleset_rule_id
from stockade.model.rules import AllowRule, Ruleset
from stockade.model.selectors import LabelSelector
from stockade.paths import example_estate
from stockade.policyfile import load_policy
from stockade.visibility import Connection, FlowKey, preview
from stockade.visibility.impact import widenings

ip = ipaddress.ip_address


@pytest.fixture(scope="module")
def estate() -> Policy:
    return load_policy(example_estate())


def _with(policy: Policy, *rulesets: Ruleset) -> Policy:
    names = {rs.name for rs in rulesets}
    return replace(policy, rulesets=tuple(rs for rs in policy.rulesets if rs.name not in names) + rulesets)


def _labels(**kv: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(Label(k, v) for k, v in kv.items())))


def test_rule_titles_count_from_one_and_ids_keep_their_stored_form() -> None:
    assert ruleset_rule_id("shop-prod", 0) == "ruleset/shop-prod/0"  # stored, rendered into NFLOG prefixes
    assert rule_title("ruleset/shop-prod/0") == "ruleset shop-prod rule 1"
    assert rule_title("ruleset/a/b/3") == "ruleset a/b rule 4"
    assert rule_title("deny/no-telnet") == "deny rule no-telnet"
    assert rule_title("default").startswith("default")
    assert rule_title("failsafe:management") == "the failsafe (management)"


def test_an_unchanged_draft_widens_nothing(estate: Policy) -> None:
    assert widenings(estate, estate) == ()


def test_an_all_workloads_ruleset_is_a_widening_that_needs_confirmation(estate: Policy) -> None:
    rule = AllowRule((_labels(role="web"),), (_labels(role="db"),), ("postgres",))
    draft = _with(estate, Ruleset("billing-prod", (), (rule,)))
    [w] = widenings(estate, draft)
    assert (w.ruleset, w.index, w.new_rule, w.every_workload, w.needs_confirmation) == (
        "billing-prod", 0, True, True, True)
    assert {"web-prod-1", "db-prod-1"} <= set(w.added)
    assert w.sentence.startswith("ruleset billing-prod rule 1 is new and reaches")

    # the same rule confined to a scope is listed but does not need confirmation
    scoped = _with(estate, Ruleset("billing-prod", (_labels(app="shop", env="prod"),), (rule,)))
    [w] = widenings(estate, scoped)
    assert not w.needs_confirmation and set(w.added) == {"web-prod-1", "web-prod-2", "db-prod-1"}


def test_a_wider_scope_or_selector_widens_an_existing_rule_and_moving_rules_does_not(estate: Policy) -> None:
    shop = next(rs for rs in estate.rulesets if rs.name == "shop-prod")
    wider = replace(shop, scopes=(_labels(app="shop"),))
    found = {w.index: w for w in widenings(estate, _with(estate, wider))}
    assert found and all(not w.new_rule and w.needs_confirmation for w in found.values())
    assert "db-dev-1" in found[2].added  # app -> db now reaches the dev database
    assert found[2].sentence.startswith("ruleset shop-prod rule 3 now reaches")

    moved = replace(shop, rules=shop.rules[1:])  # rule 1 removed: the others move up, reach the same
    assert widenings(estate, _with(estate, moved)) == ()
    reordered = replace(shop, rules=tuple(reversed(shop.rules)))
    assert widenings(estate, _with(estate, reordered)) == ()


def test_impact_items_say_what_happens_in_words(estate: Policy) -> None:
    rule = AllowRule((_labels(role="web"),), (_labels(role="db"),), ("postgres",))
    draft = _with(estate, Ruleset("billing-prod", (), (rule,)))
    key = FlowKey(ip("10.70.0.11"), ip("10.70.0.31"), Proto.TCP, 5432)
    imp = preview(estate, draft, [Connection(key, Verdict.BLOCKED, 3, 1.0, 2.0)])
    [item] = imp.items
    assert item.sentence == "web-prod-1 -> db-prod-1 5432/tcp becomes allowed by ruleset billing-prod rule 1"
    back = preview(draft, estate, [item.connection])
    [item] = back.items
    assert item.sentence.startswith("web-prod-1 -> db-prod-1 5432/tcp becomes blocked by default")
