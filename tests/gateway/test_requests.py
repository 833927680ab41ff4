"""Request validation, the context limit, keys, model names and error mapping (pure, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from meshinfer.client.routing import NoRouteError
from meshinfer.config import SamplingConfig
from meshinfer.errors import CheckpointError, ConfigError, ContextOverflowError, RemoteError, TransportError
from meshinfer.gateway.requests import (
    ApiError,
    check_api_key,
    check_model,
    check_token_ids,
    error_for,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    resolve_max_tokens,
)

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **fields}


def test_chat_defaults_follow_the_openai_api() -> None:
    req = parse_chat_request(chat())
    assert req.kind == "chat" and req.model == "m"
    assert req.messages == ({"role": "user", "content": "hi"},)
    assert req.sampling == SamplingConfig(temperature=1.0)  # OpenAI's default temperature is 1
    assert (req.max_tokens, req.stop, req.stream, req.include_usage) == (None, (), False, False)
    assert req.top_logprobs is None  # no logprobs unless asked for


@pytest.mark.parametrize(("fields", "want"), [
    ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 5}, 5),
    ({"logprobs": True, "top_logprobs": 20}, 20),
    ({"logprobs": False}, None),
    ({"logprobs": False, "top_logprobs": 0}, None),
])
def test_chat_logprobs(fields: dict[str, Any], want: int | None) -> None:
    assert parse_chat_request(chat(**fields)).top_logprobs == want


@pytest.mark.parametrize(("value", "want"), [(None, None), (0, 0), (3, 3), (20, 20)])
def test_completion_logprobs(value: int | None, want: int | None) -> None:
    assert parse_completion_request({"model": "m", "prompt": "x", "logprobs": value}).top_logprobs == want


def test_the_logprobs_limit_is_the_engines() -> None:
    from meshinfer.gateway.requests import MAX_LOGPROBS
    from meshinfer.models.sampling import MAX_TOP_LOGPROBS

    assert MAX_LOGPROBS == MAX_TOP_LOGPROBS


def test_chat_fields_are_carried_over() -> None:
    req = parse_chat_request(chat(
        temperature=0.5, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7, stop=["a", "b", "a"], stream=True,
        stream_options={"include_usage": True}, max_tokens=5, max_completion_tokens=9, n=1, presence_penalty=0,
        frequency_penalty=0.0, user="u", logprobs=False, response_format={"type": "text"},
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": "c"}],
    ))
    assert req.sampling == SamplingConfig(temperature=0.5, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7)
    assert req.stop == ("a", "b")  # duplicates dropped, order kept
    assert req.stream and req.include_usage
    assert req.max_tokens == 9  # max_completion_tokens wins over the deprecated max_tokens
    assert req.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                            {"role": "assistant", "content": "c"})


def test_sampling_extensions_are_carried_over() -> None:
    req = parse_chat_request(chat(presence_penalty=0.5, frequency_penalty=-1, min_p=0.05, ignore_eos=True,
                                  logit_bias={"7": -100, "42": 2.5, "0": 100}, stop_token_ids=[5, 3, 5]))
    assert req.sampling == SamplingConfig(temperature=1.0, presence_penalty=0.5, frequency_penalty=-1.0, min_p=0.05,
                                          logit_bias=((7, -100.0), (42, 2.5), (0, 100.0)))
    assert req.ignore_eos and req.stop_token_ids == (5, 3)
    plain = parse_chat_request(chat(logit_bias={}, stop_token_ids=[], ignore_eos=None))
    assert plain.sampling == SamplingConfig(temperature=1.0) and not plain.ignore_eos and plain.stop_token_ids == ()
    completion = parse_completion_request({"model": "m", "prompt": "x", "max_tokens": 3, "max_completion_tokens": 8,
                                           "logit_bias": {"9": -5}, "ignore_eos": True})
    assert completion.max_tokens == 8 and completion.ignore_eos and completion.sampling.logit_bias == ((9, -5.0),)


def test_token_ids_are_checked_against_the_vocabulary() -> None:
    check_token_ids(parse_chat_request(chat(logit_bias={"99": 1}, stop_token_ids=[99])), 100)
    check_token_ids(parse_chat_request(chat(logit_bias={"100": 1})), None)  # vocabulary unknown: nothing checked
    for body, param in ((chat(logit_bias={"100": 1}), "logit_bias"), (chat(stop_token_ids=[3, 100]), "stop_token_ids")):
        with pytest.raises(ApiError) as info:
            check_token_ids(parse_chat_request(body), 100)
        assert (info.value.status, info.value.param) == (400, param) and "vocabulary" in info.value.message


@pytest.mark.parametrize(("fields", "param", "needle"), [
    ({"model": None}, "model", "model"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "text parts"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"temperature": 3}, "temperature", "[0, 2]"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", ">= -1"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_completion_tokens": True}, "max_completion_tokens", "integer"),
    ({"stop": ["a", ""]}, "stop", "empty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": 5}, "stop", "string"),
    ({"n": 17}, "n", "n must be in 1..16"),
    ({"n": 0}, "n", ">= 1"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"presence_penalty": "1"}, "presence_penalty", "number"),
    ({"frequency_penalty": 5}, "frequency_penalty", "[-2, 2]"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"logit_bias": [[1, 5]]}, "logit_bias", "object"),
    ({"logit_bias": {"a": 5}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-1": 5}}, "logit_bias", "token ids"),
    ({"logit_bias": {"1.5": 5}}, "logit_bias", "token ids"),
    ({"logit_bias": {"99999999999": 5}}, "logit_bias", "token ids"),
    ({"logit_bias": {"1": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"1": "5"}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"1": True}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"1": float("nan")}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "at most 1024"),
    ({"ignore_eos": "yes"}, "ignore_eos", "boolean"),
    ({"stop_token_ids": 5}, "stop_token_ids", "list"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "list"),
    ({"stop_token_ids": [1, True]}, "stop_token_ids", "list"),
    ({"stop_token_ids": [-3]}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": list(range(129))}, "stop_token_ids", "at most 128"),
    ({"logprobs": 1}, "logprobs", "boolean"),
    ({"top_logprobs": 3}, "top_logprobs", "requires logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0..20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", ">= 0"),
    ({"tools": [{"type": "function"}]}, "tools", "tool"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"stream": "yes"}, "stream", "boolean"),
])
def test_bad_chat_requests_are_400_naming_the_param(fields: dict[str, Any], param: str, needle: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request(chat(**fields))
    err = info.value
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert needle in err.message


def test_non_object_body_is_400() -> None:
    with pytest.raises(ApiError, match="JSON object"):
        parse_chat_request(["not", "an", "object"])


def test_stream_options_only_count_when_streaming() -> None:
    assert not parse_chat_request(chat(stream_options={"include_usage": True})).include_usage


@pytest.mark.parametrize(("prompt", "want"), [
    ("hello", "hello"),
    (["hello"], "hello"),
    ([5, 6, 7], (5, 6, 7)),
    ([[5, 6]], (5, 6)),
])
def test_completion_prompts(prompt: Any, want: Any) -> None:
    req = parse_completion_request({"model": "m", "prompt": prompt, "max_tokens": 4})
    assert (req.kind, req.prompt, req.max_tokens) == ("completion", want, 4)


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "logprobs": "2"}, "logprobs"),
])
def test_bad_completion_requests(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion_request({"model": "m", **fields})
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize(("raw", "ok"), [(b'{"a": 1}', True), (b"{bad", False), (b"", False), (b"\xff", False)])
def test_parse_json_body(raw: bytes, ok: bool) -> None:
    if ok:
        assert parse_json_body(raw) == {"a": 1}
    else:
        with pytest.raises(ApiError, match="not valid JSON"):
            parse_json_body(raw)


@pytest.mark.parametrize(("prompt", "requested", "context", "default", "want"), [
    (10, None, 100, 512, 90),   # the default is bounded by what the context leaves
    (10, None, 1000, 512, 512),
    (10, 90, 100, 512, 90),     # exactly fits
    (10, 5, 100, 512, 5),
])
def test_resolve_max_tokens(prompt: int, requested: int | None, context: int, default: int, want: int) -> None:
    assert resolve_max_tokens(prompt, requested, context, default) == want


@pytest.mark.parametrize(("prompt", "requested", "context", "code"), [
    (10, 91, 100, None),
    (100, None, 100, None),
    (150, 1, 100, None),
    (0, 5, 100, "empty"),
])
def test_resolve_max_tokens_overflow(prompt: int, requested: int | None, context: int, code: str | None) -> None:
    with pytest.raises(ApiError) as info:
        resolve_max_tokens(prompt, requested, context, 512)
    assert info.value.status == 400
    if code == "empty":
        assert "empty" in info.value.message
    else:
        assert info.value.code == "context_length_exceeded"
        assert f"{context} tokens" in info.value.message


@pytest.mark.parametrize(("header", "key", "ok"), [
    (None, None, True),
    ("Bearer anything", None, True),
    ("Bearer sekrit", "sekrit", True),
    ("bearer sekrit", "sekrit", True),
    ("Bearer wrong", "sekrit", False),
    ("sekrit", "sekrit", False),
    ("Bearer ", "sekrit", False),
    (None, "sekrit", False),
])
def test_check_api_key(header: str | None, key: str | None, ok: bool) -> None:
    if ok:
        check_api_key(header, key)
    else:
        with pytest.raises(ApiError) as info:
            check_api_key(header, key)
        assert (info.value.status, info.value.code) == (401, "invalid_api_key")


def test_check_model() -> None:
    check_model("tiny", "tiny")
    with pytest.raises(ApiError) as info:
        check_model("gpt-4", "tiny")
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    assert "'tiny'" in info.value.message


@pytest.mark.parametrize(("err", "status", "code"), [
    (ContextOverflowError("too long"), 400, "context_length_exceeded"),
    (ConfigError("token id 9999 is outside the vocabulary"), 400, None),
    (NoRouteError("no online servers cover blocks 0:4"), 503, "no_route"),
    (RemoteError("overloaded", "KV cache full"), 503, "overloaded"),
    (TransportError("stream broke"), 503, "swarm_unreachable"),
    (RemoteError("internal", "boom"), 500, None),
    (CheckpointError("corrupt"), 500, None),
    (RuntimeError("bug"), 500, None),
    (ApiError(429, "slow down"), 429, None),
])
def test_error_for(err: BaseException, status: int, code: str | None) -> None:
    api = error_for(err)
    assert (api.status, api.code) == (status, code)
    body = api.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert str(err) in body["message"]
    assert body["type"] == {400: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                            503: "service_unavailable_error"}[status]


# ---- inputs that were a 500 (issue 17 finding 8): each is a 400 naming what is wrong --------------------------

SURROGATE = "a\ud800b"  # what the JSON escape "\\ud800" decodes to: not encodable as UTF-8


@pytest.mark.parametrize(("parse", "body", "param"), [
    (parse_completion_request, {"model": "m", "prompt": "hi", "seed": 2**64}, "seed"),
    (parse_completion_request, {"model": "m", "prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    (parse_completion_request, {"model": "m", "prompt": [-1, 5], "echo": True, "max_tokens": 0}, "prompt"),
    (parse_completion_request, {"model": "m", "prompt": SURROGATE}, "prompt"),
    (parse_completion_request, {"model": "m", "prompt": "hi", "stop": [SURROGATE]}, "stop"),
    (parse_completion_request, {"model": SURROGATE, "prompt": "hi"}, "model"),
    (parse_chat_request, {"model": "m", "messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    (parse_chat_request, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text",
                                                                                   "text": SURROGATE}]}]},
     "messages[0].content"),
    (parse_chat_request, chat(temperature=float("nan")), "temperature"),
    (parse_chat_request, chat(top_p=float("inf")), "top_p"),
    (parse_chat_request, chat(n=10**30), "n"),
    (parse_chat_request, chat(logit_bias={"5": 1e308 * 10}), "logit_bias"),
])
def test_inputs_that_were_500s_are_400s(parse: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_seeds_in_int64_are_kept() -> None:
    for seed in (-(2**63), -1, 0, 2**63 - 1):
        assert parse_completion_request({"model": "m", "prompt": "hi", "seed": seed}).sampling.seed == seed


def test_json_nested_too_deeply_is_a_400() -> None:
    with pytest.raises(ApiError, match="nested too deeply") as info:
        parse_json_body(b"[" * 100_000 + b"]" * 100_000)
    assert info.value.status == 400


def test_the_prompt_character_bound() -> None:
    from meshinfer.gateway.requests import check_prompt_chars

    check_prompt_chars(512 * 16, 512, 16, "prompt")
    with pytest.raises(ApiError, match="limit 8192 characters") as info:
        check_prompt_chars(512 * 16 + 1, 512, 16, "prompt")
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
