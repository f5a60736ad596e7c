"""Tool arguments checked strictly against the tools' input schemas, before the SDK validates them.

Models guess argument names and JSON types. Pydantic, as the SDK runs it, ignores a name it does not
know (``kill {id, sig: "KILL"}`` sent SIGTERM, the default) and coerces types (``tty: "yes"`` became true,
``timeoutMs: "1000"`` a number). A call is refused instead, naming the argument and the closest valid
one, and each value must already have its schema's JSON type; ranges and lengths stay the SDK's to check.
The published schemas say ``additionalProperties: false`` to match.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import InvalidInput

_JSON_TYPES: dict[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def close_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with ``additionalProperties: false`` on the arguments and on each object they define."""
    for part in [schema, *schema.get("$defs", {}).values()]:
        if part.get("type") == "object" and "properties" in part:
            part["additionalProperties"] = False
    return schema


def check_arguments(tool: str, schema: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Raise InvalidInput for an argument ``schema`` does not name, or a value not of its JSON type."""
    _check_object(tool, schema, schema, arguments, "")


def _check_object(tool: str, root: dict[str, Any], schema: dict[str, Any], value: dict[str, Any], path: str) -> None:
    properties: dict[str, Any] = schema.get("properties", {})
    for name, item in value.items():
        where = f"{path}{name}"
        if name not in properties:
            raise InvalidInput(_unknown(tool, path, name, list(properties)))
        _check_value(tool, root, properties[name], item, where)


def _check_value(tool: str, root: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> None:
    schema = _resolve(root, schema)
    if "anyOf" in schema:
        branches = [_resolve(root, branch) for branch in schema["anyOf"]]
        fitting = [branch for branch in branches if _has_type(value, branch.get("type"))]
        if not fitting:
            expected = " or ".join(_JSON_TYPES.get(str(b.get("type")), str(b.get("type"))) for b in branches)
            raise InvalidInput(_wrong_type(tool, where, expected, value))
        schema = fitting[0]
    kind = schema.get("type")
    if kind is not None and not _has_type(value, kind):
        raise InvalidInput(_wrong_type(tool, where, _JSON_TYPES.get(str(kind), str(kind)), value))
    if kind == "object" and isinstance(value, dict):
        if "properties" in schema:
            _check_object(tool, root, schema, value, f"{where}.")
        elif isinstance(extra := schema.get("additionalProperties"), dict):
            for name, item in value.items():
                _check_value(tool, root, extra, item, f"{where}.{name}")


def _resolve(root: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: dict[str, Any] = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
        return resolved
    return schema


def _has_type(value: Any, kind: object) -> bool:
    if kind is None:
        return True
    actual = _json_type(value)
    return actual == kind or (kind == "number" and actual == "integer")


def _unknown(tool: str, path: str, name: str, valid: list[str]) -> str:
    shown = name if len(name) <= 40 else name[:40] + "..."
    closest = _closest(name, valid)
    hint = f"; did you mean {path}{closest}?" if closest else ""
    known = ", ".join(f"{path}{v}" for v in valid) or "none"
    return f"{tool} has no argument {path}{shown!r}{hint} ({tool} takes {known})"


def _closest(name: str, valid: list[str]) -> str | None:
    folded = {v.lower().replace("_", ""): v for v in valid}
    key = name.lower().replace("_", "").replace("-", "")
    if key in folded:
        return folded[key]
    found = difflib.get_close_matches(key, list(folded), n=1, cutoff=0.6)
    return folded[found[0]] if found else None


def _wrong_type(tool: str, where: str, expected: str, value: Any) -> str:
    given = _JSON_TYPES.get(_json_type(value), type(value).__name__)
    shown = repr(value) if isinstance(value, str | int | float | bool) and len(repr(value)) <= 40 else ""
    return f"{tool}: {where} must be {expected}, not {given}{' ' + shown if shown else ''}; send the JSON type itself"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__
