"""The grammar that enforces tool_choice "required" or a named tool, in the format the model's family uses.

Contract: pure (plain JSON data in, a ``models.grammar.GrammarSpec`` out, compiled elsewhere); knows no HTTP, no
tokenizer, no torch.

- ``tool_grammar(req, family, specials)``: a Lark grammar (llguidance, ``%json`` of each tool's call schema) for
  tool_choice "required" (any tool) or named (that tool), so that even a random-weight model emits a valid call.
  A marker the tokenizer has as a special token (``specials``: marker -> id; real Mistral tokenizers'
  ``[TOOL_CALLS]`` / ``[ARGS]``) is that token (``<[id]>``), as the model emits it: a quoted literal would be
  text, which llguidance cannot match with a special token (it masks the token in and then refuses it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from meshinfer.gateway.tools import Family, Tool, ToolRequest
from meshinfer.models.grammar import GrammarSpec

_COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _call_schema(tool: Tool, args_key: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", args_key],
            "properties": {"name": {"const": tool.name}, args_key: json.loads(tool.parameters)}}


def _hoisted_defs(schemas: list[dict[str, Any]], args_key: str) -> dict[str, Any]:
    """The ``$defs`` / ``definitions`` of the tools' parameter schemas, moved to the root of the call schema so
    that their ``#/$defs/...`` references (pydantic's nested models) still resolve once embedded; a name two
    tools define differently stays where it was (and fails to resolve: a 400 naming tool_choice)."""
    out: dict[str, dict[str, Any]] = {}
    for schema in schemas:
        parameters = schema["properties"][args_key]
        if not isinstance(parameters, dict):
            continue
        for key in ("$defs", "definitions"):
            defs = parameters.get(key)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            if not isinstance(defs, dict):
                continue
            merged = out.setdefault(key, {})
            if all(merged.get(name, value) == value for name, value in defs.items()):  # pyright: ignore[reportUnknownVariableType]
                merged.update(defs)  # pyright: ignore[reportUnknownArgumentType]
                del parameters[key]
    return out


def _args_schema(tool: Tool) -> str:
    """``tool``'s parameters schema as JSON text, compact output asked for (its own ``$defs`` stay in it)."""
    return json.dumps({**json.loads(tool.parameters), "x-guidance": _COMPACT}, ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text)


def _seq(pieces: list[str], specials: Mapping[str, int]) -> str:
    """Lark terms spelling ``pieces`` in order: a special token's id where ``specials`` has it, else the text."""
    return " ".join(f"<[{specials[p]}]>" if p in specials else _lark_string(p) for p in pieces if p)


def tool_grammar(req: ToolRequest, family: Family, specials: Mapping[str, int] | None = None) -> GrammarSpec | None:
    """The grammar forcing a call for tool_choice "required" / named; None for "auto" and "none"."""
    if req.choice in ("auto", "none"):
        return None
    marks = specials or {}
    tools = req.tools if req.choice == "required" else (req.tool(req.choice),)
    args_key = "parameters" if family == "llama3" else "arguments"
    schemas = [_call_schema(t, args_key) for t in tools]
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, **_hoisted_defs(schemas, args_key), "x-guidance": _COMPACT}
    body = f"body: %json {json.dumps(schema, ensure_ascii=False)}\n"
    many = req.parallel and req.choice == "required"
    if family == "hermes":
        call = f"call: {_seq(['<tool_call>', chr(10)], marks)} body {_seq([chr(10), '</tool_call>'], marks)}\n"
        start = f"start: call ({_lark_string(chr(10))} call)*\n" if many else "start: call\n"
        return GrammarSpec("lark", start + call + body, "tool_choice")
    if family == "mistral_args":  # [TOOL_CALLS]name[ARGS]{...} per call: one rule per tool, its own schema
        alts = [f"c{i}" for i in range(len(tools))]
        rules = "".join(f"c{i}: {_seq(['[TOOL_CALLS]', t.name, '[ARGS]'], marks)} a{i}\n"
                        f"a{i}: %json {_args_schema(t)}\n" for i, t in enumerate(tools))
        return GrammarSpec("lark", f"start: call{'+' if many else ''}\ncall: {' | '.join(alts)}\n" + rules,
                           "tool_choice")
    if family == "mistral":
        head = _seq(["[TOOL_CALLS]", "["], marks)
        start = f'start: {head} body (", " body)* "]"\n' if many else f'start: {head} body "]"\n'
        return GrammarSpec("lark", start + body, "tool_choice")
    return GrammarSpec("lark", "start: body\n" + body, "tool_choice")
