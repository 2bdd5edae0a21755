"""Walks the published OpenAPI document so the security tests cover every route and field.

Nothing here is hand-listed: a new route, parameter or body field is covered the day it is
published. :func:`operations` yields each (method, path) with its parameters; :func:`body_fields`
yields every field of a request body with the JSON path to it and a minimal body placing a
value there (``{"rules": [{"consumers": [VALUE]}]}``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # with {param} placeholders, /api/v1 included
    path_params: tuple[str, ...]
    query_params: tuple[str, ...]
    body_schema: dict[str, Any] | None  # the application/json request body schema
    body_media: str | None  # its media type (application/json, application/yaml)


@dataclass(frozen=True)
class BodyField:
    """One field of a request body: where it is, its schema, and how to build a body holding it."""

    field: str  # dotted path as the API's 422 reports it: "rules.0.consumers.0"
    schema: dict[str, Any]
    build: Callable[[Any], Any]  # value -> minimal JSON body with ``value`` at ``field``


def operations(spec: dict[str, Any]) -> list[Operation]:
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = op.get("parameters", [])
            body = op.get("requestBody", {}).get("content", {})
            media = next(iter(body), None)
            out.append(Operation(
                method.upper(), path,
                tuple(p["name"] for p in params if p["in"] == "path"),
                tuple(p["name"] for p in params if p["in"] == "query"),
                body[media]["schema"] if media else None, media,
            ))
    return out


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    return schema


def _alternatives(spec: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    schema = resolve(spec, schema)
    alts = schema.get("anyOf") or schema.get("oneOf")
    if alts:
        return [a for alt in alts for a in _alternatives(spec, alt) if a.get("type") != "null"]
    if schema.get("allOf"):
        return _alternatives(spec, schema["allOf"][0])
    return [schema]


def body_fields(spec: dict[str, Any], schema: dict[str, Any]) -> Iterator[BodyField]:
    """Every field (object property, array item, map value) under ``schema``, depth first."""
    yield from _walk(spec, schema, "", lambda v: v, frozenset())


def _walk(spec: dict[str, Any], schema: dict[str, Any], where: str, build: Callable[[Any], Any],
          seen: frozenset[str]) -> Iterator[BodyField]:
    ref = schema.get("$ref", "")
    if ref in seen:
        return
    seen = seen | {ref} if ref else seen
    for alt in _alternatives(spec, schema):
        if where:
            yield BodyField(where, alt, build)
        kind = alt.get("type")
        if kind == "object":
            for name, sub in alt.get("properties", {}).items():
                yield from _walk(spec, sub, f"{where}.{name}" if where else name,
                                 lambda v, b=build, n=name: b({n: v}), seen)  # type: ignore[misc]
            extra = alt.get("additionalProperties")
            if isinstance(extra, dict):
                yield from _walk(spec, extra, f"{where}.k" if where else "k",
                                 lambda v, b=build: b({"k": v}), seen)  # type: ignore[misc]
        elif kind == "array" and isinstance(alt.get("items"), dict):
            yield from _walk(spec, alt["items"], f"{where}.0" if where else "0",
                             lambda v, b=build: b([v]), seen)  # type: ignore[misc]


def fill_path(path: str, values: dict[str, str], default: str = "x") -> str:
    out = path
    while "{" in out:
        start = out.index("{")
        end = out.index("}", start)
        name = out[start + 1:end]
        out = out[:start] + values.get(name, default) + out[end + 1:]
    return out
