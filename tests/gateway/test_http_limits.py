"""The gateway's HTTP limits over real sockets (uvicorn on a free port, a scripted fake ``Generator``): body size
(413 before reading, by Content-Length or as a chunked body streams), body and header timeouts (408, slowloris
sockets closed in bounded time), header size, the prompt's character bound before tokenising, token ids beyond
the vocabulary, and the key on ``/metrics``; honest requests on the same server keep their exact answers."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
from gateway_helpers import FakeGenerator, FakeTokenizer, ids

from http_attacks import Slowloris, post_head, post_json, read_response, timed_get
from meshinfer.errors import ConfigError
from meshinfer.gateway.app import create_app
from meshinfer.gateway.config import GatewayConfig, HttpLimits, exposure_warning
from meshinfer.gateway.serving import ApiServer

LIMITS = {"max_body_bytes": 64 * 1024, "header_timeout": 1.0, "body_timeout": 1.0, "max_header_bytes": 4096}


class CountingTokenizer(FakeTokenizer):
    calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        CountingTokenizer.calls += 1
        return super().__call__(text, add_special_tokens)


def serve(gen: FakeGenerator | None = None, **config: Any) -> tuple[ApiServer, FakeGenerator]:
    gen = gen or FakeGenerator(ids("Hello"))
    cfg = GatewayConfig(**{**LIMITS, **config})
    return ApiServer(create_app(gen, "fake", cfg), limits=cfg.limits).start(), gen


def honest(url: str) -> None:
    """A plain completion on the same server still gives the exact scripted answer."""
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "hi", "temperature": 0}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello", r.text


def test_a_body_over_the_cap_is_refused_before_it_is_read() -> None:
    server, gen = serve()
    try:
        start = time.perf_counter()
        with post_head(server.url, "/v1/completions", {"Content-Length": str(10 * 1024 * 1024)}) as sock:
            status, raw = read_response(sock)  # not a byte of the body was sent
        assert status == 413 and time.perf_counter() - start < 2
        err = json.loads(raw)["error"]
        assert err["code"] == "request_too_large" and "limit --max-body-bytes 65536" in err["message"]
        chunk = b"a" * 16384  # a chunked body that would never end: refused once past the cap
        with post_head(server.url, "/v1/completions", {"Transfer-Encoding": "chunked"}) as sock:
            try:
                for _ in range(20):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass
            status, raw = read_response(sock)
        assert status == 413 and "is over 65536 bytes" in json.loads(raw)["error"]["message"]
        assert gen.calls == []
        honest(server.url)
    finally:
        server.stop()


def test_a_body_that_never_completes_gets_408_and_the_server_stays_responsive() -> None:
    server, _ = serve()
    try:
        start = time.perf_counter()
        with post_head(server.url, "/v1/completions", {"Content-Length": "1000"}, b'{"model": ') as sock:
            assert timed_get(server.url, "/v1/models")[0] == 200
            status, raw = read_response(sock)
        assert status == 408 and 0.9 < time.perf_counter() - start < 5
        assert "limit --body-timeout 1" in json.loads(raw)["error"]["message"]
        honest(server.url)
    finally:
        server.stop()


def test_slowloris_sockets_are_closed_within_the_header_timeout() -> None:
    server, _ = serve()
    try:
        attack = Slowloris(server.url, count=20)
        socks = attack.open()
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]  # connect, send nothing
        try:
            status, took = timed_get(server.url, "/v1/models")
            assert status == 200 and took < 1
            closed = Slowloris.closed_after(socks + silent, limit=6)
        finally:
            for sock in socks + silent:
                sock.close()
        assert all(c is not None and 0.8 < c < 3 for c in closed), closed
        honest(server.url)
        with httpx.Client(base_url=server.url, timeout=5) as client:  # keep-alive still serves request after request
            for _ in range(3):
                assert client.get("/v1/models").status_code == 200
                time.sleep(0.5)
    finally:
        server.stop()


def test_a_request_head_growing_past_the_cap_is_a_400() -> None:
    server, _ = serve()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(10):  # 10 KB of one header line, never finished, past the 4 KB cap
                time.sleep(0.02)
                try:
                    sock.sendall(b"a" * 1024)
                except OSError:
                    break
            status, _ = read_response(sock)
        assert status == 400
        honest(server.url)
    finally:
        server.stop()


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenising() -> None:
    gen = FakeGenerator(ids("Hello"), context=256)
    gen.tokenizer = CountingTokenizer()
    server, _ = serve(gen)
    try:
        CountingTokenizer.calls = 0
        limit = 256 * len("<|im_end|>")  # the fake vocabulary's longest entry
        body = json.dumps({"model": "fake", "prompt": "x" * (limit + 1)}).encode()
        status, doc = post_json(server.url, "/v1/completions", body)
        assert status == 400 and doc["error"]["code"] == "context_length_exceeded"
        assert f"limit {limit} characters" in doc["error"]["message"] and CountingTokenizer.calls == 0
        chat = {"model": "fake", "messages": [{"role": "user", "content": "y" * (limit + 1)}]}
        status, doc = post_json(server.url, "/v1/chat/completions", json.dumps(chat).encode())
        assert status == 400 and doc["error"]["param"] == "messages" and CountingTokenizer.calls == 0
        many = {"model": "fake", "messages": [{"role": "user", "content": ""}] * 256}  # one per token of context
        status, doc = post_json(server.url, "/v1/chat/completions", json.dumps(many).encode())
        assert status == 400 and "256 messages cannot fit" in doc["error"]["message"] and CountingTokenizer.calls == 0
        honest(server.url)
    finally:
        server.stop()


def test_token_ids_beyond_the_vocabulary_are_a_400() -> None:
    gen = FakeGenerator(ids("Hello"))
    gen.spec.vocab_size = 1000  # type: ignore[attr-defined]
    server, _ = serve(gen)
    try:
        for prompt in ([5, 1000], [-1, 5]):
            body = json.dumps({"model": "fake", "prompt": prompt, "echo": True, "max_tokens": 0}).encode()
            status, doc = post_json(server.url, "/v1/completions", body)
            assert status == 400 and doc["error"]["param"] == "prompt", doc
        honest(server.url)
    finally:
        server.stop()


def test_metrics_need_the_key_when_one_is_set() -> None:
    server, _ = serve(api_key="k")
    try:
        assert timed_get(server.url, "/metrics")[0] == 401
        assert timed_get(server.url, "/metrics", {"Authorization": "Bearer k"})[0] == 404  # the fake keeps none
        assert timed_get(server.url, "/health")[0] == 200  # open
    finally:
        server.stop()


def test_limits_and_the_exposure_warning() -> None:
    with pytest.raises(ConfigError, match="--max-body-bytes must be >= 1024"):
        HttpLimits(max_body_bytes=10)
    with pytest.raises(ConfigError, match="--header-timeout must be in"):
        GatewayConfig(header_timeout=0)
    assert GatewayConfig(max_body_bytes=2048).limits == HttpLimits(max_body_bytes=2048)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        warning = exposure_warning(host, None)
        assert warning is not None and "no API key" in warning and "--api-key" in warning
        assert exposure_warning(host, "k") is None


def test_the_openai_client_sees_the_right_error_types() -> None:
    import openai

    server, gen = serve()
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
            with pytest.raises(openai.BadRequestError) as bad_seed:
                client.completions.create(model="fake", prompt="hi", seed=2**70)
            assert bad_seed.value.status_code == 400 and "seed" in bad_seed.value.message
            with pytest.raises(openai.BadRequestError) as negative:  # (the client cannot send a lone surrogate)
                client.completions.create(model="fake", prompt=[-3, 7], echo=True, max_tokens=0)
            assert "token ids must be >= 0" in negative.value.message
            with pytest.raises(openai.APIStatusError) as too_big:
                client.completions.create(model="fake", prompt="x" * 100_000)  # over the 64 KiB cap
            assert too_big.value.status_code == 413 and "limit --max-body-bytes 65536" in too_big.value.message
            got = client.completions.create(model="fake", prompt="hi", temperature=0)  # same connection pool
            assert got.choices[0].text == "Hello"
        assert len(gen.calls) == 1
    finally:
        server.stop()
