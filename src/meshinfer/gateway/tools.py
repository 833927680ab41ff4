"""Tool (function) calling in chat completions: the request's ``tools`` / ``tool_choice`` / tool messages in,
and the types the tool modules share.

Contract: pure functions over plain JSON data and text: no HTTP framework, no tokenizer, no torch. Errors are
``ToolError(message, param)`` (the caller makes them 400s naming ``param``).

- ``parse_tools(body)``: ``tools`` (type "function" only; at most ``MAX_TOOLS``, each's JSON at most
  ``MAX_TOOL_BYTES``), ``tool_choice`` ("auto" default, "none", "required", or ``{"type": "function",
  "function": {"name"}}`` naming a given tool), ``parallel_tool_calls`` (default true). The legacy
  ``functions`` / ``function_call`` are mapped onto them (as OpenAI documents the equivalence).
- ``tool_message(message, i)``: a ``role: tool`` message (``tool_call_id``, text content) or an assistant
  message with ``tool_calls`` (``content`` may be null) in the Hugging Face chat-template convention
  (``{"type": "function", "function": {"name", "arguments": <dict>}}``).

The model's output format (``tool_family``, ``parse_tool_calls``) is ``gateway.tool_output``; the grammar
that enforces a forced call (``tool_grammar``) is ``gateway.tool_grammar``.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

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
KEPT_TOKENS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"), "llama3": ("<|python_tag|>",), "mistral": ("[TOOL_CALLS]",),
    "mistral_args": ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]")}
"""Per family, the tokens the reply's text must keep where the tokenizer has them as special tokens (which
decoding otherwise skips: Mistral's v11 ``[TOOL_CALLS]name[ARGS]{...}`` would read ``name{...}``)."""
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
