"""models.grammar against outside references: llguidance's own matcher (fresh, fed whole strings) and
``jsonschema`` (the texts a random walk over our masks produces), on a tiny checkpoint's tokenizer and on
SmolLM2's GGUF-derived one."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from meshinfer.errors import ConfigError
from meshinfer.models.checkpoint import load_tokenizer
from meshinfer.models.grammar import GrammarCompiler, GrammarSpec

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "home"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}},
                         "home": {"type": "object", "additionalProperties": False, "required": ["zip"],
                                  "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
SCORE = {"type": "object", "additionalProperties": False, "required": ["score", "ok"],
         "properties": {"score": {"type": "number", "minimum": -1.5, "maximum": 2.5}, "ok": {"type": "boolean"}}}
CASES: list[tuple[dict[str, Any], str, bool]] = [
    (PERSON, '{"name": "Ann", "age": 42, "tags": ["red", "blue"], "home": {"zip": "01234"}}', True),
    (PERSON, '{"name":"Bo","age":7,"tags":[],"home":{"zip":"99999"}}', True),
    (PERSON, '{"name": "Ann", "age": 142, "tags": [], "home": {"zip": "01234"}}', False),  # age > maximum
    (PERSON, '{"name": "Ann", "age": 4, "tags": ["pink"], "home": {"zip": "01234"}}', False),  # not in the enum
    (PERSON, '{"name": "Ann", "age": 4, "tags": [], "home": {"zip": "0123"}}', False),  # pattern
    (PERSON, '{"name": "Ann", "age": 4, "tags": []}', False),  # required "home" missing
    (SCORE, '{"score": 2.25, "ok": true}', True),
    (SCORE, '{"score": 3, "ok": true}', False),
    (SCORE, '{"score": 1, "ok": "yes"}', False),
]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "tiny":
        from meshinfer.testing.checkpoints import tiny_checkpoint

        return load_tokenizer(tiny_checkpoint("llama"))
    path: Path = request.getfixturevalue("smollm2_gguf")
    return load_tokenizer(path)


_COMPILERS: dict[tuple[int, int], GrammarCompiler] = {}


def _compiler(tokenizer: Any, pad: int = 0) -> GrammarCompiler:
    """One compiler per tokenizer and padding (building llguidance's tokenizer takes ~0.3 s for SmolLM2's)."""
    key = (id(tokenizer), pad)
    if key not in _COMPILERS:
        _COMPILERS[key] = GrammarCompiler(tokenizer, len(tokenizer) + pad, [tokenizer.eos_token_id])
    return _COMPILERS[key]


def _walk(constraint: Any, tokens: list[int]) -> int:
    """How many of ``tokens`` our masks allow in turn."""
    for i, tok in enumerate(tokens):
        if not bool(constraint.allowed(tokens[:i])[tok]):
            return i
    return len(tokens)


@pytest.mark.parametrize(("schema", "text", "valid"), CASES)
def test_masks_agree_with_llguidance_and_jsonschema_on_whole_strings(tokenizer: Any, schema: dict[str, Any],
                                                                    text: str, valid: bool) -> None:
    from llguidance import LLMatcher

    assert (jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))) == valid  # the outside reference
    compiler = _compiler(tokenizer)
    spec = GrammarSpec("json_schema", json.dumps(schema), "response_format")
    tokens = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]] + [tokenizer.eos_token_id]
    ours = _walk(compiler.compile(spec)(), tokens)
    reference = LLMatcher(compiler.ll_tokenizer(), LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    assert ours == reference.validate_tokens(tokens)
    assert (ours == len(tokens)) == valid


def test_random_walks_over_the_masks_give_schema_valid_json(tokenizer: Any) -> None:
    """Uniformly random allowed tokens (a worst-case model) until only eos is allowed: valid JSON every time."""
    compiler = _compiler(tokenizer, pad=40)
    eos = tokenizer.eos_token_id
    rng = random.Random(7)
    for schema in (PERSON, SCORE, {"type": "array", "maxItems": 4, "items": {"type": ["boolean", "null"]}}):
        factory = compiler.compile(GrammarSpec("json_schema", json.dumps(schema)))
        for _ in range(3):
            constraint, out = factory(), []
            while True:
                mask = constraint.allowed(out)
                assert mask.shape == (len(tokenizer) + 40,) and not bool(mask[len(tokenizer):].any())  # padding
                allowed = mask.nonzero().flatten().tolist()
                if allowed == [eos]:
                    break
                tok = rng.choice(allowed)
                if tok == eos:
                    break
                out.append(tok)
                assert len(out) < 400, tokenizer.decode(out)
            jsonschema.validate(json.loads(tokenizer.decode(out)), schema)


def test_rollback_gives_the_masks_of_a_fresh_constraint(tokenizer: Any) -> None:
    compiler = _compiler(tokenizer)
    factory = compiler.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    tokens = [int(t) for t in tokenizer('{"name": "Ann", "age": 42, "tags": ["red"], "home": {"zip": "01234"}}',
                                        add_special_tokens=False)["input_ids"]]
    other = [int(t) for t in tokenizer('{"name": "Zed", "age": 7', add_special_tokens=False)["input_ids"]]
    constraint = factory()
    for i in range(len(tokens)):
        constraint.allowed(tokens[:i])
    for prefix in (tokens[:5], tokens[:2], tokens[:9], [], other, tokens[:3], tokens):  # shorter, other tails
        assert torch.equal(constraint.allowed(prefix), factory().allowed(prefix))


def test_a_finished_grammar_allows_only_the_eos_tokens(tokenizer: Any) -> None:
    extra = len(tokenizer) - 1  # any other id may serve as a second end-of-turn token
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id, extra])
    constraint = compiler.compile(GrammarSpec("json_object"))()
    done = [int(t) for t in tokenizer('{"a": [1, {}]}', add_special_tokens=False)["input_ids"]]
    assert sorted(constraint.allowed(done).nonzero().flatten().tolist()) == sorted({tokenizer.eos_token_id, extra})
    first = constraint.allowed([])
    assert all(tokenizer.decode([t]).startswith("{") for t in first.nonzero().flatten().tolist())


def test_bad_grammars_are_one_line_config_errors_and_compiles_are_cached(tokenizer: Any) -> None:
    compiler = _compiler(tokenizer)
    for spec, needle in [(GrammarSpec("json_schema", '{"type": "strnig"}', "response_format"), "strnig"),
                         (GrammarSpec("json_schema", "{not json", "response_format"), "not valid JSON"),
                         (GrammarSpec("json_schema", "[1]", "response_format"), "JSON schema is an object"),
                         (GrammarSpec("lark", "start: nothing_here", "tool_choice"), "nothing_here")]:
        with pytest.raises(ConfigError, match=needle) as info:
            compiler.compile(spec)
        assert "\n" not in str(info.value) and str(info.value).startswith(spec.name)
    spec = GrammarSpec("lark", 'start: "yes" | "no"')
    assert compiler.compile(spec)()._template is compiler.compile(spec)()._template
    small = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=2)
    for word in ("a", "b", "c"):
        small.compile(GrammarSpec("lark", f'start: "{word}"'))
    assert len(small._cache) == 2


def test_lark_grammars_embed_json_schemas(tokenizer: Any) -> None:
    """What tool calls use: a Lark grammar around a ``%json{...}`` schema; numbers may end at eos or go on."""
    from llguidance import LLMatcher

    compiler = _compiler(tokenizer)
    lark = 'start: "CALL " %json{"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}}'
    factory = compiler.compile(GrammarSpec("lark", lark, "tool_choice"))
    reference = LLMatcher(compiler.ll_tokenizer(), LLMatcher.grammar_from_lark(lark))
    for text, valid in (('CALL {"x": 5}', True), ('CALL {"y": 5}', False), ('{"x": 5}', False)):
        tokens = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]] + [tokenizer.eos_token_id]
        ours = _walk(factory(), tokens)
        reference.reset()
        assert ours == reference.validate_tokens(tokens) and (ours == len(tokens)) == valid
    digits = compiler.compile(GrammarSpec("lark", "start: /[0-9]{1,6}/"))()
    after = digits.allowed([int(t) for t in tokenizer("12", add_special_tokens=False)["input_ids"]])
    assert bool(after[tokenizer.eos_token_id]) and int(after.sum()) > 1  # may end, may go on


def test_a_matcher_that_cannot_roll_back_is_rebuilt_and_replayed(tokenizer: Any) -> None:
    compiler = _compiler(tokenizer)
    factory = compiler.compile(GrammarSpec("json_schema", json.dumps(SCORE)))
    tokens = [int(t) for t in tokenizer('{"score": 1.5, "ok": false}', add_special_tokens=False)["input_ids"]]

    class NoRollback:  # llguidance's matcher, refusing to roll back (as past its history limit)
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def rollback(self, n: int) -> bool:
            return False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    constraint = factory()
    constraint.allowed(tokens[:6])
    constraint._matcher = NoRollback(constraint._matcher)
    assert torch.equal(constraint.allowed(tokens[:3]), factory().allowed(tokens[:3]))
    assert torch.equal(constraint.allowed(tokens), factory().allowed(tokens))
