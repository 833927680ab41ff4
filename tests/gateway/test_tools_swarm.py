"""Tool calling through the gateway in front of the real 3-server swarm of a random-weight tiny model, with a
Qwen2.5 (Hermes ``<tool_call>``) chat template (``meshinfer.testing.toolmodel``), driven by the official
``openai`` client: a forced call (named, or required) is valid against the tool's schema even from random
weights; the app answers with a ``tool`` message and gets a final text answer; the streamed call, assembled as a
client does, equals the non-streamed one; a model whose template takes no tools is a 400 naming ``tools``."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from gateway_helpers import MODEL_NAME, SPANS, Served

from meshinfer.client.model import DistributedModel
from meshinfer.gateway.app import create_app
from meshinfer.gateway.generation import SwarmGenerator
from meshinfer.gateway.serving import ApiServer

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributedModel]:
    from meshinfer.testing.swarm import LocalSwarm
    from meshinfer.testing.toolmodel import tool_checkpoint

    directory = tool_checkpoint(Path(tmp_path_factory.mktemp("tools")) / "model")
    swarm = LocalSwarm(directory, SPANS, startup_timeout=120).start()
    try:
        with DistributedModel.from_pretrained(directory, swarm.initial_peers) as model:
            yield model
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def tool_url(tool_model: DistributedModel) -> Iterator[str]:
    with ApiServer(create_app(SwarmGenerator(tool_model), MODEL_NAME)) as server:
        yield f"{server.url}/v1"


class TemplatedGenerator(SwarmGenerator):
    """The swarm's model with another chat template (the servers never see it: it is the gateway's alone)."""

    def __init__(self, model: DistributedModel, template: str) -> None:
        super().__init__(model)
        self._tokenizer = copy.copy(model.tokenizer)
        self._tokenizer.chat_template = template

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer


@pytest.fixture(scope="module")
def family_client(tool_model: DistributedModel) -> Iterator[openai.OpenAI]:
    """One gateway serving the same swarm model as "llama31" (Llama 3.1's template) and "mistral" (the
    ``[TOOL_CALLS]name[ARGS]`` template of Mistral's recent tokenizers)."""
    from meshinfer.testing.toolmodel import LLAMA31_TEMPLATE, MISTRAL_ARGS_TEMPLATE

    app = create_app(TemplatedGenerator(tool_model, LLAMA31_TEMPLATE), "llama31",
                     more={"mistral": TemplatedGenerator(tool_model, MISTRAL_ARGS_TEMPLATE)})
    with ApiServer(app) as server, \
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture()
def client(tool_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tool_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _check(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_a_named_call_then_the_tool_result_then_a_text_answer(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=200, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].function.name == "get_weather"
    _check(calls[0])
    assert choice.message.content is None
    messages = [*MESSAGES, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=8, seed=3)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert isinstance(second.choices[0].message.content, str) and not second.choices[0].message.tool_calls


def test_required_calls_any_tool_and_the_stream_assembles_to_the_same_calls(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                   "max_tokens": 200, "seed": 5, "parallel_tool_calls": False}
    full = client.chat.completions.create(**kwargs)
    calls = full.choices[0].message.tool_calls or []
    assert full.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    _check(calls[0])
    assembled: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                entry = assembled.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += d.id or ""
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert reasons[-1] == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for e in assembled.values()] == \
        [(calls[0].function.name, json.loads(calls[0].function.arguments))]
    assert assembled[0]["id"].startswith("call_")


def test_a_template_without_tools_is_a_400_naming_tools(served: Served) -> None:
    with openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60) as plain:
        with pytest.raises(openai.BadRequestError) as err:
            plain.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=4)
        assert err.value.code == "unsupported_parameter" and err.value.param == "tools"
        # tool_choice "none": nothing to render and nothing to call: answered as plain chat
        ok = plain.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                           max_tokens=4)
        assert ok.choices[0].message.tool_calls is None


def test_langchain_invoke_stream_and_bind_tools(tool_url: str) -> None:
    """One more real client, not written here, works unchanged: LangChain's ChatOpenAI."""
    from langchain_openai import ChatOpenAI

    common: Any = {"base_url": tool_url, "api_key": "unused", "model": MODEL_NAME, "max_retries": 0, "timeout": 120}
    llm = ChatOpenAI(**{**common, "max_tokens": 6, "seed": 1})
    assert isinstance(llm.invoke("Hello").content, str)
    assert all(isinstance(chunk.content, str) for chunk in llm.stream("Hello"))
    forced = ChatOpenAI(**{**common, "max_tokens": 200, "seed": 2}).bind_tools(TOOLS, tool_choice="get_time")
    message: Any = forced.invoke("What time is it in Tokyo?")
    assert [c["name"] for c in message.tool_calls] == ["get_time"]
    jsonschema.validate(message.tool_calls[0]["args"], TIME)
    assert message.tool_calls[0]["id"].startswith("call_")


def _streamed_calls(client: openai.OpenAI, **kwargs: Any) -> tuple[list[tuple[str, Any]], str | None, int]:
    """The calls a stream assembles (name, arguments) in index order, its finish reason and how many deltas
    carried argument text."""
    assembled: dict[int, dict[str, str]] = {}
    reason, pieces = None, 0
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or []:
                entry = assembled.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += d.id or ""
                entry["name"] += (d.function.name or "") if d.function else ""
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
                    pieces += 1
    assert all(e["id"].startswith("call_") for e in assembled.values())
    return [(e["name"], json.loads(e["arguments"])) for _, e in sorted(assembled.items())], reason, pieces


@pytest.mark.parametrize("model", ["llama31", "mistral"])
def test_real_templates_named_and_required_calls_whole_and_streamed(family_client: openai.OpenAI,
                                                                    model: str) -> None:
    """Llama 3.1's and Mistral's real chat templates: the tools rendered their way, a forced call emitted in
    their format (``{"name", "parameters"}`` / ``[TOOL_CALLS]name[ARGS]{...}``) and parsed into ``tool_calls``,
    whole and streamed alike (the arguments in fragments); then the call and its result go back through the template."""
    named: Any = {"type": "function", "function": {"name": "get_time"}}
    for choice, seed in ((named, 3), ("required", 5)):
        kwargs: Any = {"model": model, "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice,
                       "max_tokens": 200, "seed": seed, "parallel_tool_calls": False}
        full = family_client.chat.completions.create(**kwargs)
        choice0 = full.choices[0]
        calls = choice0.message.tool_calls or []
        assert choice0.finish_reason == "tool_calls" and len(calls) == 1 and choice0.message.content is None
        arguments = _check(calls[0])
        if choice == named:
            assert calls[0].function.name == "get_time"
        streamed, reason, pieces = _streamed_calls(family_client, **kwargs)
        assert reason == "tool_calls" and streamed == [(calls[0].function.name, arguments)]
        assert pieces > 1  # the arguments stream in fragments as they are generated
    messages = [*MESSAGES, choice0.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": calls[0].id, "content": "21 degrees"}]
    again = family_client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=named,
                                                  max_tokens=200, seed=7)
    assert [c.function.name for c in again.choices[0].message.tool_calls or []] == ["get_time"]


def test_mistral_parallel_required_calls_back_to_back(family_client: openai.OpenAI) -> None:
    """``parallel_tool_calls`` with Mistral's format: ``[TOOL_CALLS]name[ARGS]{...}`` repeated; every call parsed."""
    full = family_client.chat.completions.create(model="mistral", messages=MESSAGES, tools=TOOLS,
                                                 tool_choice="required", max_tokens=300, seed=11)
    calls = full.choices[0].message.tool_calls or []
    assert full.choices[0].finish_reason == "tool_calls" and len(calls) >= 1
    for call in calls:
        _check(call)


def test_hermes_arguments_stream_in_pieces_as_generated(client: openai.OpenAI) -> None:
    """Qwen2.5's (Hermes) calls stream their arguments in several deltas, assembling to the whole answer's."""
    kwargs: Any = {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "seed": 3,
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    full = client.chat.completions.create(**kwargs)
    calls = full.choices[0].message.tool_calls or []
    assert len(calls) == 1
    streamed, reason, pieces = _streamed_calls(client, **kwargs)
    assert reason == "tool_calls" and streamed == [("get_weather", _check(calls[0]))]
    assert pieces > 3  # '{"city": "...", "unit": "..."}' goes out as it is generated, token by token
