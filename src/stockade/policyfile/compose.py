"""An iterative YAML composer: text -> one node tree per document, with line marks.

``yaml.compose_all`` recurses once per nesting level: the pure-Python composer raises
RecursionError on deep input and libyaml's composer overflows the C stack and kills the
interpreter. Here the (non-recursive) event parser, libyaml's when available, feeds an
explicit stack, and nesting deeper than ``MAX_DEPTH`` is reported as an error. Tags are
resolved exactly as ``yaml.SafeLoader`` resolves them; no Python object is constructed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

MAX_DEPTH = 64  # policy documents need about 8

EVENT_PARSER: type = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class ComposeError(Exception):
    """The text is not YAML, or not a tree we accept; ``line`` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


def compose_documents(text: str) -> Iterator[Node]:
    """Yield the root node of each document; raise ``ComposeError`` on any YAML problem."""
    try:
        yield from _compose(text)
    except yaml.YAMLError as exc:
        raise _syntax_error(text, exc) from None


def _syntax_error(text: str, exc: yaml.YAMLError) -> ComposeError:
    last_line = text.rstrip("\n").count("\n") + 1
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        context = exc.context or ""
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            context += f" started at line {int(exc.context_mark.line) + 1}"
        message = ": ".join(p for p in (context, exc.problem) if p) or str(exc)
    elif isinstance(exc, yaml.reader.ReaderError):
        # libyaml counts the position in UTF-8 bytes, the pure-Python reader in characters.
        if EVENT_PARSER is yaml.SafeLoader:
            line = text.count("\n", 0, exc.position) + 1
        else:
            line = text.encode("utf-8").count(b"\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        message = f"unacceptable character #x{char:04x}: {exc.reason}"
    else:
        line, message = 1, str(exc)
    return ComposeError(min(max(line, 1), last_line), f"YAML syntax error: {message}")


def _compose(text: str) -> Iterator[Node]:
    resolve: Callable[[type[Node], str | None, Any], str] = Resolver().resolve
    anchors: dict[str, Node] = {}
    stack: list[tuple[Node, list[Node]]] = []  # open collections and their children so far
    root: Node | None = None

    def attach(node: Node, anchor: str | None) -> None:
        nonlocal root
        if anchor is not None:
            anchors[anchor] = node
        if stack:
            stack[-1][1].append(node)
        else:
            root = node

    for event in yaml.parse(text, Loader=EVENT_PARSER):
        start: Any = event.start_mark
        end: Any = event.end_mark
        line = int(start.line) + 1
        if isinstance(event, yaml.DocumentStartEvent):
            anchors.clear()
            root = None
        elif isinstance(event, yaml.DocumentEndEvent):
            if root is not None:
                yield root
        elif isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(ScalarNode, event.value, event.implicit)
            node: Node = ScalarNode(tag, event.value, start, end, style=event.style)
            attach(node, event.anchor)
        elif isinstance(event, yaml.AliasEvent):
            target = anchors.get(event.anchor or "")
            if target is None:
                raise ComposeError(line, f"YAML error: alias *{event.anchor} refers to no anchor")
            if stack:
                stack[-1][1].append(target)
            else:
                root = target
        elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise ComposeError(line, f"YAML error: nesting deeper than {MAX_DEPTH} levels")
            is_seq = isinstance(event, yaml.SequenceStartEvent)
            kind = SequenceNode if is_seq else MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(kind, None, event.implicit)
            node = kind(tag, [], start, end, flow_style=event.flow_style)
            attach(node, event.anchor)
            stack.append((node, []))
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            node, children = stack.pop()
            node.end_mark = end
            if isinstance(node, MappingNode):
                node.value[:] = list(zip(children[0::2], children[1::2], strict=True))
            else:
                node.value[:] = children
