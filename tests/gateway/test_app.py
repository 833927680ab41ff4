"""The HTTP layer around a scripted fake ``Generator``: bodies, SSE streams, stop strings, usage, limits, errors.

Requests go through httpx's in-process ASGI transport (no sockets), except the disconnect test, which needs
a real HTTP connection to drop (uvicorn on a free port, stopped at the end).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from gateway_helpers import BOS, EOS, IM_END, FakeGenerator, chat_prompt, ids, sse_events

from meshinfer.client.routing import NoRouteError
from meshinfer.config import SamplingConfig
from meshinfer.gateway.app import create_app
from meshinfer.gateway.config import GatewayConfig
from meshinfer.gateway.serving import ApiServer

USER = [{"role": "user", "content": "hi"}]
PROMPT_IDS = ids(chat_prompt(USER))  # chat prompts are tokenised without special tokens


def call(gen: FakeGenerator, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]], **config: Any) -> Any:
    app = create_app(gen, "fake", GatewayConfig(**config))

    async def main() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await scenario(client)

    return asyncio.run(main())


def post(path: str, body: dict[str, Any], **kw: Any) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, json=body, **kw)

    return scenario


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": USER, "temperature": 0, **fields}


def test_chat_completion_body_usage_and_engine_arguments() -> None:
    gen = FakeGenerator([*ids("Hello world"), IM_END, *ids("never")])
    r = call(gen, post("/v1/chat/completions", chat(seed=3, top_p=0.5)))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "chat.completion" and doc["model"] == "fake"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert doc["choices"][0]["finish_reason"] == "stop"  # ended by the end-of-turn token
    assert doc["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": 12,
                            "total_tokens": len(PROMPT_IDS) + 12}
    (seen,) = gen.calls
    assert seen["ids"] == PROMPT_IDS
    assert seen["max_new_tokens"] == 256 - len(PROMPT_IDS)  # default 512 bounded by the context left
    assert seen["sampling"] == SamplingConfig(temperature=0.0, top_p=0.5, seed=3)
    assert seen["stop_token_ids"] == {EOS, IM_END}  # the model's eos and the template's end of turn


def test_completion_ends_at_eos_only_and_counts_length() -> None:
    gen = FakeGenerator([*ids("ab"), IM_END, *ids("cdef")])
    r = call(gen, post("/v1/completions", {"model": "fake", "prompt": "go", "max_tokens": 5}))
    doc = r.json()
    assert doc["object"] == "text_completion"
    assert doc["choices"][0] == {"index": 0, "text": "abcd", "logprobs": None, "finish_reason": "length"}
    assert doc["usage"]["prompt_tokens"] == 3  # BOS + "go": text prompts are tokenised as `generate` does
    assert doc["usage"]["completion_tokens"] == 5
    assert gen.calls[0]["ids"] == [BOS, *ids("go")] and gen.calls[0]["stop_token_ids"] == {EOS}


def test_ignore_eos_and_stop_token_ids_set_the_stop_set() -> None:
    gen = FakeGenerator([*ids("ab"), EOS, IM_END, *ids("cd")])
    doc = call(gen, post("/v1/chat/completions", chat(ignore_eos=True, max_tokens=6))).json()
    assert gen.calls[0]["stop_token_ids"] == set()  # neither eos nor end of turn: max_tokens tokens
    assert doc["usage"]["completion_tokens"] == 6 and doc["choices"][0]["finish_reason"] == "length"
    call(gen, post("/v1/chat/completions", chat(ignore_eos=True, stop_token_ids=[ord("c")], max_tokens=6)))
    assert gen.calls[1]["stop_token_ids"] == {ord("c")}
    call(gen, post("/v1/completions", {"model": "fake", "prompt": "go", "stop_token_ids": [IM_END, 7]}))
    assert gen.calls[2]["stop_token_ids"] == {EOS, IM_END, 7}
    gen.spec.vocab_size = 300  # type: ignore[attr-defined]
    r = call(gen, post("/v1/chat/completions", chat(logit_bias={"300": 5})))
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias" and len(gen.calls) == 3


def test_completion_with_token_ids_and_eos() -> None:
    gen = FakeGenerator([*ids("xy"), EOS, *ids("z")])
    doc = call(gen, post("/v1/completions", {"model": "fake", "prompt": [104, 105], "max_tokens": 10})).json()
    assert gen.calls[0]["ids"] == [104, 105]
    assert doc["choices"][0]["text"] == "xy" and doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["completion_tokens"] == 3  # the eos token was generated: it counts


def test_streaming_chat_framing_and_usage_chunk() -> None:
    gen = FakeGenerator([*ids("Hi there"), IM_END])
    r = call(gen, post("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True})))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert text == "Hi there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": len(PROMPT_IDS), "completion_tokens": 9, "total_tokens": len(PROMPT_IDS) + 9}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_streaming_completion_without_usage() -> None:
    gen = FakeGenerator(ids("abc"))
    r = call(gen, post("/v1/completions", {"model": "fake", "prompt": "p", "max_tokens": 3, "stream": True}))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_never_emitted_and_end_the_generation(stream: bool) -> None:
    script = ids("a S b STOP after")
    gen = FakeGenerator(script)
    r = call(gen, post("/v1/chat/completions", chat(stop=["STOP", "zzz"], stream=stream,
                                                    stream_options={"include_usage": True})))
    if stream:
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
        assert pieces == ["a", " ", "S ", "b", " "]  # the first "S" was held back until " " ruled "STOP" out
        text = "".join(pieces)
        finish, usage = chunks[-2]["choices"][0]["finish_reason"], chunks[-1]["usage"]
    else:
        doc = r.json()
        text, finish, usage = doc["choices"][0]["message"]["content"], doc["choices"][0]["finish_reason"], doc["usage"]
    assert text == "a S b "
    assert finish == "stop"
    assert usage["completion_tokens"] == len("a S b STOP")  # up to the token that completed the stop string
    assert gen.closed and gen.produced <= len("a S b STOP") + 1 < len(script)  # abandoned right away


def test_a_stop_string_that_never_appears_changes_nothing() -> None:
    gen = FakeGenerator(ids("a S b ST"))
    doc = call(gen, post("/v1/chat/completions", chat(stop="STOP", max_tokens=8))).json()
    assert doc["choices"][0]["message"]["content"] == "a S b ST"  # held-back text is flushed at the end
    assert doc["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": "other", "messages": USER}, 404, "model_not_found", "model"),
    (chat(presence_penalty=2.5), 400, None, "presence_penalty"),
    (chat(max_tokens=250), 400, "context_length_exceeded", "max_tokens"),
    (chat(messages=[{"role": "user", "content": "x" * 300}]), 400, "context_length_exceeded", "messages"),
    (chat(n=17), 400, None, "n"),
])
def test_request_errors_in_openai_format(body: dict[str, Any], status: int, code: str | None, param: str) -> None:
    gen = FakeGenerator(ids("x"))
    r = call(gen, post("/v1/chat/completions", body))
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == param
    assert not gen.calls  # nothing was generated


def test_bad_json_unknown_route_and_wrong_method() -> None:
    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.post("/v1/chat/completions", content=b"{nope"), await client.get("/v2/models"),
                await client.get("/v1/chat/completions")]

    bad, missing, method = call(FakeGenerator([]), scenario)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert method.status_code == 405 and "error" in method.json()


def test_api_key() -> None:
    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get("/v1/models"), await client.get("/v1/models", headers={"Authorization": "Bearer no"}),
                await client.get("/v1/models", headers={"Authorization": "Bearer k3y"}),
                await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer no"}),
                await client.get("/health")]

    none, wrong, right, chat_wrong, health = call(FakeGenerator(ids("x")), scenario, api_key="k3y")
    assert none.status_code == wrong.status_code == chat_wrong.status_code == 401
    assert none.json()["error"]["code"] == "invalid_api_key" and none.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and [m["id"] for m in right.json()["data"]] == ["fake"]
    assert health.status_code == 200  # health checks need no key


def test_models_routes() -> None:
    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get("/v1/models"), await client.get("/v1/models/fake"),
                await client.get("/v1/models/other")]

    models, one, other = call(FakeGenerator([]), scenario)
    assert models.json()["object"] == "list" and models.json()["data"][0]["id"] == "fake"
    assert one.json() == models.json()["data"][0]
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_swarm_errors_before_the_first_token_are_http_errors(stream: bool) -> None:
    gen = FakeGenerator(ids("x"), fail=NoRouteError("no online servers cover blocks 2:4 of model fake"))
    r = call(gen, post("/v1/chat/completions", chat(stream=stream)))
    assert r.status_code == 503  # even for a stream: the status line waits for the first token
    err = r.json()["error"]
    assert err["code"] == "no_route" and "blocks 2:4" in err["message"]


def test_an_unexpected_error_is_500() -> None:
    r = call(FakeGenerator(ids("x"), fail=RuntimeError("kaput")), post("/v1/completions", {"model": "fake",
                                                                                         "prompt": "p"}))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "kaput" in r.text


def test_an_error_mid_stream_is_an_error_event_then_done() -> None:
    gen = FakeGenerator(ids("abcdef"), fail=RuntimeError("server vanished"), fail_at=3)
    r = call(gen, post("/v1/completions", {"model": "fake", "prompt": "p", "stream": True}))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "server vanished" in json.loads(events[-2])["error"]["message"]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "abc"


def test_requests_beyond_the_waiting_limit_get_429() -> None:
    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=chat()))
        while not gen.calls:  # the first request holds the only slot
            await asyncio.sleep(0.01)
        second = await client.post("/v1/chat/completions", json=chat())
        gate.set()
        return await first, second

    gate = asyncio.Event()
    gen = FakeGenerator(ids("ok"), gate=gate)
    first, second = call(gen, scenario, max_concurrency=1, max_waiting=0)
    assert second.status_code == 429 and second.json()["error"]["type"] == "rate_limit_error"
    assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"] == "ok"


def test_chat_needs_a_chat_template() -> None:
    r = call(FakeGenerator(ids("x"), chat_template=None), post("/v1/chat/completions", chat()))
    assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]


@pytest.mark.parametrize(("health", "status"), [({"ok": True, "servers": 3}, 200), ({"ok": False}, 503)])
def test_health(health: dict[str, Any], status: int) -> None:
    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/health")

    r = call(FakeGenerator([], health=health), scenario)
    assert r.status_code == status
    assert r.json()["swarm"] == health and r.json()["model"] == "fake"
    assert r.json()["gateway"]["active"] == 0


def test_a_client_that_disconnects_abandons_its_generation() -> None:
    gen = FakeGenerator(ids("x" * 200), delay=0.01)
    app = create_app(gen, "fake")
    with ApiServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        body = {"model": "fake", "prompt": "p", "max_tokens": 200, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 5
        while not gen.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gen.closed and gen.produced < 200  # cancelled long before the end
        stats = app.state.gateway.stats
        deadline = time.monotonic() + 5
        while stats["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (stats["cancelled"], stats["completed"], stats["active"]) == (1, 0, 0)


def test_served_on_a_loop_of_another_thread() -> None:
    """``ApiServer(..., loop=...)`` serves on a loop that already runs elsewhere (the swarm client's, in
    production): requests are answered there, and ``stop()`` ends the server but not the loop."""
    from meshinfer.loopthread import LoopThread

    runner = LoopThread("test-gateway-loop").start()
    try:
        gen = FakeGenerator(ids("hello"))
        with ApiServer(create_app(gen, "fake"), loop=runner.loop) as server, \
                httpx.Client(base_url=server.url, timeout=10) as client:
            body = {"model": "fake", "prompt": "p", "max_tokens": 5, "stream": True}
            resp = client.post("/v1/completions", json=body)
            events = [json.loads(e) for e in sse_events(resp.text) if e != "[DONE]"]
            assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == "hello"
            assert client.get("/v1/models").status_code == 200
        assert server.server.should_exit
        assert runner.run(asyncio.sleep(0, result="alive"), timeout=5) == "alive"  # the loop still runs
    finally:
        runner.stop()
