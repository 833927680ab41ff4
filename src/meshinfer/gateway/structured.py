"""OpenAI ``response_format`` in, a ``models.grammar.GrammarSpec`` (or None: free text) out.

Contract: pure functions over decoded JSON (no torch, no network, no grammar engine): ``parse_response_format``
accepts the shapes the OpenAI API defines:

* ``{"type": "text"}`` (or an absent / null field): None, no constraint;
* ``{"type": "json_object"}``: any JSON object (``GrammarSpec("json_object")``);
* ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``: output valid against
  ``schema`` (``GrammarSpec("json_schema", <schema as compact JSON>)``). ``name`` is required (letters, digits,
  ``_`` and ``-``, at most 64, as OpenAI requires), ``schema`` must be an object, ``strict`` a boolean (the
  schema is enforced either way: the logits are masked while decoding), ``description`` a string.

Anything else is a ``ResponseFormatError`` (``gateway.requests`` answers a 400 with ``param="response_format"``);
so is a schema over ``MAX_SCHEMA_CHARS`` characters as compact JSON or nested deeper than ``MAX_SCHEMA_DEPTH``
(bounded: compiling it runs on the gateway's worker thread). Whether the grammar engine accepts the schema is
checked when it is compiled (``gateway.app``: the engine's message as a 400 with the same param).
"""

from __future__ import annotations

import json
import re
from typing import Any, cast

from meshinfer.models.grammar import GrammarSpec

__all__ = ["MAX_SCHEMA_CHARS", "MAX_SCHEMA_DEPTH", "PARAM", "ResponseFormatError", "parse_response_format"]

PARAM = "response_format"
MAX_SCHEMA_CHARS = 65536
"""The largest accepted JSON schema, as compact JSON text."""
MAX_SCHEMA_DEPTH = 32
"""The deepest accepted nesting of objects and lists in a schema."""
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ResponseFormatError(ValueError):
    """A malformed ``response_format`` (``gateway.requests`` answers it as a 400 with ``param=PARAM``)."""


def bad(message: str) -> ResponseFormatError:
    return ResponseFormatError(message)


def _depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests lists and objects (stops counting past ``limit``)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    deepest = 0
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in cast(dict[str, Any], item).values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in cast(list[Any], item))
    return deepest


def _schema_text(schema: Any) -> str:
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema must be a JSON schema object")
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise bad(f"response_format.json_schema.schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as err:
        raise bad(f"response_format.json_schema.schema is not valid JSON text ({err})") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise bad(f"response_format.json_schema.schema is {len(text)} characters as JSON; at most "
                  f"{MAX_SCHEMA_CHARS} are accepted")
    return text


def parse_response_format(value: Any) -> GrammarSpec | None:
    """The grammar ``response_format`` asks for (None: free text); a 400 for anything malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("response_format must be an object such as {'type': 'json_object'}")
    fmt = cast(dict[str, Any], value)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", PARAM)
    if kind != "json_schema":
        raise bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    raw = fmt.get("json_schema")
    if not isinstance(raw, dict):
        raise bad("response_format.json_schema must be an object with a name and a schema")
    spec = cast(dict[str, Any], raw)
    name = spec.get("name")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise bad("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', got "
                  f"{str(name)[:80]!r}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad(f"response_format.json_schema.strict must be a boolean, got {strict!r}")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise bad("response_format.json_schema.description must be a string")
    if "schema" not in spec:
        raise bad("response_format.json_schema.schema is required (the JSON schema the output must follow)")
    return GrammarSpec("json_schema", _schema_text(spec["schema"]), PARAM)
