"""Streaming tool calls: a chat stream's text deltas split into content to emit now and tool calls at the end.

Contract: pure (plain strings, ``gateway.tools`` types). ``ToolStream(family)``: ``push(delta)`` returns the
content that is safe to emit now: content deltas flow until a possible tool-call start is seen; text that may be
the start of a marker (``gateway.tools.MARKERS``; for llama3 / mistral also a reply that begins with ``{`` /
``[``: ``BARE_STARTS``) is held back,
as ``StopStringFilter`` holds back a possible stop string; from a marker on, everything is buffered. ``finish()``
parses what was buffered (``parse_tool_calls``): (the remaining content to emit, the calls). Text that turns out
not to be a call is emitted as content then.
"""

from __future__ import annotations

from meshinfer.gateway.responses import partial_stop_length
from meshinfer.gateway.tools import BARE_STARTS, MARKERS, Family, ToolCall, parse_tool_calls


class ToolStream:
    """One choice's text deltas, split into content and tool calls (see the module docstring)."""

    def __init__(self, family: Family) -> None:
        self.family: Family = family
        self.markers = MARKERS[family]
        self.bare = BARE_STARTS.get(family)
        self._held = ""
        self._calling = False
        self._emitted_any = False

    def push(self, delta: str) -> str:
        if self._calling:
            self._held += delta
            return ""
        text = self._held + delta
        if self.bare and not self._emitted_any and text.lstrip().startswith(self.bare):
            self._calling, self._held = True, text
            return ""
        hits = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        if hits:
            start = min(hits)
            self._calling, self._held = True, text[start:]
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

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left to emit as content, and the tool calls, once the generation has ended."""
        held, self._held = self._held, ""
        if not self._calling:
            return held, []
        content, calls = parse_tool_calls(held, self.family)
        if not calls:
            return held, []
        return content or "", calls
