"""``logprobs`` through the HTTP layer, with the scripted fake ``Generator`` (its token ``t`` scores ``-t/100``,
its alternatives are ``t, t+1, ...``; see ``gateway_helpers.fake_scored``): chat and completions, whole and
streamed, and the pure helpers that turn scores into OpenAI's two formats."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gateway_helpers import IM_END, FakeGenerator, ids, sse_events
from test_app import call, chat, post

from meshinfer.gateway.generation import token_text
from meshinfer.gateway.responses import TokenLogprob, chat_logprobs, completion_logprobs


def _chunks(text: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in sse_events(text)[:-1]]


def test_chat_logprobs_whole_answer() -> None:
    gen = FakeGenerator([*ids("Hi you"), IM_END, *ids("never")])
    doc = call(gen, post("/v1/chat/completions", chat(logprobs=True, top_logprobs=2))).json()
    assert gen.calls[0]["top_logprobs"] == 2
    choice = doc["choices"][0]
    assert choice["message"]["content"] == "Hi you"
    content = choice["logprobs"]["content"]
    assert len(content) == doc["usage"]["completion_tokens"] == 7  # every counted token, the end of turn too
    assert [e["token"] for e in content] == [*"Hi you", ""]  # a special token shows as no text
    assert [e["logprob"] for e in content] == pytest.approx([-t / 100 for t in [*ids("Hi you"), IM_END]])
    assert content[0]["bytes"] == [ord("H")] and content[-1]["bytes"] == []
    h = ord("H")
    assert content[0]["top_logprobs"] == [{"token": "H", "logprob": pytest.approx(-h / 100), "bytes": [h]},
                                          {"token": "I", "logprob": pytest.approx(-h / 100 - 1), "bytes": [h + 1]}]
    assert choice["logprobs"]["refusal"] is None


def test_chat_logprobs_without_alternatives_and_not_asked_for() -> None:
    gen = FakeGenerator([*ids("ok"), IM_END])
    doc = call(gen, post("/v1/chat/completions", chat(logprobs=True))).json()
    assert [e["top_logprobs"] for e in doc["choices"][0]["logprobs"]["content"]] == [[], [], []]
    gen = FakeGenerator([*ids("ok"), IM_END])
    doc = call(gen, post("/v1/chat/completions", chat())).json()
    assert doc["choices"][0]["logprobs"] is None and gen.calls[0]["top_logprobs"] is None


def test_streamed_chat_logprobs_go_with_their_text() -> None:
    gen = FakeGenerator([*ids("Hello"), IM_END])
    r = call(gen, post("/v1/chat/completions", chat(logprobs=True, top_logprobs=1, stream=True)))
    chunks = _chunks(r.text)
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk covers no token
    entries = []
    for c in chunks[1:]:
        lp = c["choices"][0]["logprobs"]
        got = lp["content"] if lp is not None else []
        assert "".join(e["token"] for e in got) == c["choices"][0]["delta"].get("content", "")
        entries += got
    assert [e["token"] for e in entries] == [*"Hello", ""]
    assert [e["logprob"] for e in entries] == pytest.approx([-t / 100 for t in [*ids("Hello"), IM_END]])


def test_streamed_chat_logprobs_with_a_stop_string_cover_every_counted_token() -> None:
    gen = FakeGenerator(ids("one. two"))
    r = call(gen, post("/v1/chat/completions", chat(logprobs=True, stop=[". t"], stream=True,
                                                       stream_options={"include_usage": True})))
    chunks = _chunks(r.text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    entries = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    assert text == "one"
    assert [e["token"] for e in entries] == list("one. t")  # the token that completed the stop string counts
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"]


def test_completion_logprobs_whole_and_streamed() -> None:
    body = {"model": "fake", "prompt": "go", "max_tokens": 4, "logprobs": 1}
    doc = call(FakeGenerator(ids("abcdef")), post("/v1/completions", body)).json()
    lp = doc["choices"][0]["logprobs"]
    assert doc["choices"][0]["text"] == "abcd"
    assert lp["tokens"] == list("abcd") and lp["text_offset"] == [0, 1, 2, 3]
    assert lp["token_logprobs"] == pytest.approx([-t / 100 for t in ids("abcd")])
    assert lp["top_logprobs"] == [{c: pytest.approx(-ord(c) / 100)} for c in "abcd"]
    r = call(FakeGenerator(ids("abcdef")), post("/v1/completions", {**body, "stream": True}))
    streamed = [c["choices"][0]["logprobs"] for c in _chunks(r.text) if c["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]
    assert [o for s in streamed for o in s["text_offset"]] == lp["text_offset"]  # offsets run on across chunks
    doc = call(FakeGenerator(ids("ab")), post("/v1/completions", {**body, "logprobs": None})).json()
    assert doc["choices"][0]["logprobs"] is None


def test_echo_answers_the_prompt_with_its_scores_then_the_completion() -> None:
    gen = FakeGenerator(ids("xyz"))
    body = {"model": "fake", "prompt": "ab", "max_tokens": 2, "echo": True, "logprobs": 1}
    doc = call(gen, post("/v1/completions", body)).json()
    choice = doc["choices"][0]
    assert choice["text"] == "abxy"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["", "a", "b", "x", "y"]  # BOS (a special token: no text), the prompt, the answer
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing to score BOS by
    assert lp["token_logprobs"][1:] == pytest.approx([-t / 100 for t in ids("abxy")])
    assert lp["text_offset"] == [0, 0, 1, 2, 3]
    assert gen.scored == [gen.calls[0]["ids"]]  # the prompt was scored as sent to the model
    assert doc["usage"]["completion_tokens"] == 2
    # evaluation harnesses score a text with max_tokens 0: no generation at all
    doc = call(FakeGenerator(ids("xyz")), post("/v1/completions", {**body, "max_tokens": 0})).json()
    assert doc["choices"][0]["text"] == "ab" and doc["usage"]["completion_tokens"] == 0
    assert doc["choices"][0]["logprobs"]["tokens"] == ["", "a", "b"]
    # echo without logprobs: the prompt text only, nothing scored
    gen = FakeGenerator(ids("xyz"))
    doc = call(gen, post("/v1/completions", {**body, "logprobs": None})).json()
    assert doc["choices"][0]["text"] == "abxy" and doc["choices"][0]["logprobs"] is None and gen.scored == []


def test_streamed_echo_sends_the_prompt_first() -> None:
    body = {"model": "fake", "prompt": [97, 98], "max_tokens": 2, "echo": True, "logprobs": 0, "stream": True}
    chunks = _chunks(call(FakeGenerator(ids("xyz")), post("/v1/completions", body)).text)
    first = chunks[0]["choices"][0]
    assert first["text"] == "ab" and first["logprobs"]["tokens"] == ["a", "b"]
    assert first["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abxy"
    offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2, 3]


def test_max_tokens_0_needs_echo() -> None:
    r = call(FakeGenerator(ids("a")), post("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 0}))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens" and "echo" in error["message"]


def test_bad_logprobs_requests_are_400() -> None:
    r = call(FakeGenerator(ids("a")), post("/v1/chat/completions", chat(logprobs=True, top_logprobs=50)))
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = call(FakeGenerator(ids("a")), post("/v1/completions", {"model": "fake", "prompt": "x", "logprobs": -1}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_logprob_formats() -> None:
    entries = [TokenLogprob("é", -0.5, (("é", -0.5), ("e", -1.5))), TokenLogprob(" x", -2.0)]
    assert chat_logprobs(entries) == {"content": [
        {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9],
         "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]},
                          {"token": "e", "logprob": -1.5, "bytes": [0x65]}]},
        {"token": " x", "logprob": -2.0, "bytes": [0x20, 0x78], "top_logprobs": []}], "refusal": None}
    assert completion_logprobs(entries, offset=10) == {
        "tokens": ["é", " x"], "token_logprobs": [-0.5, -2.0], "top_logprobs": [{"é": -0.5, "e": -1.5}, {}],
        "text_offset": [10, 11]}


def test_token_text_keeps_what_a_lone_decode_drops() -> None:
    # a sentencepiece-like decoder: a word-start marker becomes a space, except at the start of the text
    vocab = {1: "\u2581the", 2: "\u2581cat", 3: "s"}

    def decode(token_ids: list[int]) -> str:
        return "".join(vocab[i] for i in token_ids).replace("\u2581", " ").lstrip(" ")

    assert decode([2]) == "cat"
    assert token_text(decode, [1], 2) == " cat"  # after "the", the space shows
    assert token_text(decode, [1, 2], 3) == "s"
    assert token_text(decode, [], 2) == "cat"
