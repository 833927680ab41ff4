"""The gateway in front of a real 3-server swarm over raw HTTP (httpx): SSE framing, health, 16 concurrent
streams, and a client that disconnects mid-stream (its session is closed and the servers free its memory)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest
from gateway_helpers import CACHE_TOKENS, MODEL_NAME, SPANS, Served, local_chat, sse_events

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.1)


def test_sse_framing(served: Served) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
            "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=served.server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
        plain = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4,
                                                    "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.text.endswith("\n\ndata: [DONE]\n\n")
    events = sse_events(r.text)  # every event is exactly "data: <payload>\n\n"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])  # "usage": null on every other chunk
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    plain_chunks = [json.loads(e) for e in sse_events(plain.text)[:-1]]
    assert all("usage" not in c and c["object"] == "text_completion" for c in plain_chunks)


def test_health_reports_the_swarm(served: Served) -> None:
    r = httpx.get(f"{served.server.url}/health", timeout=30)
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ok" and doc["model"] == MODEL_NAME
    assert doc["swarm"]["route"] == [f"{a}:{b}" for a, b in SPANS]
    assert doc["swarm"]["servers"] == len(SPANS) and doc["swarm"]["model_id"] == served.swarm.model_id


def test_16_concurrent_streams_are_all_correct(served: Served) -> None:
    questions = [f"Tell me about lantern number {i} on the {w} shore." for i, w in
                 enumerate(["north", "south", "east", "west"] * 4)]
    messages = [[{"role": "user", "content": q}] for q in questions]

    async def one(http: httpx.AsyncClient, msgs: list[dict[str, str]]) -> tuple[str, str, int]:
        body = {"model": MODEL_NAME, "messages": msgs, "temperature": 0, "max_tokens": 12, "stream": True,
                "stream_options": {"include_usage": True}}
        text, finish, tokens = "", "", -1
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return text, finish, tokens

    async def main() -> list[tuple[str, str, int]]:
        async with httpx.AsyncClient(base_url=served.server.url, timeout=120) as http:
            return await asyncio.gather(*(one(http, m) for m in messages))

    got = asyncio.run(main())
    want = [local_chat(served.local, m, 12) for m in messages]
    assert got == [(text, finish, len(reply)) for text, _, reply, finish in want]
    assert len({text for text, _, _ in got}) > 1  # different prompts, different answers


def test_a_client_disconnecting_mid_stream_frees_the_servers_memory(served: Served) -> None:
    wait_for(lambda: set(served.cache_left().values()) == {CACHE_TOKENS}, 20, "every server's cache to be free")
    stats = served.app.state.gateway.stats
    cancelled = stats["cancelled"]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # the session holds prompt + 480 tokens of KV cache on every server while it runs
        wait_for(lambda: all(v < CACHE_TOKENS for v in served.cache_left().values()), 20,
                 "the servers to announce the open session")
    # the connection is closed here, long before 480 tokens are generated
    wait_for(lambda: stats["cancelled"] == cancelled + 1, 10, "the gateway to abandon the generation")
    wait_for(lambda: set(served.cache_left().values()) == {CACHE_TOKENS}, 20, "the servers to free the session")
    assert stats["active"] == 0
