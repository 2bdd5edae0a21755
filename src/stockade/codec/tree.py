"""The document tree the codec reads, and typed reading of it with positions.

A policy document is a tree of mappings, lists and typed scalars: YAML's node graph
(``yaml.nodes``). YAML text composes into it (``stockade.policyfile.compose``, with line
numbers); a JSON body of the REST API maps into it losslessly with ``node_of`` (no line
numbers: JSON strings, numbers, booleans and null become scalars tagged str, int/float,
bool and null). The codec then reads both the same way, so YAML adds only line numbers.

Nothing constructs Python objects from YAML directly: the codec walks the nodes so that
each problem can be reported with the line of the offending node (0 when unknown) and the
dotted field path inside its document (``rules[2].services[0]``). Every ``Reader`` method
records an ``Issue`` and returns ``None`` on bad input instead of raising, so a single pass
finds every problem. Scalars are typed as JSON types them: a string field takes a string
(``env: 2024`` is a number; quote it), a number field takes a number.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stockade.errors import Issue
from stockade.model.labels import is_valid_name

_TAG = "tag:yaml.org,2002:"
NULL_TAG = _TAG + "null"
BOOL_TAG = _TAG + "bool"
INT_TAG = _TAG + "int"
STR_TAG = _TAG + "str"
FLOAT_TAG = _TAG + "float"
MAP_TAG = _TAG + "map"
SEQ_TAG = _TAG + "seq"
# Scalars whose source text we accept as a mapping key (YAML ``80: x`` and JSON ``"80"`` alike).
_KEY_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "timestamp"))
_TRUE = frozenset({"yes", "true", "on"})
_FALSE = frozenset({"no", "false", "off"})


def quote(text: str, limit: int = 60) -> str:
    """``text`` in double quotes with control characters escaped, shortened if long."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return json.dumps(text)


def sub(field: str, key: str) -> str:
    """The path of ``key`` inside the mapping at ``field``."""
    return f"{field}.{key}" if field else key


def index(field: str, i: int) -> str:
    """The path of item ``i`` of the list at ``field``."""
    return f"{field}[{i}]"


def line_of(node: Node) -> int:
    """1-based line of ``node``; 0 for a node built from JSON (no position)."""
    mark = node.start_mark
    return int(mark.line) + 1 if mark is not None else 0


class NotADocument(ValueError):
    """A value that no JSON document holds (only ``node_of`` raises it)."""


def node_of(data: Any) -> Node:
    """The node tree of a JSON value (as ``json.loads`` returns it), without positions.

    Iterative, so a deeply nested body cannot exhaust the stack.
    """
    root = _shell(data)
    stack: list[tuple[Node, Any]] = [(root, data)]
    while stack:
        node, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise NotADocument(f"mapping key {key!r} is not a string")
                child = _shell(item)
                node.value.append((ScalarNode(STR_TAG, key), child))
                stack.append((child, item))
        elif isinstance(value, list):
            for item in value:
                child = _shell(item)
                node.value.append(child)
                stack.append((child, item))
    return root


def _shell(value: Any) -> Node:
    """A scalar node, or an empty container node that ``node_of`` fills."""
    if isinstance(value, str):  # the commonest value first
        return ScalarNode(STR_TAG, value)
    if isinstance(value, dict):
        return MappingNode(MAP_TAG, [])
    if isinstance(value, list):
        return SequenceNode(SEQ_TAG, [])
    if value is None:
        return ScalarNode(NULL_TAG, "null")
    if isinstance(value, bool):
        return ScalarNode(BOOL_TAG, "true" if value else "false")
    if isinstance(value, int):
        return ScalarNode(INT_TAG, str(value))
    if isinstance(value, float):
        return ScalarNode(FLOAT_TAG, repr(value) if math.isfinite(value) else str(value))
    raise NotADocument(f"{type(value).__name__} is not a JSON value")


def describe(node: Node) -> str:
    """What a node is, for messages such as ``expected a list, got the string "https"``."""
    if isinstance(node, MappingNode | SequenceNode):
        kind = "a mapping" if isinstance(node, MappingNode) else "a list"
        tag = str(node.tag)
        return kind if tag.startswith(_TAG) else f"{kind} tagged {quote(tag)}"
    value = str(node.value)
    if not str(node.tag).startswith(_TAG):
        return f"a value tagged {quote(str(node.tag))}"
    if node.tag == NULL_TAG:
        return "nothing"
    if node.tag == BOOL_TAG:
        return f"the boolean {value}"
    if node.tag in (INT_TAG, _TAG + "float"):
        return f"the number {value}"
    return f"the string {quote(value)}"



@dataclass(frozen=True, order=True)
class Where:
    """A position in the input: file, line and field path."""

    source: str
    line: int
    field: str

    def issue(self, message: str) -> Issue:
        return Issue(self.source, self.line, self.field, message)

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Entry:
    """One key/value pair of a YAML mapping."""

    key: Node
    value: Node


class Reader:
    """Reads values off the nodes of one source, appending every problem to ``issues``."""

    def __init__(self, source: str, issues: list[Issue]) -> None:
        self.source = source
        self.issues = issues

    def where(self, node: Node, field: str) -> Where:
        return Where(self.source, line_of(node), field)

    def error(self, node: Node, field: str, message: str) -> None:
        self.issues.append(Issue(self.source, line_of(node), field, message))

    # ---- containers ----------------------------------------------------
    def entries(self, node: Node, field: str, *, what: str = "a mapping") -> dict[str, Entry] | None:
        """The pairs of a mapping, by key; duplicate and non-string keys are errors."""
        if not isinstance(node, MappingNode):
            self.error(node, field, f"expected {what}, got {describe(node)}")
            return None
        out: dict[str, Entry] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                self.error(key_node, field, "merge keys (<<) are not supported: write the keys out")
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _KEY_TAGS:
                self.error(key_node, field, f"keys must be strings, got {describe(key_node)}")
                continue
            key = str(key_node.value)
            if key in out:
                first = line_of(out[key].key)
                self.error(key_node, sub(field, key), f"key {quote(key)} given twice (first at line {first})")
                continue
            out[key] = Entry(key_node, value_node)
        return out

    def check_keys(
        self,
        node: Node,
        entries: dict[str, Entry],
        field: str,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        hints: dict[str, str] | None = None,
    ) -> None:
        """Report unknown keys (at their line) and missing required keys (at the mapping, with a hint)."""
        allowed = set(required) | set(optional)
        for key, entry in entries.items():
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
                hint = f"did you mean {quote(close[0])}?" if close else "expected one of: " + ", ".join(sorted(allowed))
                self.error(entry.key, sub(field, key), f"unknown key {quote(key)} ({hint})")
        for key in required:
            if key not in entries:
                what = (hints or {}).get(key)
                self.error(node, sub(field, key), f"missing required key: {what}" if what else "missing required key")

    def mapping(
        self,
        node: Node,
        field: str,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        what: str = "a mapping",
    ) -> dict[str, Entry] | None:
        entries = self.entries(node, field, what=what)
        if entries is not None:
            self.check_keys(node, entries, field, required=required, optional=optional)
        return entries

    def sequence(self, node: Node, field: str, *, what: str = "a list", allow_empty: bool = False) -> list[Node]:
        """The items of a list ([] after reporting when ``node`` is not a list)."""
        if not isinstance(node, SequenceNode):
            self.error(node, field, f"expected {what}, got {describe(node)}")
            return []
        items: list[Node] = list(node.value)
        if not items and not allow_empty:
            self.error(node, field, "must not be empty")
        return items

    # ---- scalars -------------------------------------------------------
    def string(self, node: Node, field: str, *, limit: int = 0) -> str | None:
        """A string scalar (at most ``limit`` characters when given)."""
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            text = str(node.value)
            if limit and len(text) > limit:
                self.error(node, field, f"too long: {len(text)} characters (at most {limit})")
                return None
            return text
        plain = isinstance(node, ScalarNode) and str(node.tag).startswith(_TAG) and node.tag != NULL_TAG
        hint = " (quote it to use it as text)" if plain else ""
        self.error(node, field, f"expected a string, got {describe(node)}{hint}")
        return None

    def name(self, node: Node, field: str, what: str = "name") -> str | None:
        """A string that satisfies ``is_valid_name`` (safe to embed in firewall rules)."""
        text = self.string(node, field)
        if text is None:
            return None
        if not is_valid_name(text):
            self.error(
                node,
                field,
                f"invalid {what} {quote(text)}: use 1-63 characters of A-Z a-z 0-9 _ . - "
                "starting with a letter or digit",
            )
            return None
        return text

    def integer(self, node: Node, field: str, *, low: int, high: int) -> int | None:
        if isinstance(node, ScalarNode) and node.tag == INT_TAG:
            text = str(node.value)
            if text.isascii() and text.isdigit() and len(text) <= 10:
                value = int(text)
                if low <= value <= high:
                    return value
                self.error(node, field, f"{value} is out of range ({low}-{high})")
                return None
        self.error(node, field, f"expected a whole number, got {describe(node)}")
        return None

    def boolean(self, node: Node, field: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == BOOL_TAG:
            text = str(node.value).lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        self.error(node, field, f"expected true or false, got {describe(node)}")
        return None


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def is_text(node: Node, text: str) -> bool:
    """True when ``node`` is the plain string ``text`` (such as ``all``)."""
    return isinstance(node, ScalarNode) and node.tag == STR_TAG and node.value == text


__all__ = [
    "Entry",
    "NotADocument",
    "Reader",
    "Where",
    "describe",
    "index",
    "is_null",
    "is_text",
    "line_of",
    "node_of",
    "quote",
    "sub",
]
