"""Structured output through the gateway in front of the real 3-server swarm of a random-weight tiny model,
driven by the official ``openai`` package: the constraint holds on the client, so even a model that has never
seen JSON answers valid JSON (checked with ``jsonschema``), token for token what the local engine produces
under the same grammar; n > 1 and streaming each follow their own grammar state; a schema the grammar engine
rejects is a 400 naming ``response_format``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from gateway_helpers import MODEL_NAME, Served

from meshinfer.config import SamplingConfig
from meshinfer.models.detokenize import chat_stop_ids
from meshinfer.models.generator import GenerationParams
from meshinfer.models.grammar import GrammarCompiler, GrammarSpec

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Describe a lamp as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "lamp", "schema": SCHEMA, "strict": True}}


@pytest.fixture()
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def local_constrained(served: Served, spec: GrammarSpec, seed: int, max_tokens: int) -> str:
    """The local engine's reply under the same grammar (the gateway's rendering, stops and sampling)."""
    local = served.local
    tok = local.tokenizer
    stops = chat_stop_ids(tok, local.spec.eos_token_ids)
    factory = GrammarCompiler(tok, local.spec.vocab_size, stops).compile(spec)
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt = [int(i) for i in tok(rendered, add_special_tokens=False)["input_ids"]]
    params = dataclasses.replace(GenerationParams.of(max_tokens, SamplingConfig(temperature=1.0, seed=seed), stops),
                                 constraint=factory)
    return tok.decode([t.token for t in local.generation(prompt, params)], skip_special_tokens=True)


def test_json_schema_with_n_choices_is_valid_and_the_local_engines(served: Served, client: openai.OpenAI) -> None:
    got = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=FORMAT, n=3, seed=0,
                                         max_tokens=80)
    assert len(got.choices) == 3
    for choice in got.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":")))
    assert got.choices[1].message.content == local_constrained(served, spec, 1, 80)


def test_streamed_json_object_and_schema_choices_are_valid(served: Served, client: openai.OpenAI) -> None:
    texts = ["", ""]
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=FORMAT, n=2,
                                                seed=2, max_tokens=80, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    # any JSON object: free-text keys let a random model ramble, so take a seed whose local reply closes the
    # object within max_tokens (the local engine, same grammar) and check the swarm's stream is that reply
    seed, want = next((s, t) for s in range(16) if (t := local_constrained(served, GrammarSpec("json_object"), s, 40))
                      .endswith("}"))
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format={"type": "json_object"}, seed=seed, max_tokens=40,
        stream=True) if c.choices)
    assert streamed == want and isinstance(json.loads(streamed), dict)


def test_completions_take_response_format_too(client: openai.OpenAI) -> None:
    got = client.completions.create(model=MODEL_NAME, prompt="A lamp:", max_tokens=80, seed=1,
                                    extra_body={"response_format": FORMAT})
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].text), SCHEMA)


def test_a_schema_the_engine_rejects_is_a_400_naming_response_format(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=bad)  # type: ignore[arg-type]
    body: Any = info.value.body
    assert body["param"] == "response_format" and "strnig" in body["message"]


def test_the_grammar_bench_times_both_runs(served: Served) -> None:
    from meshinfer.bench.api_grammar import grammar_overhead

    out = grammar_overhead(served.server.url, concurrency=2, requests=2, max_tokens=6, model=MODEL_NAME)
    for run in ("plain", "json_schema"):
        assert out[run]["failed"] == 0 and out[run]["completion_tokens"] > 2 and out[run]["ms_per_token"]["median"] > 0
    assert out["overhead_ratio"] > 0



def test_langchain_with_structured_output(served: Served) -> None:
    """LangChain's ``ChatOpenAI.with_structured_output(<pydantic model>, method="json_schema")`` (what agent
    frameworks call) gets back a parsed object."""
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Lamp(BaseModel):
        """A lamp."""

        color: Literal["red", "green", "blue"]
        n: int = Field(ge=0, le=99)
        ok: bool

    llm = ChatOpenAI(model=MODEL_NAME, base_url=served.base_url, api_key="unused",  # type: ignore[arg-type]
                     temperature=0, max_tokens=200, max_retries=0, timeout=120)  # type: ignore[call-arg]
    got = llm.with_structured_output(Lamp, method="json_schema").invoke("Describe a lamp as JSON.")
    assert isinstance(got, Lamp)
