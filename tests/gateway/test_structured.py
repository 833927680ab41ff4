"""gateway.structured: OpenAI ``response_format`` shapes into GrammarSpecs, and every malformed one a 400 naming
``response_format`` (through ``parse_chat_request`` / ``parse_completion_request``, as the gateway sees it)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshinfer.gateway.requests import ApiError, parse_chat_request, parse_completion_request
from meshinfer.gateway.structured import MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH, parse_response_format
from meshinfer.models.grammar import GrammarSpec

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def chat(fmt: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}


def test_text_and_absent_formats_are_free_text() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_chat_request(chat({"type": "text"})).grammar is None
    assert parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).grammar is None


def test_json_object_and_json_schema_become_specs() -> None:
    assert parse_chat_request(chat({"type": "json_object"})).grammar == GrammarSpec("json_object", "",
                                                                                    "response_format")
    fmt = {"type": "json_schema", "json_schema": {"name": "place-1", "schema": SCHEMA, "strict": True,
                                                  "description": "a city"}}
    spec = parse_chat_request(chat(fmt)).grammar
    assert spec is not None and spec.kind == "json_schema" and spec.name == "response_format"
    assert json.loads(spec.source) == SCHEMA
    completion = parse_completion_request({"model": "m", "prompt": "x", "response_format": fmt})
    assert completion.grammar == spec


DEEP: dict[str, Any] = {"type": "object"}
for _ in range(MAX_SCHEMA_DEPTH + 2):
    DEEP = {"type": "object", "properties": {"x": DEEP}}


@pytest.mark.parametrize(("fmt", "needle"), [
    ("json_object", "must be an object"),
    ([{"type": "json_object"}], "must be an object"),
    ({}, "response_format.type"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": "x"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": SCHEMA}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": 5, "schema": SCHEMA}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "n"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": [SCHEMA]}}, "schema object"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": True}}, "schema object"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": "yes"}}, "strict"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "description": 3}}, "description"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": ["x" * MAX_SCHEMA_CHARS]}}},
     "at most"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": DEEP}}, "deeper"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"const": float("nan")}}}, "not valid JSON"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"const": "\ud800"}}}, "not valid JSON"),
])
def test_malformed_formats_are_400_naming_response_format(fmt: Any, needle: str) -> None:
    for parse, body in ((parse_chat_request, chat(fmt)),
                        (parse_completion_request, {"model": "m", "prompt": "x", "response_format": fmt})):
        with pytest.raises(ApiError) as info:
            parse(body)
        err = info.value
        assert (err.status, err.param, err.type) == (400, "response_format", "invalid_request_error")
        assert needle in err.message


def test_summarise_tokens() -> None:
    from meshinfer.bench.api import RequestSample
    from meshinfer.bench.api_grammar import summarise_tokens

    out = summarise_tokens([RequestSample(0.5, 1.5, 11), RequestSample(0.1, 0.4, 4), RequestSample(0, 1, 0, "x")])
    assert out["requests"] == 3 and out["failed"] == 1 and out["completion_tokens"] == 15
    assert out["ms_per_token"]["median"] == pytest.approx(100.0)
    assert summarise_tokens([RequestSample(0, 1, 0, "boom")])["errors"] == ["boom"]
