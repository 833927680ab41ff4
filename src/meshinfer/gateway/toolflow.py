"""A chat request's tools through the gateway: what the template gets, which grammar constrains the reply, and
how the reply's text becomes ``tool_calls`` (whole answers and streams).

Contract: ``ToolFlow(req, family, specials)`` (``family``: the tool-call format of the model's chat template,
``gateway.tool_output.tool_family``; None: the template never uses tools; ``specials``: which of its markers the
tokenizer has as special tokens, by id: ``special_markers(tokenizer, family)``) holds one request's tool handling:
``template_kwargs()`` is what ``apply_chat_template`` gets (``tools=`` when the request has tools and the template
uses them, "none" included: rendered, never parsed, as vLLM); a template that never uses tools is a 400
``unsupported_parameter`` naming ``tools`` unless ``tool_choice`` is "none" (then they are dropped). ``parsing``
is the family whose calls are parsed out of the reply (None without tools, with "none" or with no family);
``kept_tokens`` are the special tokens (id -> text) the reply's text must keep for that parsing (``specials``);
``grammar(default)`` is the grammar for "required" / a named tool (``gateway.tool_grammar.tool_grammar``), else
``default`` (the request's ``response_format``). ``finish_choice`` parses a whole answer (``finish_reason``
"tool_calls" when it has calls; only the first without ``parallel_tool_calls``); ``streams(n)`` gives one
``ToolStream`` per choice (or None each; at most one call without ``parallel_tool_calls``), ``stream_deltas`` the
chunks of the calls streamed as they are generated (name first, then argument fragments), and ``stream_end`` turns a
finished stream's buffer into the last fragments, the rest of the content, the calls not streamed (indices after the
streamed ones) and the finish reason ("tool_calls" when any call was made, unless cut by max_tokens). Knows nothing
of HTTP or generation (the tokenizer only through ``models.detokenize``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshinfer.gateway.requests import GenerationRequest, bad
from meshinfer.gateway.responses import Choice, FinishReason, ResponseBuilder
from meshinfer.gateway.tool_grammar import tool_grammar
from meshinfer.gateway.tool_output import parse_tool_calls
from meshinfer.gateway.tools import KEPT_TOKENS, Family
from meshinfer.gateway.toolstream import ToolStream
from meshinfer.models.detokenize import special_token_ids
from meshinfer.models.grammar import GrammarSpec


def special_markers(tokenizer: Any, family: Family | None) -> dict[str, int]:
    """The markers of ``family`` (``gateway.tools.KEPT_TOKENS``) that ``tokenizer`` has as special tokens, with their
    ids (Mistral's ``[TOOL_CALLS]`` / ``[ARGS]``): the forced grammar names those tokens."""
    if family is None:
        return {}
    return {text: i for i, text in special_token_ids(tokenizer, KEPT_TOKENS[family]).items()}


@dataclass(frozen=True)
class ToolFlow:
    """One request's tools (see the module docstring)."""

    req: GenerationRequest
    family: Family | None
    """The template's tool-call format (None: it takes no tools)."""
    specials: Mapping[str, int] = field(default_factory=dict[str, int])
    """The family's markers that the tokenizer has as special tokens, with their ids (for the forced grammar)."""

    @property
    def parsing(self) -> Family | None:
        """The format calls are parsed in (None: no call is parsed)."""
        tools = self.req.tools
        return self.family if tools is not None and tools.choice != "none" else None

    @property
    def kept_tokens(self) -> dict[int, str]:
        """The special tokens (id -> text) the reply's text keeps for the parser: the family's markers that are
        special tokens (``specials``); none when no call is parsed."""
        return {i: text for text, i in self.specials.items()} if self.parsing is not None else {}

    @property
    def parallel(self) -> bool:
        return self.req.tools is None or self.req.tools.parallel

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's extra arguments (400 when the template cannot take the request's tools)."""
        tools = self.req.tools
        if tools is None:
            return {}
        if self.family is None:
            if tools.choice != "none":
                raise bad("this model's chat template does not support tools (it never uses them): call without "
                          "tools, or with tool_choice 'none'", param="tools", code="unsupported_parameter")
            return {}
        return {"tools": [t.template_dict() for t in tools.tools]}

    def grammar(self, default: GrammarSpec | None) -> GrammarSpec | None:
        """The reply's grammar: the tool call's for "required" / a named tool, else ``default``."""
        family = self.parsing
        if family is not None and self.req.tools is not None:
            return tool_grammar(self.req.tools, family, self.specials) or default
        return default

    def finish_choice(self, choice: Choice) -> Choice:
        """``choice`` with the tool calls in its text parsed out (when tools are on)."""
        family = self.parsing
        if family is None:
            return choice
        content, calls = parse_tool_calls(choice.text, family)
        if not calls:
            return choice
        if not self.parallel:
            calls = calls[:1]
        return Choice(content or "", "tool_calls", choice.logprobs, [c.as_dict() for c in calls])

    def streams(self, n: int) -> list[ToolStream | None]:
        """One ``ToolStream`` per choice of a stream (None each when no call is parsed)."""
        family = self.parsing
        limit = None if self.parallel else 1
        return [ToolStream(family, limit) if family is not None else None for _ in range(n)]

    @staticmethod
    def stream_deltas(stream: ToolStream, builder: ResponseBuilder, index: int) -> list[dict[str, Any]]:
        """The chunks of the tool-call deltas ``stream`` has ready for choice ``index`` (calls streamed as they are
        generated: Hermes)."""
        return [builder.tool_delta_chunk(delta, index) for delta in stream.deltas()]

    def stream_end(self, stream: ToolStream, builder: ResponseBuilder, index: int,
                   reason: FinishReason) -> tuple[list[dict[str, Any]], FinishReason]:
        """The chunks that end choice ``index``'s tool handling (streamed calls' last fragments, rest of the
        content, then the calls not streamed) and its finish reason ("tool_calls" when it made any, unless cut
        by max_tokens: "length")."""
        rest, calls, streamed = stream.finish()
        chunks = self.stream_deltas(stream, builder, index)
        chunks += [builder.text_chunk(rest, (), index)] if rest else []
        for k, call in enumerate(calls, start=streamed):  # after the streamed ones: their indices go on
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            chunks.append(builder.tool_delta_chunk(head, index))
            chunks.append(builder.tool_delta_chunk({"index": k, "function": {"arguments": call.arguments}}, index))
        made = bool(calls) or streamed > 0
        return chunks, "tool_calls" if made and reason != "length" else reason
