"""Fuzzing the gateway's HTTP bodies (hypothesis, ``fuzzing.budget``): random bytes, random JSON documents and
random values in every request field, against the app with a real HTTP client (httpx over ASGI, a scripted fake
``Generator``), and random bytes as raw request heads against a real uvicorn socket. Never a 500, never a crash;
the server keeps answering honest requests exactly."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
from gateway_helpers import FakeGenerator, ids
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from http_attacks import read_response
from meshinfer.gateway.app import create_app
from meshinfer.gateway.config import GatewayConfig
from meshinfer.gateway.serving import ApiServer

PATHS = ("/v1/completions", "/v1/chat/completions")
SEEN: dict[str, int] = {}
"""Inputs tried per surface in this run (reported by ``test_report_counts``)."""

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["fake", "user", "system", "text", "\ud800", "", "x" * 5000]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12) | st.sampled_from(["role", "content", "type",
                                                                                      "text"]), inner, max_size=5),
                           max_leaves=25)
FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "logit_bias",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "best_of", "suffix", "response_format",
          "tools", "user", "min_p", "ignore_eos", "stop_token_ids")
token_ids = st.lists(st.integers(min_value=-(2**70), max_value=2**70) | st.integers(0, 300), min_size=1, max_size=6)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                           "content": st.text(max_size=20) | json_values}), max_size=3)
bodies = st.fixed_dictionaries(
    {"model": st.just("fake") | json_values},
    optional={"prompt": st.text(max_size=40) | token_ids | json_values, "messages": messages | json_values,
              **{name: json_values for name in FIELDS if name not in ("model", "prompt", "messages")}},
)


def fake() -> FakeGenerator:
    gen = FakeGenerator(ids("Hello"))
    gen.spec.vocab_size = 0xD800  # type: ignore[attr-defined]  # the fake decodes id i as chr(i)
    return gen


def answers(path: str, raw: bytes, **config: Any) -> list[int]:
    """Status of POSTing ``raw`` to ``path``, then of an honest completion (its text checked)."""
    app = create_app(fake(), "fake", GatewayConfig(**config))

    async def main() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            r = await client.post(path, content=raw, headers={"content-type": "application/json"})
            if r.status_code == 200 and not r.headers["content-type"].startswith("text/event-stream"):
                r.json()
            ok = await client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "temperature": 0})
            assert ok.json()["choices"][0]["text"] == "Hello"
            return [r.status_code, ok.status_code]

    return asyncio.run(main())


def check(path: str, raw: bytes, surface: str) -> None:
    SEEN[surface] = SEEN.get(surface, 0) + 1
    status, honest = answers(path, raw)
    assert status < 500 and honest == 200, (status, raw[:200])


@budget(30)
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=300))
def test_random_bytes_bodies(path: str, raw: bytes) -> None:
    check(path, raw, "random bytes")


@budget(30)
@given(path=st.sampled_from(PATHS), doc=json_values)
def test_random_json_bodies(path: str, doc: Any) -> None:
    check(path, json.dumps(doc).encode(), "random JSON")


@budget(60)
@given(path=st.sampled_from(PATHS), body=bodies)
def test_random_field_values(path: str, body: dict[str, Any]) -> None:
    check(path, json.dumps(body).encode(), "random field values")  # NaN/Infinity literals and \\ud800 escapes


@budget(10)
@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["[", '{"a":']))
def test_deeply_nested_json(depth: int, kind: str) -> None:
    close = "]" if kind == "[" else "}"
    check("/v1/completions", (kind * depth + "1" + close * depth).encode(), "nested JSON")


@budget(15)
@given(head=st.binary(min_size=1, max_size=400))
def test_random_request_heads_on_a_real_socket(head: bytes) -> None:
    SEEN["raw request heads"] = SEEN.get("raw request heads", 0) + 1
    with socket.create_connection(("127.0.0.1", SERVER.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n")
        try:
            status, _ = read_response(sock, timeout=5)  # a 400, a 404, or the connection closes (or times out)
        except OSError:
            status = 0
    assert status < 500
    with httpx.Client(base_url=SERVER.url, timeout=10) as client:
        ok = client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "temperature": 0})
        assert ok.json()["choices"][0]["text"] == "Hello"


SERVER: Any = None
"""The real uvicorn server of the raw-socket test (started for this module only)."""


def setup_module() -> None:
    global SERVER
    config = GatewayConfig(header_timeout=2.0)
    SERVER = ApiServer(create_app(fake(), "fake", config), limits=config.limits).start()


def teardown_module() -> None:
    SERVER.stop()
    print("\nHTTP fuzz inputs tried:", json.dumps(SEEN))
