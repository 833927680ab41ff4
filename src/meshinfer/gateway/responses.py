"""OpenAI response bodies, Server-Sent Events framing and stop-string handling.

Contract: pure and synchronous: plain strings and dicts in and out, no HTTP framework, no tokenizer, no
torch. ``StopStringFilter`` turns a stream of text deltas into the text to emit: a stop string is never
emitted (nor anything after it), and while streaming, text that could be the start of a stop string is
held back until it is known not to be one. ``sse`` frames one event as ``data: <json>\\n\\n``; ``SSE_DONE``
ends every stream. ``ResponseBuilder`` makes the bodies of one request, chat (``chat.completion`` /
``chat.completion.chunk``) or completion (``text_completion``), non-streaming and streaming (a first chunk
with the assistant role for chat, content chunks, a last chunk with ``finish_reason`` and, when asked, a
usage chunk with no choices; chat choices may carry ``tool_calls``: in the message, with ``content`` null
when there is no text, and streamed as ``tool_calls`` deltas), and the model list of ``/v1/models``.
Choices carry their ``index`` (``n`` of them: a stream interleaves their chunks). With ``logprobs`` asked for, each
body or chunk carries the ``TokenLogprob``s of the tokens it covers: chat as ``{"content": [{"token",
"logprob", "bytes", "top_logprobs"}]}``, completions as ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`` (offsets continue across the chunks of a stream); otherwise ``"logprobs": null``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

SSE_DONE = "data: [DONE]\n\n"
"""The last event of every stream, as the OpenAI API sends it."""

FinishReason = Literal["stop", "length", "tool_calls"]


def sse(data: dict[str, Any]) -> str:
    """One Server-Sent Event carrying ``data`` as compact JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of some stop string
    (the text that must be held back because the next delta might complete a stop string)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopStringFilter:
    """Emits text deltas minus stop strings: ``push`` returns what is safe to emit now, ``stopped`` turns
    True once a stop string appeared (the text before it has then been emitted, nothing after it ever is),
    ``flush`` returns the held-back text at the end of a generation that did not stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[:min(hits)]
        keep = partial_stop_length(text, self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


@dataclass(frozen=True)
class TokenLogprob:
    """One token as ``logprobs`` reports it: its text, natural-log probability and the most likely
    alternatives at its position (text, logprob), most likely first. An echoed prompt's first token has
    nothing before it to be scored by: ``logprob`` None."""

    text: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


def _chat_entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The ``logprobs`` of a chat choice (or chunk) covering ``entries``."""
    return {"content": [{**_chat_entry(e.text, e.logprob), "top_logprobs": [_chat_entry(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The ``logprobs`` of a completion choice (or chunk) covering ``entries``; the first starts at ``offset``."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) if e.logprob is not None else None for e in entries], "text_offset": offsets}


@dataclass(frozen=True)
class Choice:
    """One finished choice of a non-streaming answer."""

    text: str
    finish_reason: FinishReason
    logprobs: Sequence[TokenLogprob] = ()
    tool_calls: Sequence[dict[str, Any]] = ()
    """Chat: the calls the model made (``gateway.tools.ToolCall.as_dict``); then ``content`` is null when
    ``text`` is empty."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request (see ``meshinfer.gateway.generation`` for what is counted)."""

    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ResponseBuilder:
    """The response bodies of one request to ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions``."""

    def __init__(self, kind: Literal["chat", "completion"], model: str, *, include_usage: bool = False,
                 created: int | None = None, request_id: str | None = None, logprobs: bool = False) -> None:
        self.kind = kind
        self.logprobs = logprobs
        """Whether ``logprobs`` were asked for (then every choice carries them, else ``null``)."""
        self._offsets: dict[int, int] = {}  # completions: the text offset of each choice's next token
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.id = request_id or prefix + secrets.token_hex(12)

    def _base(self, streaming: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if streaming else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    # ---- non-streaming ---------------------------------------------------------------------------

    def _logprobs(self, entries: Sequence[TokenLogprob], index: int) -> dict[str, Any] | None:
        if not self.logprobs or not entries:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries)
        out = completion_logprobs(entries, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(e.text) for e in entries)
        return out

    def full(self, text: str, finish_reason: FinishReason, usage: Usage,
             logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        """The whole answer of a non-streaming request with one choice."""
        return self.full_choices([Choice(text, finish_reason, logprobs)], usage)

    def full_choices(self, choices: Sequence[Choice], usage: Usage) -> dict[str, Any]:
        """The whole answer of a non-streaming request: choice ``i`` is ``choices[i]``."""
        out = []
        for i, c in enumerate(choices):
            lp = self._logprobs(c.logprobs, i)
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                if c.tool_calls:
                    message = {"role": "assistant", "content": c.text or None, "tool_calls": list(c.tool_calls)}
                out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                out.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**self._base(False), "choices": out, "usage": usage.as_dict()}

    # ---- streaming -------------------------------------------------------------------------------

    def _chunk(self, delta: dict[str, Any] | str, finish_reason: FinishReason | None,
               logprobs: Sequence[TokenLogprob] = (), index: int = 0) -> dict[str, Any]:
        lp = self._logprobs(logprobs, index)
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": lp, "finish_reason": finish_reason}
        doc = {**self._base(True), "choices": [choice]}
        if self.include_usage:
            doc["usage"] = None  # as the OpenAI API does: every chunk but the last carries "usage": null
        return doc

    def first_chunk(self, index: int = 0) -> dict[str, Any] | None:
        """The chunk that opens a chat stream (the assistant role, empty content); None for completions."""
        return self._chunk({"role": "assistant", "content": ""}, None, index=index) if self.kind == "chat" else None

    def text_chunk(self, text: str, logprobs: Sequence[TokenLogprob] = (), index: int = 0) -> dict[str, Any]:
        return self._chunk({"content": text} if self.kind == "chat" else text, None, logprobs, index)

    def tool_delta_chunk(self, delta: dict[str, Any], index: int = 0) -> dict[str, Any]:
        """Chat: the chunk carrying one ``delta.tool_calls`` entry (a call's head or a fragment of its arguments)."""
        return self._chunk({"tool_calls": [delta]}, None, index=index)

    def tool_calls_chunk(self, calls: Sequence[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
        """Chat: the chunks streaming ``calls`` (each ``ToolCall.as_dict``): per call, one delta with its
        ``index``, ``id``, ``type`` and ``function.name`` (arguments ""), then one with the arguments, as
        OpenAI streams them (a client concatenates ``function.arguments`` per call index)."""
        out = []
        for k, call in enumerate(calls):
            head = {"index": k, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            out.append(self._chunk({"tool_calls": [head]}, None, index=index))
            args = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
            out.append(self._chunk({"tool_calls": [args]}, None, index=index))
        return out

    def finish_chunk(self, finish_reason: FinishReason, logprobs: Sequence[TokenLogprob] = (),
                     index: int = 0) -> dict[str, Any]:
        return self._chunk({} if self.kind == "chat" else "", finish_reason, logprobs, index)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The extra last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._base(True), "choices": [], "usage": usage.as_dict()}


def model_list(names: Sequence[str], created: int, owned_by: str = "meshinfer") -> dict[str, Any]:
    """The body of ``GET /v1/models``."""
    return {"object": "list", "data": [model_card(name, created, owned_by) for name in names]}


def model_card(name: str, created: int, owned_by: str = "meshinfer") -> dict[str, Any]:
    """The body of ``GET /v1/models/{name}`` (one entry of the list)."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}
