"""Streaming tool calls: a chat stream's text deltas split into content to emit now, tool-call deltas to emit as the
calls are generated, and what is left at the end.

Contract: pure (plain strings, ``gateway.tools`` types). ``ToolStream(family, max_calls)``: ``push(delta)`` returns
the content that is safe to emit now: content deltas flow until a possible tool-call start is seen; text that may be
the start of a marker (``gateway.tools.MARKERS``; for llama3 / mistral also a reply that begins with ``{`` / ``[``:
``BARE_STARTS``) is held back, as ``StopStringFilter`` holds back a possible stop string; from a marker on,
everything is buffered. For the formats that name the call before its arguments object (``HEADS``: Hermes
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, Llama 3.1's ``{"name": ..., "parameters": {...}}``,
Mistral's ``[TOOL_CALLS]name[ARGS]{...}``; name first, as the models and the forced-call grammar write them) the calls
are also streamed as they are generated:
``deltas()`` returns, once a call's name is known, its first OpenAI delta (``index``, ``id``, ``type``,
``function.name``, ``arguments`` "") and then, as its arguments object grows, fragments of its text (never past the
object's closing brace); a client concatenating ``function.arguments`` per index gets the model's JSON text. A call
not in that shape (arguments first, or not an object) stops the streaming: it and the later ones go whole at the end.
``finish()`` parses what was buffered (``parse_tool_calls``): (the remaining content to emit, the calls not streamed
yet, how many calls were streamed). Text that turns out not to be a call is emitted as content then, unless a
call was streamed already from it (the deltas are out: the stream ends as a tool-call answer). At most
``max_calls`` calls are streamed or returned (None: no bound; ``parallel_tool_calls: false`` is 1). Mistral's older
``[TOOL_CALLS][{...}, ...]`` list sends each call whole at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from meshinfer.gateway.responses import partial_stop_length
from meshinfer.gateway.tool_output import parse_tool_calls
from meshinfer.gateway.tools import BARE_STARTS, MARKERS, Family, ToolCall, call_id

_NAME = r'"([A-Za-z0-9_.\-]{1,64})"'
HEADS: dict[str, tuple[str, re.Pattern[str]]] = {
    "hermes": ("<tool_call>", re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*\{')),
    "llama3": ("{", re.compile(r'\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"parameters"\s*:\s*\{')),
    "mistral_args": ("[TOOL_CALLS]", re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]{1,64})\s*"
                                                r"(?:\[CALL_ID\]\s*[A-Za-z0-9]{1,64}\s*)?(?:\[ARGS\])?\s*\{")),
}
"""Per family whose calls stream as generated: where a call starts, and its head: the name known and the arguments
object begun (its ``{`` is the match's last char)."""
HEAD_WINDOW = 160
"""Characters after ``<tool_call>`` within which a streamable head must have appeared."""


@dataclass
class _Streamed:
    """One call being streamed: where its arguments' text starts in the buffer and how far it was sent."""

    index: int
    start: int
    sent: int
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False


class ToolStream:
    """One choice's text deltas, split into content and tool calls (see the module docstring)."""

    def __init__(self, family: Family, max_calls: int | None = None) -> None:
        self.family: Family = family
        self.markers = MARKERS[family]
        self.bare = BARE_STARTS.get(family)
        self.max_calls = max_calls
        self._held = ""
        self._calling = False
        self._emitted_any = False
        self._streamed: list[_Streamed] = []
        self._deltas: list[dict[str, Any]] = []
        self._search = 0  # where the next call may start in the buffer
        self._gave_up = False  # a call not in the streamable shape: no more streaming

    def push(self, delta: str) -> str:
        if self._calling:
            self._held += delta
            self._advance()
            return ""
        text = self._held + delta
        if self.bare and not self._emitted_any and text.lstrip().startswith(self.bare):
            self._calling, self._held = True, text
            return ""
        hits = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        if hits:
            start = min(hits)
            self._calling, self._held = True, text[start:]
            self._advance()
            return self._emit(text[:start])
        keep = partial_stop_length(text, self.markers)
        if self.bare and not self._emitted_any and not text.strip():
            keep = len(text)  # leading whitespace: a bare JSON call may still follow
        self._held = text[len(text) - keep:] if keep else ""
        return self._emit(text[:len(text) - keep])

    def _emit(self, text: str) -> str:
        if text:
            self._emitted_any = True
        return text

    def deltas(self) -> list[dict[str, Any]]:
        """The tool-call deltas ready to send (each one ``delta.tool_calls`` entry), in order; taken once."""
        out, self._deltas = self._deltas, []
        return out

    def _advance(self) -> None:
        """Stream what the buffer now shows of the calls (see the module docstring)."""
        head = HEADS.get(self.family)
        if head is None:
            return
        opener, pattern = head
        while True:
            if self._streamed and not self._streamed[-1].done:
                current = self._streamed[-1]
                self._scan(current)
                if not current.done:
                    return
                self._search = current.sent
            if self.max_calls is not None and len(self._streamed) >= self.max_calls:
                return
            if self._gave_up:
                return
            start = self._held.find(opener, self._search)
            if start < 0:
                return
            match = pattern.match(self._held, start)
            if match is None:  # not yet, or not name-first: then the rest goes whole at the end (indices stay in order)
                tail = self._held[start:]
                self._gave_up = len(tail) > HEAD_WINDOW or (opener == "<tool_call>" and "</tool_call>" in tail)
                return
            index = len(self._streamed)
            self._deltas.append({"index": index, "id": call_id(), "type": "function",
                                 "function": {"name": match.group(1), "arguments": ""}})
            self._streamed.append(_Streamed(index, match.end() - 1, match.end() - 1))

    def _scan(self, call: _Streamed) -> None:
        """Send ``call``'s arguments text up to the buffer's end, or to its object's closing brace."""
        text = self._held
        pos = call.sent
        while pos < len(text) and not call.done:
            ch = text[pos]
            if call.in_string:
                if call.escaped:
                    call.escaped = False
                elif ch == "\\":
                    call.escaped = True
                elif ch == '"':
                    call.in_string = False
            elif ch == '"':
                call.in_string = True
            elif ch in "{[":
                call.depth += 1
            elif ch in "}]":
                call.depth -= 1
                call.done = call.depth == 0
            pos += 1
        if pos > call.sent:
            self._deltas.append({"index": call.index, "function": {"arguments": text[call.sent:pos]}})
            call.sent = pos

    def finish(self) -> tuple[str, list[ToolCall], int]:
        """What is left to emit as content, the tool calls not streamed yet, and how many calls were streamed
        (their indices come first), once the generation has ended; the last fragments streamed calls have are in
        ``deltas()``."""
        held, self._held = self._held, ""
        streamed = len(self._streamed)
        if not self._calling:
            return held, [], 0
        content, calls = parse_tool_calls(held, self.family)
        if not calls:
            return ("", [], streamed) if streamed else (held, [], 0)
        rest = calls[streamed:]
        if self.max_calls is not None:
            rest = rest[:max(0, self.max_calls - streamed)]
        return content or "", rest, streamed
