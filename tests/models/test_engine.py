"""LocalModel and BlockSpan behaviour: limits, stopping, dtypes, cache operations, sliding windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError, ContextOverflowError, UsageError
from meshinfer.models import ops
from meshinfer.models.engine import LocalModel

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250, 18, 333, 64, 7, 5, 6, 200, 201]


@pytest.fixture(scope="module")
def llama_path(tiny_checkpoints) -> Path:
    return tiny_checkpoints[("llama", "default")]


@pytest.fixture(scope="module")
def model(llama_path: Path, our_model) -> LocalModel:
    return our_model(llama_path)


# ---- limits and bad input ---------------------------------------------------------------------


def test_prompt_longer_than_context(model: LocalModel) -> None:
    limit = model.spec.max_position_embeddings
    with pytest.raises(ContextOverflowError) as err:
        model.generate([5] * (limit + 1), 4)
    assert f"{limit + 1} tokens" in str(err.value) and f"context is {limit}" in str(err.value)
    with pytest.raises(ContextOverflowError, match=f"= {limit + 4} exceeds the model's context of {limit}"):
        model.generate([5] * limit, 4)
    with pytest.raises(ContextOverflowError):
        model.prefill_logits([5] * (limit + 1))
    assert len(model.generate([5] * (limit - 2), 2, stop_token_ids=())) == 2  # right at the limit is fine


@pytest.mark.parametrize(
    ("ids", "n", "needle"),
    [([], 4, "prompt is empty"), ([1, 2, 512], 4, "outside the vocabulary"), ([1, -1], 4, "outside"),
     ([1, 2], -1, "max_new_tokens must be >= 0")],
)
def test_bad_generation_input(model: LocalModel, ids: list[int], n: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        model.generate(ids, n)


def test_span_rejects_bad_hidden_and_overflow(model: LocalModel) -> None:
    span = model.span
    with torch.inference_mode():
        cache = span.new_cache(4)
        with pytest.raises(ConfigError, match="hidden states must have shape"):
            span(torch.zeros(1, 2, model.spec.hidden_size + 1), cache)
        with pytest.raises(ConfigError, match="does not fit"):
            span(torch.zeros(2, 2, model.spec.hidden_size), cache)
        span(torch.zeros(1, 3, model.spec.hidden_size), cache)
        with pytest.raises(ContextOverflowError, match="3 cached \\+ 2 new tokens exceed the cache length 4"):
            span(torch.zeros(1, 2, model.spec.hidden_size), cache)
        assert cache.length == 3


# ---- generation API ---------------------------------------------------------------------------


def test_stream_yields_what_generate_returns(model: LocalModel) -> None:
    tokens = model.generate(PROMPT, 12, stop_token_ids=())
    assert list(model.stream(PROMPT, 12, stop_token_ids=())) == tokens
    assert model.generate(PROMPT, 0) == []
    # the stream is lazy and leaves inference mode between tokens
    it = model.stream(PROMPT, 12, stop_token_ids=())
    assert next(it) == tokens[0] and not torch.is_inference_mode_enabled()


def test_stops_after_a_stop_token(model: LocalModel) -> None:
    tokens = model.generate(PROMPT, 16, stop_token_ids=())
    stop = tokens[5]
    first = tokens.index(stop)
    assert model.generate(PROMPT, 16, stop_token_ids={stop}) == tokens[: first + 1]


def test_default_stop_tokens_are_the_models_eos(model: LocalModel) -> None:
    tokens = model.generate(PROMPT, 8, stop_token_ids=())
    spec = model.spec
    try:
        object.__setattr__(spec, "eos_token_ids", (tokens[2],))
        assert model.generate(PROMPT, 8) == tokens[: tokens.index(tokens[2]) + 1]
    finally:
        object.__setattr__(spec, "eos_token_ids", ModelSpecEos.value)


class ModelSpecEos:
    value: tuple[int, ...] = ()


@pytest.fixture(autouse=True, scope="module")
def _remember_eos(model: LocalModel) -> None:
    ModelSpecEos.value = model.spec.eos_token_ids


def test_seeded_sampling_is_reproducible(model: LocalModel) -> None:
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=7)
    a = model.generate(PROMPT, 16, sampling, stop_token_ids=())
    assert a == model.generate(PROMPT, 16, sampling, stop_token_ids=())
    others = [model.generate(PROMPT, 16, SamplingConfig(temperature=0.9, top_p=0.95, seed=s), stop_token_ids=())
              for s in (8, 9)]
    assert any(o != a for o in others)


def test_tokenizer_round_trip(model: LocalModel) -> None:
    ids = model.tokenizer.encode("The keeper climbed the tower", add_special_tokens=False)
    assert model.tokenizer.decode(ids).strip() == "The keeper climbed the tower"


# ---- dtypes and the fast linear path ----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_stays_close(llama_path: Path, model: LocalModel, hf_model, dtype: str) -> None:
    half = LocalModel.from_pretrained(llama_path, dtype=dtype)
    assert half.span.layers[0].qkv.weight.dtype == getattr(torch, dtype)
    ours = half.prefill_logits(PROMPT)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    exact = model.prefill_logits(PROMPT)
    with torch.no_grad():
        ref = hf_model(llama_path, getattr(torch, dtype))(torch.tensor([PROMPT])).logits[0].float()
    hf_err = float((ref - exact).abs().max())
    our_err = float((ours - exact).abs().max())
    assert our_err <= 2 * hf_err + 0.05, (our_err, hf_err)
    assert len(half.generate(PROMPT, 8, stop_token_ids=())) == 8


def test_fast_linear_matches_plain_linear(model: LocalModel) -> None:
    previous = ops.set_fast_linear(True)
    try:
        fast = model.generate(PROMPT, 24, stop_token_ids=())
        fast_logits = model.prefill_logits(PROMPT[:1])
        ops.set_fast_linear(False)
        plain = model.generate(PROMPT, 24, stop_token_ids=())
        plain_logits = model.prefill_logits(PROMPT[:1])
    finally:
        ops.set_fast_linear(previous)
    assert fast == plain
    torch.testing.assert_close(fast_logits, plain_logits, atol=1e-4, rtol=1e-4)


def test_autotune_picks_a_kernel_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ops._state, "tuned", False)
    monkeypatch.setitem(ops._state, "fast", False)
    weights = [torch.randn(1024, 2048) for _ in range(2)]  # 16 MiB: large enough to be timed
    chosen = ops.autotune_linear(weights, rounds=1)
    assert ops._state["tuned"] and ops.fast_linear_enabled() == chosen
    monkeypatch.setitem(ops._state, "fast", not chosen)  # a second call keeps the first decision
    assert ops.autotune_linear(weights) == (not chosen)


def test_autotune_leaves_a_small_model_on_plain_linear(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test-sized model is not timed (cache-resident weights: noise), so every process computes it alike;
    a larger model loaded later in the same process is still timed."""
    monkeypatch.setitem(ops._state, "tuned", False)
    monkeypatch.setitem(ops._state, "fast", False)
    small = ops.layer_weights(model.span)
    assert sum(w.numel() * 4 for w in small) < ops.AUTOTUNE_MIN_BYTES
    assert ops.autotune_linear(small) is False
    assert not ops._state["tuned"]
    ops.autotune_linear([torch.randn(1024, 2048) for _ in range(2)], rounds=1)
    assert ops._state["tuned"]


# ---- cache operations -------------------------------------------------------------------------


def _run(model: LocalModel, chunks: list[list[int]], cache: Any = None) -> torch.Tensor:
    """Feed ``chunks`` of token ids through the span one after another; logits of every token [T, V]."""
    with torch.inference_mode():
        cache = cache or model.span.new_cache(sum(map(len, chunks)))
        outs = [model.head.logits(model.span(model.head.embed(torch.tensor([c])), cache))[0] for c in chunks]
        return torch.cat(outs)


def test_chunked_prefill_equals_one_prefill(model: LocalModel) -> None:
    whole = model.prefill_logits(PROMPT)
    for chunks in ([PROMPT[:5], PROMPT[5:]], [PROMPT[:1], PROMPT[1:9], PROMPT[9:10], PROMPT[10:]]):
        torch.testing.assert_close(_run(model, chunks), whole, atol=1e-4, rtol=1e-4)


def test_truncate_and_replay(model: LocalModel) -> None:
    with torch.inference_mode():
        cache = model.span.new_cache(len(PROMPT) + 4)
        first = _run(model, [PROMPT], cache)
        cache.truncate(6)
        again = _run(model, [PROMPT[6:]], cache)
        assert cache.length == len(PROMPT)
        cache.reset()
        fresh = _run(model, [PROMPT], cache)
    torch.testing.assert_close(again, first[6:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh, first, atol=0, rtol=0)
    with pytest.raises(UsageError, match="cannot truncate"):
        cache.truncate(cache.length + 1)


def test_batch_rows_are_independent(model: LocalModel) -> None:
    other = [(t * 7 + 3) % model.spec.vocab_size for t in PROMPT]
    with torch.inference_mode():
        cache = model.span.new_cache(len(PROMPT), batch=2)
        hidden = model.span(model.head.embed(torch.tensor([PROMPT, other])), cache)  # [2, T, H]
        logits = model.head.logits(hidden)
    torch.testing.assert_close(logits[0], model.prefill_logits(PROMPT), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], model.prefill_logits(other), atol=1e-4, rtol=1e-4)


def test_explicit_positions_equal_default(model: LocalModel) -> None:
    with torch.inference_mode():
        x = model.head.embed(torch.tensor([PROMPT]))
        a = model.span(x, model.span.new_cache(len(PROMPT)))
        b = model.span(x, model.span.new_cache(len(PROMPT)), positions=torch.arange(len(PROMPT)))
        c = model.span(x, model.span.new_cache(len(PROMPT)), positions=torch.arange(len(PROMPT)) + 3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


# ---- sliding window ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def windowed(request: pytest.FixtureRequest, tiny_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of a tiny checkpoint with a sliding window shorter than the test sequences, the original)."""
    src = tiny_checkpoints[(request.param, "default")]
    dst = tmp_path_factory.mktemp("window") / request.param
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["sliding_window"] = 5
    if request.param == "qwen2":
        config.update(use_sliding_window=True, max_window_layers=2)  # blocks 2 and 3 slide
    (dst / "config.json").write_text(json.dumps(config))
    return dst, src


def test_sliding_window_matches_transformers(windowed: tuple[Path, Path], our_model, hf_model, hf_greedy) -> None:
    path, unwindowed = windowed
    ours = LocalModel.from_pretrained(path)
    assert ours.spec.sliding_window == 5
    ref = hf_model(path)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(ours.prefill_logits(PROMPT), expected, atol=1e-4, rtol=1e-4)
    # the window must matter, or this test would prove nothing
    assert not torch.allclose(our_model(unwindowed).prefill_logits(PROMPT), expected, atol=1e-2)
    tokens = hf_greedy(ref, PROMPT, 24)
    assert ours.generate(PROMPT, 24, stop_token_ids=()) == tokens
    torch.testing.assert_close(_run(ours, [PROMPT[:3], PROMPT[3:11], PROMPT[11:]]), expected, atol=1e-4, rtol=1e-4)


def test_span_runs_whatever_the_callers_autograd_mode(model: LocalModel) -> None:
    x = model.head.embed(torch.tensor([PROMPT]))
    with torch.inference_mode():
        expected = model.span(x, model.span.new_cache(len(PROMPT)))
    made_outside = model.span.new_cache(len(PROMPT))
    made_inside = None
    with torch.inference_mode():
        made_inside = model.span.new_cache(len(PROMPT))
    with torch.no_grad():
        torch.testing.assert_close(model.span(x, made_outside), expected, atol=0, rtol=0)
    torch.testing.assert_close(model.span(x.clone(), made_inside), expected, atol=0, rtol=0)
