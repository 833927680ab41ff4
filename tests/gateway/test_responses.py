"""Stop strings, SSE framing and OpenAI response bodies (pure)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshinfer.gateway.responses import (
    SSE_DONE,
    ResponseBuilder,
    StopStringFilter,
    Usage,
    model_list,
    partial_stop_length,
    sse,
)


@pytest.mark.parametrize(("text", "stops", "want"), [
    ("hello", ["STOP"], 0),
    ("hello S", ["STOP"], 1),
    ("hello ST", ["STOP"], 2),
    ("hello STO", ["STOP"], 3),
    ("hello STOP", ["STOP"], 0),  # a whole stop string is a match, not a partial one
    ("ab", ["b", "bc"], 1),
    ("xab", ["abc", "bcd"], 2),
    ("", ["STOP"], 0),
    ("ST", ["STOP", "T"], 2),
])
def test_partial_stop_length(text: str, stops: list[str], want: int) -> None:
    assert partial_stop_length(text, stops) == want


@pytest.mark.parametrize(("deltas", "stops", "emitted", "stopped"), [
    (["Hello", " wor", "ld"], [], ["Hello", " wor", "ld"], False),
    (["Hello", " ST", "OP", " more"], ["STOP"], ["Hello", " ", "", ""], True),
    (["a S", " b"], ["STOP"], ["a ", "S b"], False),  # held back, then released
    (["x", "ST", "OPy"], ["STOP"], ["x", "", ""], True),
    (["ab", "c"], ["bc", "abx"], ["", "a"], True),  # the earliest match wins
    (["STOP"], ["STOP"], [""], True),
    (["<|end", "|>tail"], ["<|end|>"], ["", ""], True),
])
def test_stop_string_filter(deltas: list[str], stops: list[str], emitted: list[str], stopped: bool) -> None:
    f = StopStringFilter(stops)
    assert [f.push(d) for d in deltas] == emitted
    assert f.stopped is stopped
    tail = f.flush()
    assert tail == ("" if stopped else "".join(deltas)[len("".join(emitted)):])


@given(st.lists(st.text(alphabet="abS TOP", max_size=6), max_size=12),
       st.lists(st.text(alphabet="abS TOP", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_filter_emits_the_text_before_the_first_stop(deltas: list[str], stops: list[str]) -> None:
    f = StopStringFilter(stops)
    out = "".join(f.push(d) for d in deltas) + f.flush()
    text = "".join(deltas)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert out == (text[:min(hits)] if hits else text)
    assert f.stopped == bool(hits)


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        StopStringFilter(["a", ""])


def test_sse_framing() -> None:
    event = sse({"text": "héllo\nworld", "n": 1})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert event.count("\n") == 2  # newlines inside the payload are escaped by JSON
    assert json.loads(event[len("data: "):]) == {"text": "héllo\nworld", "n": 1}
    assert SSE_DONE == "data: [DONE]\n\n"


def test_chat_bodies() -> None:
    b = ResponseBuilder("chat", "tiny", include_usage=True, created=123, request_id="chatcmpl-x")
    usage = Usage(5, 3)
    full = b.full("hi", "stop", usage)
    assert full == {"id": "chatcmpl-x", "object": "chat.completion", "created": 123, "model": "tiny",
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    first, text, last = b.first_chunk(), b.text_chunk("h"), b.finish_chunk("length")
    assert first is not None and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["choices"][0]["delta"] == {"content": "h"} and text["object"] == "chat.completion.chunk"
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(chunk["usage"] is None for chunk in (first, text, last))
    assert b.usage_chunk(usage) == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 123,
                                    "model": "tiny", "system_fingerprint": None, "choices": [],
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_completion_bodies() -> None:
    b = ResponseBuilder("completion", "tiny", created=1)
    assert b.id.startswith("cmpl-") and b.first_chunk() is None
    assert b.full("xy", "length", Usage(1, 2))["choices"] == [
        {"index": 0, "text": "xy", "logprobs": None, "finish_reason": "length"}]
    chunk = b.text_chunk("x")
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "x"
    assert "usage" not in chunk  # only streams with include_usage carry "usage": null
    assert b.finish_chunk("stop")["choices"][0]["finish_reason"] == "stop"


def test_ids_are_unique_per_request() -> None:
    assert ResponseBuilder("chat", "m").id != ResponseBuilder("chat", "m").id


def test_model_list() -> None:
    assert model_list(["tiny"], 5) == {"object": "list", "data": [
        {"id": "tiny", "object": "model", "created": 5, "owned_by": "meshinfer"}]}
