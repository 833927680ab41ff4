"""The real model behind the OpenAI API: ``meshinfer api --model smollm2`` in front of three SmolLM2 servers holding
int4 weights, driven by the official ``openai`` package; the answer is the local int4 engine's, word for word."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
from gateway_helpers import local_chat
from openai.types.chat import ChatCompletionMessageParam

from meshinfer.config import SamplingConfig
from meshinfer.models.engine import LocalModel
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]


def _api(messages: list[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    return cast(list[ChatCompletionMessageParam], messages)  # the same plain dicts, as the client types them


@pytest.fixture(scope="module")
def api(smollm2_gguf: Path) -> Iterator[tuple[dict[str, str], LocalSwarm]]:
    from meshinfer.weights.resolve import local_checkpoint

    view = local_checkpoint("smollm2")
    assert view is not None
    swarm = LocalSwarm(view, [(0, 10), (10, 20), (20, 30)], server_args=["--quant", "int4"],
                       startup_timeout=180).start()
    proc = ManagedProcess(meshinfer_argv("api", "--model", "smollm2", "--initial-peers", *swarm.initial_peers,
                                         "--port", "0", "--quant", "int4", "--stop-on-stdin-eof"), name="meshinfer api")
    try:
        line = proc.read_line(180)
        while not line.startswith("ready "):
            line = proc.read_line(180)
        yield json.loads(line[len("ready "):]), swarm
        tree = proc.descendants()
    finally:
        code = proc.stop(timeout=20)
        swarm.stop()
    assert code == 0, proc.stderr_tail()
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


@pytest.fixture(scope="module")
def local_int4(smollm2_gguf: Path) -> LocalModel:
    """The local engine on the same int4 weights (the servers' answers must be its own, word for word)."""
    return LocalModel.from_pretrained(smollm2_gguf, quant="int4", head_quant="none")


def test_chat_through_the_api_answers_like_the_local_int4_engine(api: tuple[dict[str, str], LocalSwarm],
                                                                  local_int4: LocalModel) -> None:
    info, swarm = api
    assert info["model"] == "smollm2" and info["model_id"] == swarm.model_id
    with openai.OpenAI(base_url=info["base_url"], api_key="unused", max_retries=0, timeout=120) as client:
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        got = client.chat.completions.create(model="smollm2", messages=_api(QUESTION), temperature=0, max_tokens=24)
        streamed = client.chat.completions.create(model="smollm2", messages=_api(QUESTION), temperature=0,
                                                  max_tokens=24, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    want, prompt, reply, finish = local_chat(local_int4, QUESTION, 24)
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == finish
    assert got.usage is not None and (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), len(reply))
    assert text == want
    assert "Paris" in text
    doc = httpx.get(info["url"] + "/api/swarm", timeout=30).json()  # the dashboard's data: modes and sizes
    servers = doc["models"][0]["servers"]
    assert [s["quant"] for s in servers] == ["int4"] * 3 and all(s["weight_bytes"] > 0 for s in servers)


# ---- issue 24: sampling settings on the real model's logits, through the official client --------------------------

YES_NO = [{"role": "user", "content": "Reply with one word: yes or no?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]



def test_logit_bias_forces_and_bans_first_tokens(api: tuple[dict[str, str], LocalSwarm],
                                                 local_int4: LocalModel) -> None:
    info, _ = api
    tok = local_int4.tokenizer
    forced = int(tok.encode("Banana")[0])
    _, _, plain, _ = local_chat(local_int4, YES_NO, 4)
    banned = plain[0]  # the greedy first token ("Yes")
    with openai.OpenAI(base_url=info["base_url"], api_key="unused", max_retries=0, timeout=120) as client:
        up = client.chat.completions.create(model="smollm2", messages=_api(YES_NO), temperature=0, max_tokens=1,
                                            logit_bias={str(forced): 100})
        down = client.chat.completions.create(model="smollm2", messages=_api(YES_NO), temperature=0, max_tokens=4,
                                              logit_bias={str(banned): -100})
    assert up.choices[0].message.content == tok.decode([forced])
    want, _, reply, _ = local_chat(local_int4, YES_NO, 4, SamplingConfig(logit_bias=((banned, -100.0),)))
    assert reply[0] != banned
    assert down.choices[0].message.content == want


def test_presence_and_frequency_penalties_answer_like_the_local_engine(api: tuple[dict[str, str], LocalSwarm],
                                                                       local_int4: LocalModel) -> None:
    info, _ = api
    penalised = SamplingConfig(frequency_penalty=1.0, presence_penalty=0.5)
    want, _, _, _ = local_chat(local_int4, POEM, 16, penalised)
    assert want != local_chat(local_int4, POEM, 16)[0]  # the penalties do change this answer
    with openai.OpenAI(base_url=info["base_url"], api_key="unused", max_retries=0, timeout=120) as client:
        got = client.chat.completions.create(model="smollm2", messages=_api(POEM), temperature=0, max_tokens=16,
                                             frequency_penalty=1.0, presence_penalty=0.5)
    assert got.choices[0].message.content == want


def test_ignore_eos_generates_exactly_max_tokens(api: tuple[dict[str, str], LocalSwarm]) -> None:
    info, _ = api
    with openai.OpenAI(base_url=info["base_url"], api_key="unused", max_retries=0, timeout=120) as client:
        plain = client.chat.completions.create(model="smollm2", messages=_api(YES_NO), temperature=0, max_tokens=10)
        forced = client.completions.create(model="smollm2", prompt="Yes or no? Answer:", temperature=0, max_tokens=10,
                                           extra_body={"ignore_eos": True, "min_p": 0.1})
        chat = client.chat.completions.create(model="smollm2", messages=_api(YES_NO), temperature=0, max_tokens=10,
                                              extra_body={"ignore_eos": True})
    assert plain.choices[0].finish_reason == "stop" and plain.usage is not None
    assert plain.usage.completion_tokens < 10  # it would end early ("Yes." then the end of turn)
    assert chat.usage is not None and chat.usage.completion_tokens == 10 and chat.choices[0].finish_reason == "length"
    assert forced.usage is not None and forced.usage.completion_tokens == 10
# ---- structured output (response_format) on the real model ----------------------------------------------

PERSON_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Rome"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["zip", "street"],
                    "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                   "street": {"type": "string", "maxLength": 40}}},
    },
}
PERSON_ASK = [{"role": "user", "content": "Invent a person living in Paris. Answer in JSON with name, age, city, "
                                          "hobbies and address."}]


def test_json_schema_answers_validate_with_jsonschema(api: tuple[dict[str, str], LocalSwarm]) -> None:
    import jsonschema

    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    with openai.OpenAI(base_url=api[0]["base_url"], api_key="unused", max_retries=0, timeout=300) as client:
        got = client.chat.completions.create(model="smollm2", messages=PERSON_ASK, temperature=0, max_tokens=200,
                                             response_format=fmt)
        texts = ["", ""]
        for chunk in client.chat.completions.create(model="smollm2", messages=PERSON_ASK, temperature=0.7, seed=1,
                                                    n=2, max_tokens=200, response_format=fmt, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
    assert got.choices[0].finish_reason == "stop"
    for text in [got.choices[0].message.content or "", *texts]:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert json.loads(got.choices[0].message.content or "")["city"] == "Paris"  # it does read the question


def test_the_sdks_parse_with_a_pydantic_model(api: tuple[dict[str, str], LocalSwarm]) -> None:
    """``client.chat.completions.parse(response_format=<pydantic model>)``: what applications call."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        country: str = Field(max_length=30)
        capital: str = Field(max_length=30)
        population_millions: float = Field(ge=0, le=100)
        continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]

    with openai.OpenAI(base_url=api[0]["base_url"], api_key="unused", max_retries=0, timeout=300) as client:
        got = client.chat.completions.parse(model="smollm2", messages=QUESTION, temperature=0, max_tokens=80,
                                            response_format=Capital)
    parsed = got.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.continent == "Europe"
    assert parsed.capital == "Paris", parsed


def test_tools_on_a_template_without_tool_support_are_a_clear_400(api: tuple[dict[str, str], LocalSwarm]) -> None:
    """SmolLM2's chat template is plain ChatML: it never renders tools, so asking for tools is refused."""
    info, _ = api
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with openai.OpenAI(base_url=info["base_url"], api_key="unused", max_retries=0, timeout=120) as client:
        with pytest.raises(openai.BadRequestError) as err:
            messages: Any = QUESTION
            client.chat.completions.create(model="smollm2", messages=messages, tools=tools, max_tokens=4)
    assert err.value.code == "unsupported_parameter" and err.value.param == "tools"
    assert "does not support tools" in err.value.message
