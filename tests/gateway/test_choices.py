"""``n`` choices per request through the HTTP layer, with the scripted fake ``Generator``: one generation per
choice (seeds ``seed + i``), whole answers, interleaved streams, errors and a client that goes away."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import httpx
from gateway_helpers import IM_END, FakeGenerator, ids, sse_events
from test_app import call, chat, post

from meshinfer.client.routing import NoRouteError
from meshinfer.gateway.app import create_app
from meshinfer.gateway.serving import ApiServer


def test_n_choices_whole_answer() -> None:
    gen = FakeGenerator([*ids("Hi"), IM_END])
    r = call(gen, post("/v1/chat/completions", chat(n=3, temperature=0.5, seed=5, logprobs=True)))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in doc["choices"]] == ["Hi"] * 3
    assert all(len(c["logprobs"]["content"]) == 3 for c in doc["choices"])
    assert sorted(call_["sampling"].seed for call_ in gen.calls) == [5, 6, 7]  # one generation per choice
    assert doc["usage"]["completion_tokens"] == 9  # summed over the choices; the prompt counted once
    assert gen.closed


def test_n_streamed_choices_interleave_and_each_finish() -> None:
    gen = FakeGenerator(ids("abc"), delay=0.005)
    body = {"model": "fake", "prompt": "p", "max_tokens": 3, "n": 2, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    chunks = [json.loads(e) for e in sse_events(call(gen, post("/v1/completions", body)).text)[:-1]]
    text: dict[int, str] = defaultdict(str)
    offsets: dict[int, list[int]] = defaultdict(list)
    finished: dict[int, str] = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        i = choice["index"]
        text[i] += choice["text"]
        if choice["logprobs"]:
            offsets[i] += choice["logprobs"]["text_offset"]
        if choice["finish_reason"]:
            finished[i] = choice["finish_reason"]
    assert dict(text) == {0: "abc", 1: "abc"}
    assert dict(offsets) == {0: [0, 1, 2], 1: [0, 1, 2]}  # each choice's offsets run on by themselves
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert len(gen.calls) == 2 and {c["sampling"].seed for c in gen.calls} == {None}  # unseeded: free draws


def test_n_choices_fail_together_before_the_first_token() -> None:
    gen = FakeGenerator(ids("x"), fail=NoRouteError("no online servers cover blocks 0:2 of model fake"))
    app = create_app(gen, "fake")
    for stream in (False, True):
        with ApiServer(app) as server:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(n=2, stream=stream), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_route"
    stats = app.state.gateway.stats
    assert (stats["failed"], stats["active"], stats["cancelled"]) == (2, 0, 0)


def test_a_client_that_disconnects_abandons_every_choice() -> None:
    gen = FakeGenerator(ids("x" * 200), delay=0.01)
    app = create_app(gen, "fake")
    with ApiServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        body: dict[str, Any] = {"model": "fake", "prompt": "p", "max_tokens": 200, "n": 2, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert next(line for line in resp.iter_lines() if line.startswith("data: "))
        stats = app.state.gateway.stats
        deadline = time.monotonic() + 5
        while stats["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (stats["cancelled"], stats["completed"], stats["active"]) == (2, 0, 0)
        assert gen.produced < 400  # both stopped long before the end
