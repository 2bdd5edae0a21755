"""The iterative composer builds the same node trees as yaml.compose_all, without recursion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from stockade.policyfile.compose import EVENT_PARSER, ComposeError, compose_documents

ESTATE = Path(__file__).resolve().parents[2] / "examples" / "estate"

TRICKY = """\
%YAML 1.1
---
base: &base {role: web, 'quoted': "x", n: 0x1F, t: 2024-01-01, b: yes, z: ~, e: }
copy: *base
block: |
  line one
  line two
folded: >-
  a
  b
tagged: !!str 80
custom: !thing [1, 2]
? [complex, key]
: value
list:
  - - nested
    - &leaf leaf
  - *leaf
...
---
second
---
"""


def _shape(node: Node) -> object:
    """A comparable picture of a node tree: kinds, tags, values and positions."""
    where = (node.start_mark.line, node.start_mark.column)
    if isinstance(node, ScalarNode):
        return ("scalar", node.tag, node.value, node.style or None, where)
    if isinstance(node, MappingNode):
        return ("map", node.tag, where, [(_shape(k), _shape(v)) for k, v in node.value])
    return ("seq", node.tag, where, [_shape(n) for n in node.value])


@pytest.mark.parametrize(
    "text",
    [TRICKY, *(p.read_text(encoding="utf-8") for p in sorted(ESTATE.glob("*.yaml")))],
    ids=["tricky", *(p.name for p in sorted(ESTATE.glob("*.yaml")))],
)
def test_same_trees_as_pyyaml(text: str) -> None:
    ours = [_shape(n) for n in compose_documents(text)]
    # The same event parser (libyaml when present) through PyYAML's recursive composer.
    theirs = [_shape(n) for n in yaml.compose_all(text, Loader=EVENT_PARSER)]
    assert ours == theirs
    assert ours


def test_aliases_share_nodes() -> None:
    (root,) = compose_documents("a: &x [1]\nb: *x\n")
    assert isinstance(root, MappingNode)
    assert root.value[0][1] is root.value[1][1]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # our limit, or libyaml's own when the installed PyYAML wheel bundles a libyaml that has one
        ("[" * 200_000 + "]" * 200_000, 1, "nesting"),
        ("a:\n" + "- " * 100_000 + "x\n", 2, "nesting deeper"),
        ("a: 1\nb: *nope\n", 2, "alias *nope refers to no anchor"),
        ("a: 1\nb: [1, 2\n", 2, "YAML syntax error: while parsing a flow sequence started at line 2"),
        ("a: é\nb: \x07\n", 2, "unacceptable character #x0007"),
    ],
)
def test_errors_carry_lines(text: str, line: int, message: str) -> None:
    with pytest.raises(ComposeError) as info:
        list(compose_documents(text))
    assert info.value.line == line
    assert message in info.value.message
