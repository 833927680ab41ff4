"""Tool-call markers that the tokenizer has as special tokens (real Mistral tokenizers: ``[TOOL_CALLS]``,
``[ARGS]``; Llama 3.1's ``<|python_tag|>``) are kept in the reply's text when a request has tools, so the parser
sees them; decoding otherwise skips special tokens (and ``[TOOL_CALLS]get_weather[ARGS]{...}`` read
``get_weather{...}``: no call). The reference for the kept text is ``transformers``' own
``decode(skip_special_tokens=False)``; the tokenizer is the tiny checkpoint's with ids 2 and 3 renamed to the
markers (``meshinfer.testing.toolmodel.special_markers``)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from gateway_helpers import MODEL_NAME
from transformers import AutoTokenizer

from meshinfer.gateway.tool_output import parse_tool_calls
from meshinfer.gateway.tools import KEPT_TOKENS
from meshinfer.gateway.toolstream import ToolStream
from meshinfer.models.detokenize import IncrementalDetokenizer, special_token_ids, text_decoder
from meshinfer.testing.toolmodel import MISTRAL_ARGS_TEMPLATE, special_markers, tool_checkpoint

TEXT = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
    "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = Path(tmp_path_factory.mktemp("markers")) / "model"
    return special_markers(tool_checkpoint(directory, template=MISTRAL_ARGS_TEMPLATE))


def test_kept_markers_decode_as_transformers_does_without_skipping_and_parse_into_a_call(marker_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(marker_model)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids.count(2) == 1 and ids.count(3) == 1  # one special token each
    skipped = text_decoder(tok)(ids)
    assert skipped == tok.decode(ids, skip_special_tokens=True) == 'Sure.get_weather{"city": "Paris"}'
    assert parse_tool_calls(skipped, "mistral_args") == (skipped, [])  # no marker: no call
    decode = text_decoder(tok, special_token_ids(tok, KEPT_TOKENS["mistral_args"]))
    assert decode(ids) == tok.decode(ids, skip_special_tokens=False) == TEXT
    content, calls = parse_tool_calls(decode(ids), "mistral_args")
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                                        {"city": "Paris"})]
    # token by token, as the gateway streams: the deltas concatenate to the kept text; the call streams
    detok, stream = IncrementalDetokenizer(decode), ToolStream("mistral_args")
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT
    shown = "".join(stream.push(d) for d in deltas)
    rest, whole, streamed = stream.finish()
    assert shown + rest == "Sure." and whole == [] and streamed == 1
    assert special_token_ids(tok, ("[NOT_A_TOKEN]", "Sure")) == {}  # only special tokens the tokenizer has
    assert text_decoder(tok, special_token_ids(tok, ("<|im_end|>",)))(ids) == skipped  # only the kept ones


@pytest.mark.slow
def test_a_marker_without_a_call_is_kept_only_when_the_request_has_tools(marker_model: Path) -> None:
    """Through the gateway and the official client: the model is made to emit ``[TOOL_CALLS]`` (logit_bias);
    with tools its text is the marker (no call follows: content, as vLLM does), without tools it is skipped. A
    forced call, made of the special tokens, is parsed into ``tool_calls`` (streamed and not)."""
    from meshinfer.client.model import DistributedModel
    from meshinfer.gateway.app import create_app
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.testing.swarm import LocalSwarm

    swarm = LocalSwarm(marker_model, [(0, 4)], startup_timeout=120).start()
    try:
        with DistributedModel.from_pretrained(marker_model, swarm.initial_peers) as model, \
                ApiServer(create_app(SwarmGenerator(model), MODEL_NAME)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
            ask = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 1,
                   "logit_bias": {"2": 100}, "temperature": 0}
            with_tools = client.chat.completions.create(**ask, tools=TOOLS)  # type: ignore[call-overload]
            assert with_tools.choices[0].message.content == "[TOOL_CALLS]"
            assert with_tools.choices[0].finish_reason == "length" and not with_tools.choices[0].message.tool_calls
            assert with_tools.usage is not None and with_tools.usage.completion_tokens == 1
            plain = client.chat.completions.create(**ask)  # type: ignore[call-overload]
            assert plain.choices[0].message.content == ""
            none = client.chat.completions.create(**ask, tools=TOOLS, tool_choice="none")  # type: ignore[call-overload]
            assert none.choices[0].message.content == ""  # "none": nothing is parsed, nothing kept
            # a forced call: the grammar's "[TOOL_CALLS]" / "[ARGS]" are the special tokens (llguidance tokenizes
            # them canonically), so the reply is made of them, as a real Mistral model's; it parses into the call
            forced = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 40,
                      "temperature": 0, "tools": TOOLS,
                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
            whole = client.chat.completions.create(**forced)  # type: ignore[call-overload]
            calls = whole.choices[0].message.tool_calls
            assert whole.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "get_weather"
            assert isinstance(json.loads(calls[0].function.arguments).get("city"), str)
            pieces: dict[str, str] = {"name": "", "arguments": ""}
            for chunk in client.chat.completions.create(**forced, stream=True):  # type: ignore[call-overload]
                for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                    pieces["name"] += delta.function.name or "" if delta.function else ""
                    pieces["arguments"] += delta.function.arguments or "" if delta.function else ""
            assert pieces == {"name": "get_weather", "arguments": calls[0].function.arguments}
    finally:
        swarm.stop()

