"""Unit tests of gateway.tools / gateway.toolstream (pure): request validation, family detection, parsing real
output formats of Hermes/Qwen2.5, Llama 3.1 and Mistral (strings as those models' docs show them), the stream
splitter, the forced-call grammar (compiled with llguidance over a tiny tokenizer) and the response shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshinfer.gateway.requests import ApiError, parse_chat_request
from meshinfer.gateway.responses import Choice, ResponseBuilder, Usage
from meshinfer.gateway.tool_grammar import tool_grammar
from meshinfer.gateway.tool_output import parse_tool_calls, tool_family
from meshinfer.gateway.tools import ToolError, parse_tools
from meshinfer.gateway.toolstream import ToolStream
from meshinfer.testing.toolmodel import LLAMA31_TEMPLATE, MISTRAL_ARGS_TEMPLATE, QWEN25_TEMPLATE

PARAMS = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
TOOL = {"type": "function", "function": {"name": "get_current_weather", "description": "w", "parameters": PARAMS}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, "tools": [TOOL], **extra}


def test_tools_and_tool_choice_parse() -> None:
    req = parse_chat_request(body(tool_choice={"type": "function", "function": {"name": "get_current_weather"}}))
    assert req.tools is not None and req.tools.choice == "get_current_weather" and req.tools.parallel
    assert req.tools.tools[0].template_dict() == TOOL
    assert parse_tools(body(tool_choice="required", parallel_tool_calls=False)).choice == "required"  # type: ignore[union-attr]
    legacy = parse_tools({"functions": [TOOL["function"]], "function_call": {"name": "get_current_weather"}})
    assert legacy is not None and legacy.choice == "get_current_weather"


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [TOOL] * 129}, "tools"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [TOOL["function"]]}, "functions"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_requests_are_400s_naming_the_param(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat_request(body(**extra))
    assert err.value.status == 400 and (err.value.param or "").startswith(param)


def test_tool_messages_take_the_template_convention() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_current_weather",
                                                             "arguments": '{"location": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]
    req = parse_chat_request(body(messages=messages))
    assert req.messages[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_current_weather",
                                                          "arguments": {"location": "Paris"}}}]}
    assert req.messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "22C"}
    with pytest.raises(ApiError) as err:
        parse_chat_request(body(messages=[*USER, {"role": "tool", "content": "x"}]))
    assert err.value.param == "messages[1].tool_call_id"
    bad_args = {**call, "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(ApiError):
        parse_chat_request(body(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [bad_args]}]))


def test_family_detection() -> None:
    assert tool_family(QWEN25_TEMPLATE) == "hermes"
    assert tool_family("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is None  # SmolLM2-like
    assert tool_family("{%- if tools %}[AVAILABLE_TOOLS]{{ tools }}{%- endif %}[TOOL_CALLS]") == "mistral"
    assert tool_family("{%- if tools %}<|python_tag|>{{ tools }}{%- endif %}") == "llama3"


def _calls(text: str, family: Any) -> tuple[str | None, list[tuple[str, Any]]]:
    content, calls = parse_tool_calls(text, family)
    assert all(c.id.startswith("call_") for c in calls)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_parse_hermes_qwen() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Rome"}}\n'
            '</tool_call>')
    assert _calls(text, "hermes") == ("Let me check.\n", [("get_current_weather", {"location": "Paris"}),
                                                          ("get_current_weather", {"location": "Rome"})])
    assert _calls("Just text.", "hermes") == ("Just text.", [])
    assert _calls("<tool_call>\n{broken\n</tool_call>", "hermes") == ("<tool_call>\n{broken\n</tool_call>", [])


def test_parse_llama3_and_mistral() -> None:
    assert _calls('{"name": "get_current_weather", "parameters": {"location": "Paris"}}', "llama3") == \
        (None, [("get_current_weather", {"location": "Paris"})])
    assert _calls('<|python_tag|>{"name": "f", "parameters": {}}', "llama3") == (None, [("f", {})])
    assert _calls("The weather is fine.", "llama3") == ("The weather is fine.", [])
    assert _calls('[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris"}}, '
                  '{"name": "f", "arguments": {}}]', "mistral") == \
        (None, [("get_current_weather", {"location": "Paris"}), ("f", {})])
    assert _calls('[{"name": "f", "arguments": {"x": 1}}]', "mistral") == (None, [("f", {"x": 1})])  # marker skipped
    assert _calls("[1] is a citation.", "mistral") == ("[1] is a citation.", [])


def test_parse_mistral_name_args_calls_back_to_back() -> None:
    """Mistral's recent tokenizers: ``[TOOL_CALLS]name[ARGS]{json}`` per call (``[CALL_ID]id`` optional); either
    Mistral family parses either format."""
    text = ('Checking.[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris"}'
            '[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{}\n')
    want = ("Checking.", [("get_current_weather", {"location": "Paris"}), ("f", {})])
    assert _calls(text, "mistral_args") == want and _calls(text, "mistral") == want
    assert _calls('[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]', "mistral_args") == (None, [("f", {"x": 1})])
    for bad in ('[TOOL_CALLS]f[ARGS]{"a": 1} and more', '[TOOL_CALLS]f[ARGS][1]', '[TOOL_CALLS]f[ARGS]{"a": '):
        assert _calls(bad, "mistral_args") == (bad, [])  # not a call: content, as vLLM does
    assert tool_family(MISTRAL_ARGS_TEMPLATE) == "mistral_args" and tool_family(LLAMA31_TEMPLATE) == "llama3"
    stream = ToolStream("mistral_args")
    out = "".join(stream.push(text[i:i + 4]) for i in range(0, len(text), 4))
    rest, calls, streamed = stream.finish()
    assert out + rest == "Checking." and calls == [] and streamed == 2  # both streamed as generated
    assert {k: (e["name"], json.loads(e["arguments"])) for k, e in _assemble(stream.deltas()).items()} == \
        {0: ("get_current_weather", {"location": "Paris"}), 1: ("f", {})}
    old = ToolStream("mistral")  # the list format: whole at the end
    old.push('[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]')
    assert old.deltas() == [] and [c.name for c in old.finish()[1]] == ["f"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_current_weather"}}])
def test_a_forced_mistral_args_grammar_admits_only_named_calls(choice: Any) -> None:
    from llguidance import LLMatcher

    tools = [TOOL, {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = parse_tools({**body(tool_choice=choice), "tools": tools})
    assert req is not None
    spec = tool_grammar(req, "mistral_args")
    assert spec is not None and spec.kind == "lark"
    assert '"[TOOL_CALLS]" "get_current_weather" "[ARGS]"' in spec.source
    assert ('"[TOOL_CALLS]" "f" "[ARGS]"' in spec.source) == (choice == "required")
    LLMatcher.grammar_from_lark(spec.source)  # compiles
    # where the tokenizer has the markers as special tokens, the grammar names those tokens, not their text
    special = tool_grammar(req, "mistral_args", {"[TOOL_CALLS]": 5, "[ARGS]": 32})
    assert special is not None and '<[5]> "get_current_weather" <[32]>' in special.source
    assert '"[TOOL_CALLS]"' not in special.source and '"[ARGS]"' not in special.source
    LLMatcher.grammar_from_lark(special.source)


def test_the_stream_holds_back_a_possible_marker_and_ends_with_the_calls() -> None:
    s = ToolStream("hermes")
    text = 'Hi <tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>'  # arguments first: not streamed
    out = "".join(s.push(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls, streamed = s.finish()
    assert out + rest == "Hi " and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1})]
    assert streamed == 0 and s.deltas() == []
    llama = ToolStream("llama3")
    assert llama.push(" ") == "" and llama.push('{"name": "f", ') == "" and llama.push('"parameters": {"a"') == ""
    head, piece = llama.deltas()
    assert head["function"] == {"name": "f", "arguments": ""} and head["id"].startswith("call_")
    assert piece == {"index": 0, "function": {"arguments": '{"a"'}}
    assert llama.push(": 1}}") == "" and llama.finish() == ("", [], 1)
    assert llama.deltas() == [{"index": 0, "function": {"arguments": ": 1}"}}]
    plain = ToolStream("hermes")
    assert plain.push("a <tool") == "a " and plain.push(" box") == "<tool box" and plain.finish() == ("", [], 0)


def _assemble(deltas: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for d in deltas:
        entry = out.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
        entry["id"] += d.get("id", "")
        entry["name"] += d.get("function", {}).get("name", "")
        entry["arguments"] += d.get("function", {}).get("arguments", "")
    return out


def test_hermes_arguments_stream_in_fragments_as_they_are_generated() -> None:
    """OpenAI's shape: per call a head delta (id, type, name, arguments "") once the name is known, then the
    arguments' text in pieces as it grows, never past the object's closing brace (braces in strings ignored)."""
    args = '{"city": "Pa}ris \\"x\\"", "opts": {"unit": [1, {"a": 2}]}}'
    text = (f'Sure. <tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>\n'
            '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    s = ToolStream("hermes")
    content, per_push = "", []
    for i in range(0, len(text), 4):
        content += s.push(text[i:i + 4])
        per_push.append(s.deltas())
    rest, calls, streamed = s.finish()
    deltas = [d for batch in per_push for d in batch] + s.deltas()
    assert content + rest == "Sure. " and calls == [] and streamed == 2
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and deltas[0]["id"].startswith("call_")
    fragments = [d for d in deltas if d["index"] == 0 and "id" not in d]
    assert len(fragments) > 5  # the arguments went out in many pieces, while being generated
    first_fragment = next(i for i, batch in enumerate(per_push) if any("id" not in d for d in batch))
    assert first_fragment < len(per_push) // 2  # long before the end of the text
    assembled = _assemble(deltas)
    assert assembled[0]["arguments"] == args and json.loads(assembled[0]["arguments"])["city"] == 'Pa}ris "x"'
    assert (assembled[1]["name"], assembled[1]["arguments"]) == ("f", "{}")
    one = ToolStream("hermes", max_calls=1)  # parallel_tool_calls: false
    for i in range(0, len(text), 7):
        one.push(text[i:i + 7])
    assert one.finish() == ("", [], 1) and list(_assemble(one.deltas())) == [0]
    cut = ToolStream("hermes")  # cut by max_tokens inside the arguments: what went out stays, no more calls
    cut.push('<tool_call>\n{"name": "g", "arguments": {"x": [1, 2')
    assert cut.finish() == ("", [], 1) and _assemble(cut.deltas())[0]["arguments"] == '{"x": [1, 2'


def test_a_forced_call_grammar_admits_only_a_valid_call() -> None:
    from llguidance import LLMatcher

    req = parse_tools(body(tool_choice="required"))
    assert req is not None
    spec = tool_grammar(req, "hermes")
    assert spec is not None and spec.kind == "lark"
    assert tool_grammar(parse_tools(body()), "hermes") is None  # type: ignore[arg-type]
    LLMatcher.grammar_from_lark(spec.source)  # compiles


def test_responses_carry_tool_calls() -> None:
    call = {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    b = ResponseBuilder("chat", "m")
    doc = b.full_choices([Choice("", "tool_calls", (), [call])], Usage(1, 1))
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    chunks = b.tool_calls_chunk([call])
    assert chunks[0]["choices"][0]["delta"]["tool_calls"][0]["id"] == "call_x"
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_tool_error_names_its_param() -> None:
    with pytest.raises(ToolError) as err:
        parse_tools({"tool_choice": "required"})
    assert err.value.param == "tool_choice"


# ---- "auto" through the app (a scripted generator emitting a Hermes call) --------------------------------

REPLY = 'Sure. <tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris"}}\n</tool_call>'


def _post(payload: dict[str, Any]) -> Any:
    import asyncio

    import httpx
    from gateway_helpers import EOS, FakeGenerator, ids

    from meshinfer.gateway.app import create_app

    gen = FakeGenerator([*ids(REPLY), EOS], chat_template="{% if tools %}<tool_call>{% endif %}")
    seen: dict[str, Any] = {}

    def render(messages: Any, add_generation_prompt: bool = False, tokenize: bool = True, **kw: Any) -> str:
        seen.update(kw)
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    gen.tokenizer.apply_chat_template = render  # type: ignore[method-assign]
    app = create_app(gen, "m")  # pyright: ignore[reportArgumentType]

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.post("/v1/chat/completions", json=payload)

    return asyncio.run(main()), seen


def test_auto_parses_the_call_out_of_the_reply() -> None:
    r, seen = _post(body(max_tokens=200))
    assert seen["tools"] == [TOOL]
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure. "
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_current_weather", "arguments": '{"location": "Paris"}'}


def test_auto_streams_content_then_tool_call_deltas() -> None:
    r, _ = _post(body(max_tokens=200, stream=True))
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure. "
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_current_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"location": "Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_renders_the_tools_but_never_parses_calls() -> None:
    r, seen = _post(body(max_tokens=200, tool_choice="none"))
    choice = r.json()["choices"][0]
    assert seen["tools"] == [TOOL] and choice["message"]["content"] == REPLY and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]


def test_a_forced_call_keeps_the_references_of_nested_models() -> None:
    from llguidance import LLMatcher

    nested = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
              "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    tool = {"type": "function", "function": {"name": "go", "parameters": nested}}
    req = parse_tools(body(tools=[tool], tool_choice={"type": "function", "function": {"name": "go"}}))
    assert req is not None
    spec = tool_grammar(req, "hermes")
    assert spec is not None and '"$defs": {"Place"' in spec.source
    grammar = LLMatcher.grammar_from_lark(spec.source)
    assert LLMatcher.validate_grammar(grammar) == ""  # no error: the reference resolves
