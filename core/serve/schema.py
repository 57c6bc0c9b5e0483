"""JSON schemas as OpenAI's strict mode and vLLM read them.

- An object allows only the properties it lists, unless it says `additionalProperties: true` (or
  gives a schema for the others): `strict_schema` writes `additionalProperties: false` into every
  object schema that leaves it out, as OpenAI's strict mode requires and vLLM's xgrammar assumes.
- No whitespace between JSON tokens (constrain.py compiles with `whitespace_flexible: false`), so
  spaces and newlines cannot eat `max_tokens`; inside strings the schema's own bounds hold.
- `strict: true` (in `response_format.json_schema` or a tool's `function`): a schema that OpenAI would
  reject is a 400 naming the keyword and where it is (`check_openai_strict`).
"""
from __future__ import annotations

import copy

from ..errors import SolError

# Keywords whose value is one schema, a {name: schema} map, or a list of schemas.
ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
       "additionalItems", "unevaluatedProperties", "unevaluatedItems")
MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
LIST = ("anyOf", "allOf", "oneOf", "prefixItems")

# What OpenAI's strict mode refuses (its "Supported schemas" page): these keywords anywhere ...
STRICT_UNSUPPORTED = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                      "patternProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
                      "minProperties", "maxProperties", "contains", "minContains", "maxContains", "uniqueItems",
                      "oneOf")


def _is_object(s: dict) -> bool:
    t = s.get("type")
    return t == "object" or (isinstance(t, list) and "object" in t) or ("properties" in s and t is None)


def _walk(s, fn, where: str) -> None:
    """Call fn(schema, where) on s and every schema inside it."""
    if not isinstance(s, dict):
        return
    fn(s, where)
    for k in ONE:
        v = s.get(k)
        if isinstance(v, dict):
            _walk(v, fn, f"{where}.{k}")
        elif k == "items" and isinstance(v, list):
            for i, x in enumerate(v):
                _walk(x, fn, f"{where}.items[{i}]")
    for k in MAP:
        v = s.get(k)
        if isinstance(v, dict):
            for name, x in v.items():
                _walk(x, fn, f"{where}.{k}.{name}")
    for k in LIST:
        v = s.get(k)
        if isinstance(v, list):
            for i, x in enumerate(v):
                _walk(x, fn, f"{where}.{k}[{i}]")


def strict_schema(schema: dict) -> dict:
    """A copy of the schema in which every object that does not say otherwise allows only its listed
    properties. An object combined with allOf keeps what it says (its parts list the rest)."""
    out = copy.deepcopy(schema)

    def close(s, where):
        if _is_object(s) and "additionalProperties" not in s and "allOf" not in s \
                and "unevaluatedProperties" not in s:
            s["additionalProperties"] = False
    _walk(out, close, "schema")
    out.pop("x-guidance", None)   # llguidance's own options (whitespace among them) are the server's
    return out


def check_openai_strict(schema: dict, where: str) -> None:
    """Refuse what OpenAI's strict mode refuses, naming the keyword: the root must be an object; every
    object must set `additionalProperties: false` and list every property in `required`; no
    composition but anyOf (and $ref); no keyword from STRICT_UNSUPPORTED."""
    if not isinstance(schema, dict) or not _is_object(schema) or "anyOf" in schema:
        raise SolError(f"{where}: strict: the root must be an object schema (type: object), not anyOf or another type")

    def check(s, at):
        for k in STRICT_UNSUPPORTED:
            if k in s:
                raise SolError(f"{at}: strict: the keyword `{k}` is not supported in strict mode; remove it or "
                               "send strict: false")
        if _is_object(s):
            if s.get("additionalProperties") is not False:
                raise SolError(f"{at}: strict: objects must set `additionalProperties` to false")
            props = s.get("properties") or {}
            missing = [p for p in props if p not in (s.get("required") or [])]
            if missing:
                raise SolError(f"{at}: strict: `required` must list every property; {missing[0]!r} is missing "
                               "(make it nullable with type [..., \"null\"] to leave it empty)")
    _walk(schema, check, where)
