"""Output schemas that are cheap for clients to check.

MCP clients validate every structured result against the tool's output schema (the SDK
does it with jsonschema, in Python, on each call), and each `$ref` lookup and `anyOf`
branch is a sub-validator of its own. `flat_json_schema` gives a model's schema the same
meaning in a flatter shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "contains", "propertyNames")
_SUBSCHEMA_LIST_KEYS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAP_KEYS = ("properties", "patternProperties")


def flat_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s serialization JSON schema with the same meaning in a shape that is cheap to validate:
    `$ref`s into `$defs` are inlined (the model
    has no recursive types), an optional field's `anyOf: [X, {"type": "null"}]` becomes X
    with "null" added to its `type` (or None to its `enum`), and pydantic's generated
    `title`s (field names in title case) are dropped. Descriptions, defaults, bounds and
    `required` lists stay as pydantic wrote them.
    """
    schema = model.model_json_schema(mode="serialization")
    definitions: dict[str, Any] = schema.pop("$defs", {})
    return _flatten(schema, definitions, ())


def _flatten(node: dict[str, Any], definitions: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.removeprefix("#/$defs/")
        if name == ref or name in seen:
            raise ValueError(f"cannot inline {ref!r}: only non-recursive local $defs are supported")
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return _flatten({**definitions[name], **siblings}, definitions, (*seen, name))
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _SUBSCHEMA_MAP_KEYS:
            flat[key] = {name: _flatten(sub, definitions, seen) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LIST_KEYS:
            flat[key] = [_flatten(sub, definitions, seen) for sub in value]
        elif key in _SUBSCHEMA_KEYS and isinstance(value, dict):
            flat[key] = _flatten(value, definitions, seen)
        else:
            flat[key] = value
    nullable = _nullable(flat.get("anyOf"))
    if nullable is not None:
        del flat["anyOf"]
        flat = {**nullable, **flat}
    return flat


def _nullable(branches: Any) -> dict[str, Any] | None:
    """`X` with null allowed, for `anyOf: [X, {"type": "null"}]` where X has a plain `type`; else None."""
    if not isinstance(branches, list) or len(branches) != 2 or {"type": "null"} not in branches:
        return None
    other = branches[0] if branches[1] == {"type": "null"} else branches[1]
    kind = other.get("type")
    if not isinstance(kind, str) or any(key in other for key in ("anyOf", "allOf", "oneOf", "const")):
        return None
    merged = {**other, "type": [kind, "null"]}
    if "enum" in other:
        merged["enum"] = [*other["enum"], None]
    return merged


def either(first: type[BaseModel], second: type[BaseModel]) -> dict[str, Any]:
    """An object matching `first`'s flat schema or `second`'s. The common shape goes first:
    jsonschema stops at the first branch that accepts, so it costs what `first` alone costs."""
    return {"type": "object", "anyOf": [flat_json_schema(first), flat_json_schema(second)]}
