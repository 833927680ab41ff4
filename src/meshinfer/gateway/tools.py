"""Tool (function) calling in chat completions: the request's ``tools`` / ``tool_choice`` / tool messages in,
the model's output parsed into OpenAI ``tool_calls`` out, and the grammar that enforces a forced call.

Contract: pure functions over plain JSON data and text: no HTTP framework, no tokenizer, no torch (the grammar
is a ``models.grammar.GrammarSpec``, compiled elsewhere). Errors are ``ToolError(message, param)`` (the caller
makes them 400s naming ``param``).

- ``parse_tools(body)``: ``tools`` (type "function" only; at most ``MAX_TOOLS``, each's JSON at most
  ``MAX_TOOL_BYTES``), ``tool_choice`` ("auto" default, "none", "required", or ``{"type": "function",
  "function": {"name"}}`` naming a given tool), ``parallel_tool_calls`` (default true). The legacy
  ``functions`` / ``function_call`` are mapped onto them (as OpenAI documents the equivalence).
- ``tool_message(message, i)``: a ``role: tool`` message (``tool_call_id``, text content) or an assistant
  message with ``tool_calls`` (``content`` may be null) in the Hugging Face chat-template convention
  (``{"type": "function", "function": {"name", "arguments": <dict>}}``).
- ``tool_family(template)``: which output format the model's chat template teaches: ``hermes``
  (Hermes / Qwen2.5: ``<tool_call>\\n{"name", "arguments"}\\n</tool_call>``, several allowed), ``llama3``
  (Llama 3.1+: ``{"name", "parameters"}``, optionally after ``<|python_tag|>``), ``mistral``
  (``[TOOL_CALLS][{"name", "arguments"}, ...]``), ``mistral_args`` (Mistral's tokenizers v11+, e.g. Mistral Small
  3.1 / Devstral, whose template has ``[ARGS]``: ``[TOOL_CALLS]name[ARGS]{...}`` per call, back to back, optionally
  ``[CALL_ID]id`` before ``[ARGS]``); None when the template does not use ``tools`` at all.
- ``parse_tool_calls(text, family)``: (content outside the calls or None, the calls); text that does not
  parse as calls stays content, as vLLM's parsers do. Both Mistral families parse both Mistral formats.
- ``tool_grammar(tools, choice, family, parallel)``: a Lark grammar (llguidance, ``%json`` of each tool's
  call schema) for tool_choice "required" (any tool) or named (that tool), so that even a random-weight model
  emits a valid call.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from meshinfer.models.grammar import GrammarSpec

MAX_TOOLS = 128
"""The most tools one request may declare (OpenAI documents 128)."""
MAX_TOOL_BYTES = 32_768
"""The largest JSON text one tool's declaration may take."""
MAX_NAME_CHARS = 64
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

Family = Literal["hermes", "llama3", "mistral", "mistral_args"]
Choice = Literal["auto", "none", "required"] | str
"""``auto``, ``none``, ``required``, or (anything else) the name of the tool that must be called."""

MARKERS: dict[str, tuple[str, ...]] = {"hermes": ("<tool_call>",), "llama3": ("<|python_tag|>",),
                                       "mistral": ("[TOOL_CALLS]",), "mistral_args": ("[TOOL_CALLS]",)}
"""Per family, the texts that open a tool call."""
BARE_STARTS: dict[str, str] = {"llama3": "{", "mistral": "["}
"""Per family, how a reply that is only a call may start when its marker is a special token the detokenizer
skipped (Llama's ``<|python_tag|>``, Mistral's ``[TOOL_CALLS]``) or was never emitted (Llama's JSON calls)."""


class ToolError(ValueError):
    """A malformed tools request: ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    """One declared function."""

    name: str
    description: str
    parameters: str
    """Its parameters' JSON schema as JSON text (``{"type": "object"}`` when none was given)."""

    def template_dict(self) -> dict[str, Any]:
        """How chat templates take it (the OpenAI shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request."""

    tools: tuple[Tool, ...]
    choice: Choice = "auto"
    parallel: bool = True

    def tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.name == name)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text (the OpenAI shape)."""

    name: str
    arguments: str
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id() -> str:
    """A fresh tool call id (``call_`` and 24 random hex digits)."""
    return "call_" + secrets.token_hex(12)


# ---- the request ------------------------------------------------------------------------------------


def _function(value: Any, param: str) -> Tool:
    if not isinstance(value, dict):
        raise ToolError(f"{param} must be an object with a name", param)
    name = value.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolError(f"{param}.name must be 1-{MAX_NAME_CHARS} letters, digits, '_', '.' or '-', got {name!r}",
                        param)
    description = value.get("description") or ""
    if not isinstance(description, str):
        raise ToolError(f"{param}.description must be a string", param)
    parameters = value.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ToolError(f"{param}.parameters must be a JSON schema object", param)
    try:
        text = json.dumps(parameters, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, RecursionError):
        raise ToolError(f"{param}.parameters is not a valid JSON schema object", param) from None
    return Tool(name, description, text)


def _tools(value: Any, param: str, legacy: bool) -> tuple[Tool, ...]:
    if not isinstance(value, list) or not value:
        raise ToolError(f"{param} must be a non-empty list", param)
    if len(value) > MAX_TOOLS:
        raise ToolError(f"{param} takes at most {MAX_TOOLS} entries, got {len(value)}", param)
    out: list[Tool] = []
    for i, entry in enumerate(value):
        where = f"{param}[{i}]"
        if not legacy:
            if not isinstance(entry, dict) or entry.get("type") != "function":
                raise ToolError(f"{where}.type must be 'function' (the only tool type supported)", param)
            entry = entry.get("function")
            where += ".function"
        try:
            size = len(json.dumps(entry, ensure_ascii=False).encode("utf-8"))
        except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError (a lone surrogate) is a ValueError
            raise ToolError(f"{where} is not valid JSON of Unicode text", param) from None
        if size > MAX_TOOL_BYTES:
            raise ToolError(f"{where} takes {size} bytes of JSON, more than {MAX_TOOL_BYTES}", param)
        try:
            tool = _function(entry, where)
        except ToolError as err:
            raise ToolError(str(err), param) from None
        if any(t.name == tool.name for t in out):
            raise ToolError(f"{param}: the function name {tool.name!r} is declared twice", param)
        out.append(tool)
    return tuple(out)


def _choice(value: Any, tools: tuple[Tool, ...], param: str, legacy: bool) -> Choice:
    if value is None:
        return "auto"
    if isinstance(value, str):
        if value in ("auto", "none") or (value == "required" and not legacy):
            return value
        raise ToolError(f"{param} must be 'none', 'auto'{'' if legacy else ', required'} or an object naming a "
                        f"function, got {value!r}", param)
    name = None
    if isinstance(value, dict):
        name = value.get("name") if legacy else (
            (value.get("function") or {}).get("name") if value.get("type") == "function"
            and isinstance(value.get("function"), dict) else None)
    if not isinstance(name, str):
        raise ToolError(f"{param} must be a string or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                        param)
    if not any(t.name == name for t in tools):
        raise ToolError(f"{param} names the function {name!r}, which is not among the tools", param)
    if name in ("auto", "none", "required"):
        raise ToolError(f"{param}: a function named {name!r} cannot be forced (the name is a keyword)", param)
    return name


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools (see the module docstring); None when it declares none."""
    tools_v, functions_v = body.get("tools"), body.get("functions")
    if tools_v is not None and functions_v is not None:
        raise ToolError("give tools or the legacy functions, not both", "functions")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise ToolError(f"parallel_tool_calls must be a boolean, got {parallel!r}", "parallel_tool_calls")
    if functions_v is not None:
        tools = _tools(functions_v, "functions", legacy=True)
        return ToolRequest(tools, _choice(body.get("function_call"), tools, "function_call", True), False)
    if body.get("function_call") is not None:
        raise ToolError("function_call needs functions", "function_call")
    if tools_v is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    tools = _tools(tools_v, "tools", legacy=False)
    return ToolRequest(tools, _choice(body.get("tool_choice"), tools, "tool_choice", False), parallel)


def tool_message(message: dict[str, Any], index: int, content: str | None) -> dict[str, Any]:
    """A ``tool`` message or an assistant message with ``tool_calls`` as chat templates take it."""
    param = f"messages[{index}]"
    if message.get("role") == "tool":
        call = message.get("tool_call_id")
        if not isinstance(call, str) or not call:
            raise ToolError(f"{param}.tool_call_id must be a non-empty string (the id of the call answered)",
                            f"{param}.tool_call_id")
        out: dict[str, Any] = {"role": "tool", "tool_call_id": call, "content": content or ""}
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        return _unicode(out, param)
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise ToolError(f"{param}.tool_calls must be a non-empty list", f"{param}.tool_calls")
    rendered = []
    for j, call in enumerate(calls):
        where = f"{param}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                            "\"arguments\"}}}}", where)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except (ValueError, RecursionError):
                raise ToolError(f"{where}.function.arguments is not valid JSON", where) from None
        rendered.append({"id": str(call.get("id") or ""), "type": "function",
                         "function": {"name": function["name"], "arguments": arguments}})
    return _unicode({"role": "assistant", "content": content, "tool_calls": rendered}, param)


def _unicode(message: dict[str, Any], param: str) -> dict[str, Any]:
    """``message``, or a ToolError when some text in it is not valid Unicode (a lone surrogate)."""
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        raise ToolError(f"{param} is not valid JSON of Unicode text", param) from None
    return message


# ---- the model's format -----------------------------------------------------------------------------


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
                         r"\[ARGS\]")


def _mistral_named(text: str) -> tuple[str | None, list[ToolCall]] | None:
    """``[TOOL_CALLS]name[ARGS]{json}`` calls, back to back (whitespace between them), after any content; None when
    ``text`` has none, or anything after the first one is not such a call."""
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


# ---- enforcing tool_choice ----------------------------------------------------------------------------

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


def tool_grammar(req: ToolRequest, family: Family) -> GrammarSpec | None:
    """The grammar forcing a call for tool_choice "required" / named; None for "auto" and "none"."""
    if req.choice in ("auto", "none"):
        return None
    tools = req.tools if req.choice == "required" else (req.tool(req.choice),)
    args_key = "parameters" if family == "llama3" else "arguments"
    schemas = [_call_schema(t, args_key) for t in tools]
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, **_hoisted_defs(schemas, args_key), "x-guidance": _COMPACT}
    body = f"body: %json {json.dumps(schema, ensure_ascii=False)}\n"
    many = req.parallel and req.choice == "required"
    if family == "hermes":
        call = f"call: {_lark_string('<tool_call>' + chr(10))} body {_lark_string(chr(10) + '</tool_call>')}\n"
        start = f"start: call ({_lark_string(chr(10))} call)*\n" if many else "start: call\n"
        return GrammarSpec("lark", start + call + body, "tool_choice")
    if family == "mistral_args":  # [TOOL_CALLS]name[ARGS]{...} per call: one rule per tool, its own schema
        alts = [f"c{i}" for i in range(len(tools))]
        rules = "".join(f"c{i}: {_lark_string('[TOOL_CALLS]' + t.name + '[ARGS]')} a{i}\n"
                        f"a{i}: %json {_args_schema(t)}\n" for i, t in enumerate(tools))
        return GrammarSpec("lark", f"start: call{'+' if many else ''}\ncall: {' | '.join(alts)}\n" + rules,
                           "tool_choice")
    if family == "mistral":
        start = 'start: "[TOOL_CALLS][" body (", " body)* "]"\n' if many else 'start: "[TOOL_CALLS][" body "]"\n'
        return GrammarSpec("lark", start + body, "tool_choice")
    return GrammarSpec("lark", "start: body\n" + body, "tool_choice")
