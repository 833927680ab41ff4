"""The tool-call formats of model families: which one a chat template teaches, and a finished reply parsed into
its content and OpenAI ``tool_calls`` (the streaming side is ``gateway.toolstream``).

Contract: pure functions over text (no HTTP framework, no tokenizer, no torch); the request side and the shared
types are ``gateway.tools``.

- ``tool_family(template)``: which output format the model's chat template teaches: ``hermes``
  (Hermes / Qwen2.5: ``<tool_call>\\n{"name", "arguments"}\\n</tool_call>``, several allowed), ``llama3``
  (Llama 3.1+: ``{"name", "parameters"}``, optionally after ``<|python_tag|>``), ``mistral``
  (``[TOOL_CALLS][{"name", "arguments"}, ...]``), ``mistral_args`` (Mistral's tokenizers v11+, e.g. Mistral Small
  3.1 / Devstral, whose template has ``[ARGS]``: ``[TOOL_CALLS]name[ARGS]{...}`` per call, back to back, optionally
  ``[CALL_ID]id`` before ``[ARGS]``); None when the template does not use ``tools`` at all.
- ``parse_tool_calls(text, family)``: (content outside the calls or None, the calls); text that does not
  parse as calls stays content, as vLLM's parsers do. Both Mistral families parse both Mistral formats.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from meshinfer.gateway.tools import Family, ToolCall, call_id


def tool_family(template: str) -> Family | None:
    """The tool-call format ``template`` (a chat template's source) teaches; None: no tool support."""
    if not re.search(r"\btools\b", template):
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral_args" if "[ARGS]" in template else "mistral"
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return "llama3"
    return "hermes"  # a template that takes tools without naming a format: Hermes is the common default


def _json_values(text: str) -> list[Any] | None:
    """The JSON values ``text`` is made of (separated by whitespace or ';'), or None if it is anything else."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        values.append(value)


def _call(value: Any, args_key: str) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(args_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False), call_id())


def _content(text: str) -> str | None:
    return text if text.strip() else None


_NAMED_CALL = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]{1,64})\s*(?:\[CALL_ID\]\s*([A-Za-z0-9]{1,64})\s*)?"
                         r"(?:\[ARGS\])?\s*")
"""One v11+ call's head: ``[TOOL_CALLS]name[ARGS]`` (``[ARGS]`` may be missing: a decoder that skipped it, or
models that write ``[TOOL_CALLS]name{...}``, as vLLM's parser also reads)."""


def _mistral_named(text: str) -> tuple[str | None, list[ToolCall]] | None:
    """``[TOOL_CALLS]name[ARGS]{json}`` (or ``[TOOL_CALLS]name{json}``) calls, back to back (whitespace between
    them), after any content; None when ``text`` has none, or anything after the first one is not such a call."""
    first = _NAMED_CALL.search(text)
    if first is None:
        return None
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = first.start()
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        match = _NAMED_CALL.match(text, pos)
        if match is None:
            return None
        try:
            arguments, pos = decoder.raw_decode(text, match.end())
        except (ValueError, RecursionError):
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(match.group(1), json.dumps(arguments, ensure_ascii=False), call_id()))
    return _content(text[:first.start()]), calls


def parse_tool_calls(text: str, family: Family) -> tuple[str | None, list[ToolCall]]:
    """``text`` (a finished reply) split into its content and its tool calls (see the module docstring)."""
    if family == "hermes":
        found = list(re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL))
        calls = [_call(v, "arguments") for m in found for v in (_json_values(m.group(1)) or [None])]
        if not found or any(c is None for c in calls):
            return text, []
        between = [text[a.end():b.start()] for a, b in itertools.pairwise(found)] + [text[found[-1].end():]]
        rest = text[:found[0].start()] + "".join(piece for piece in between if piece.strip())
        return _content(rest), [c for c in calls if c is not None]
    if family in ("mistral", "mistral_args"):
        named = _mistral_named(text)
        if named is not None:
            return named
        head, sep, tail = text.partition("[TOOL_CALLS]")
        if not sep and text.lstrip().startswith("["):  # the marker was a special token, skipped when decoding
            head, sep, tail = "", "[TOOL_CALLS]", text
        values = _json_values(tail) if sep else None
        if not values:
            return text, []
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        calls = [_call(v, "arguments") for v in flat]
        if any(c is None for c in calls):
            return text, []
        return _content(head), [c for c in calls if c is not None]
    body = text.strip()
    head = ""
    if "<|python_tag|>" in body:
        head, _, body = body.partition("<|python_tag|>")
    values = _json_values(body) if body.startswith("{") else None
    if not values:
        return text, []
    calls = [_call(v, "parameters") for v in values]
    if any(c is None for c in calls):
        return text, []
    return _content(head), [c for c in calls if c is not None]
