"""``BlockSpan.forward_batch``: a ragged batch of sessions equals running each session alone.

Every session has two caches fed the same inputs: one run alone with ``forward`` (the reference),
one run inside batches with ``forward_batch``. Each step compares the outputs (fp32: 1e-4 absolute), the
greedy token of the head on them, and the cache lengths; at the end the cached keys/values. Covers
every tiny family/variant (8 sessions, batched prefills, 10 batched decode steps in changing order
with sessions skipping steps), mixed decode + prefill-chunk batches, sliding windows shorter than
the sequences, single items, empty items and the errors raised before any cache is touched.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from meshinfer.errors import ConfigError, ContextOverflowError, UsageError
from meshinfer.models.engine import LocalModel
from meshinfer.models.kv_cache import KVCache
from meshinfer.testing.checkpoints import list_tiny_checkpoints

VARIANTS = list_tiny_checkpoints()
PROMPT_LENGTHS = [1, 3, 5, 8, 13, 2, 21, 9]  # 8 sessions
PREFILL_GROUPS = [[0, 1, 2], [3], [4, 5, 6, 7]]  # [3] alone takes the single-item path
DECODE_STEPS = 10
MAX_LENGTH = 48
ATOL = 1e-4  # fp32 rounding: the single path's own two linear kernels (oneDNN / F.linear) differ by ~4e-5


class Twin:
    """One session with a cache run alone (reference) and a cache run in batches, fed the same tokens."""

    def __init__(self, model: LocalModel, prompt: list[int], max_length: int = MAX_LENGTH) -> None:
        self.prompt = prompt
        self.alone = model.span.new_cache(max_length)
        self.batched = model.span.new_cache(max_length)
        self.fed = 0  # tokens sent so far: both caches must hold exactly this many
        self.next_token: int | None = None  # greedy choice after the last step

    def step(self) -> list[int]:
        """The next decode input: the greedy token after the last step."""
        assert self.next_token is not None
        return [self.next_token]


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_both(model: LocalModel, steps: list[tuple[Twin, list[int]]]) -> list[torch.Tensor]:
    """Run ``steps`` (session, token ids) alone and as one batch; assert they agree; outputs [T_i, H]."""
    hidden = [model.head.embed(torch.tensor([ids]))[0] for _, ids in steps]  # each [T_i, H]
    alone = [model.span(h[None], twin.alone)[0] for h, (twin, _) in zip(hidden, steps, strict=True)]
    batched = model.span.forward_batch([(h, twin.batched) for h, (twin, _) in zip(hidden, steps, strict=True)])
    assert len(batched) == len(steps)
    for n, (a, b, (twin, ids)) in enumerate(zip(alone, batched, steps, strict=True)):
        assert b.shape == (len(ids), model.spec.hidden_size), n
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=lambda m, n=n: f"item {n}: {m}")
        twin.fed += len(ids)
        assert twin.batched.length == twin.alone.length == twin.fed, n
        expected = int(model.head.logits(a[-1]).argmax())
        assert int(model.head.logits(b[-1]).argmax()) == expected, n
        twin.next_token = expected
    return alone


def assert_caches_equal(model: LocalModel, twins: list[Twin]) -> None:
    for n, twin in enumerate(twins):
        length = twin.alone.length
        assert twin.batched.length == length
        for block in range(len(model.span)):
            for get in (KVCache.keys, KVCache.values):
                a = get(twin.alone, block)[:, :, :length]
                b = get(twin.batched, block)[:, :, :length]
                torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=lambda m, n=n: f"session {n}: {m}")


def decode_all(model: LocalModel, twins: list[Twin], steps: int, skip_every: int = 4) -> None:
    """``steps`` batched decode turns over ``twins`` in a rotating order; some sessions skip turns."""
    for step in range(steps):
        present = [t for j, t in enumerate(twins) if (j + step) % skip_every or step == steps - 1]
        k = step % len(present)
        batch = present[k:] + present[:k]  # a different item order every turn
        outputs = run_both(model, [(t, t.step()) for t in batch])
        # the sessions really differ, so a mixed-up item order or offset would show
        assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{f}-{v}" for f, v in VARIANTS])
def model(request: pytest.FixtureRequest, tiny_checkpoints, our_model) -> LocalModel:
    return our_model(tiny_checkpoints[request.param])


def test_many_sessions_batched_equal_alone(model: LocalModel) -> None:
    rng = random.Random(6)
    twins = [Twin(model, _prompt(rng, n, model.spec.vocab_size)) for n in PROMPT_LENGTHS]
    for group in PREFILL_GROUPS:
        run_both(model, [(twins[i], twins[i].prompt) for i in group])
    decode_all(model, twins, DECODE_STEPS)
    assert all(t.alone.length > len(t.prompt) + DECODE_STEPS // 2 for t in twins)
    assert_caches_equal(model, twins)


def test_mixed_decode_and_prefill_chunks(model: LocalModel) -> None:
    rng = random.Random(7)
    a, b, c, d = (Twin(model, _prompt(rng, n, model.spec.vocab_size)) for n in (6, 4, 11, 9))
    run_both(model, [(a, a.prompt), (b, b.prompt), (d, d.prompt[:3])])
    # decode steps, a first chunk (start 0) and a later chunk (start > 0) in one batch
    run_both(model, [(a, a.step()), (c, c.prompt[:5]), (b, b.step()), (d, d.prompt[3:])])
    run_both(model, [(c, c.prompt[5:]), (a, a.step()), (d, d.step())])
    decode_all(model, [a, b, c, d], 3, skip_every=100)
    assert_caches_equal(model, [a, b, c, d])


# ---- sliding window ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def windowed(request: pytest.FixtureRequest, tiny_checkpoints, tmp_path_factory) -> LocalModel:
    """A tiny model with a sliding window of 5, shorter than the test sequences (qwen2: blocks 2, 3 only)."""
    src = tiny_checkpoints[(request.param, "default")]
    dst: Path = tmp_path_factory.mktemp("window") / request.param
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["sliding_window"] = 5
    if request.param == "qwen2":
        config.update(use_sliding_window=True, max_window_layers=2)
    (dst / "config.json").write_text(json.dumps(config))
    return LocalModel.from_pretrained(dst)


def test_sliding_window_batched_equal_alone(windowed: LocalModel) -> None:
    model = windowed
    assert model.spec.sliding_window == 5
    rng = random.Random(8)
    twins = [Twin(model, _prompt(rng, n, model.spec.vocab_size)) for n in (2, 7, 12, 4)]
    # first chunks (a 7-token one from 0: masked by the window), then later chunks at start > 0
    run_both(model, [(t, t.prompt[:2]) for t in twins[:3]] + [(twins[3], twins[3].prompt)])
    run_both(model, [(t, t.prompt[2:]) for t in twins[1:3]] + [(twins[0], twins[0].step())])
    decode_all(model, twins, DECODE_STEPS)
    assert min(t.alone.length for t in twins) >= 2 * model.spec.sliding_window
    assert_caches_equal(model, twins)


# ---- single items, empty items, dtypes --------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_checkpoints, our_model) -> LocalModel:
    return our_model(tiny_checkpoints[("llama", "default")])


@pytest.mark.parametrize("tokens", [1, 7])
def test_single_item_is_bit_equal_to_forward(llama: LocalModel, tokens: int) -> None:
    hidden = llama.head.embed(torch.tensor([list(range(10, 10 + tokens))]))[0]  # [T, H]
    c1, c2 = llama.span.new_cache(16), llama.span.new_cache(16)
    expected = llama.span(hidden[None], c1)[0]
    [out] = llama.span.forward_batch([(hidden, c2)])
    assert torch.equal(out, expected)
    assert c2.length == c1.length == tokens


def test_empty_batch_and_empty_items(llama: LocalModel) -> None:
    assert llama.span.forward_batch([]) == []
    h = llama.spec.hidden_size
    empty, cache_e = torch.zeros(0, h), llama.span.new_cache(8)
    hidden = llama.head.embed(torch.tensor([[5, 6, 7]]))[0]
    c1, c2, c3 = (llama.span.new_cache(8) for _ in range(3))
    out = llama.span.forward_batch([(empty, cache_e), (hidden, c1), (hidden[:2], c2)])
    assert out[0].shape == (0, h) and cache_e.length == 0
    torch.testing.assert_close(out[1], llama.span(hidden[None], c3)[0], atol=ATOL, rtol=0)
    assert (c1.length, c2.length) == (3, 2)


def test_bf16_batch_close_to_alone(tiny_checkpoints, our_model) -> None:
    model = our_model(tiny_checkpoints[("llama", "default")], "bfloat16")
    rng = random.Random(9)
    prompts = [_prompt(rng, n, model.spec.vocab_size) for n in (3, 9, 1)]
    hidden = [model.head.embed(torch.tensor([p]))[0].float() for p in prompts]  # fp32 in: cast by the span
    alone = [model.span(h[None].to(torch.bfloat16), model.span.new_cache(16))[0] for h in hidden]
    batched = model.span.forward_batch([(h, model.span.new_cache(16)) for h in hidden])
    for a, b in zip(alone, batched, strict=True):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.05)


# ---- errors: raised before any cache is touched ------------------------------------------------


def _zeroed(cache: KVCache, blocks: int) -> KVCache:
    for block in range(blocks):
        cache.keys(block).zero_()
        cache.values(block).zero_()
    return cache


@pytest.mark.parametrize(
    "bad",
    [
        "hidden_size",
        "hidden_3d",
        "cache_blocks",
        "cache_batch",
        "cache_heads",
        "cache_dtype",
        "same_cache",
        "overflow",
    ],
)
def test_bad_batches_raise_and_leave_caches_alone(llama: LocalModel, tiny_checkpoints, our_model, bad: str) -> None:
    span, spec = llama.span, llama.spec
    n = len(span)
    good = _zeroed(span.new_cache(8), n)
    span(llama.head.embed(torch.tensor([[3, 4]])), good)  # length 2, slots 2.. still zero
    before = [(good.keys(b).clone(), good.values(b).clone()) for b in range(n)]
    hidden = llama.head.embed(torch.tensor([[5, 6, 7]]))[0]  # [3, H]
    other = span.new_cache(8)
    expected: type[Exception] = ConfigError
    if bad == "hidden_size":
        item = (torch.zeros(3, spec.hidden_size + 1), other)
    elif bad == "hidden_3d":
        item = (hidden[None], other)
    elif bad == "cache_blocks":
        item = (hidden, KVCache(spec, n - 1, 8))
    elif bad == "cache_batch":
        item = (hidden, span.new_cache(8, batch=2))
    elif bad == "cache_heads":  # a cache of another model with as many blocks (qwen3: head_dim 32)
        qwen3 = our_model(tiny_checkpoints[("qwen3", "default")])
        item = (hidden, qwen3.span.new_cache(8))
    elif bad == "cache_dtype":
        item = (hidden, KVCache(spec, n, 8, dtype=torch.bfloat16))
    elif bad == "same_cache":
        item, expected = (hidden, good), UsageError
    else:
        item, expected = (torch.cat([hidden, hidden, hidden]), span.new_cache(8)), ContextOverflowError
    with pytest.raises(expected, match="batch item 1") as info:
        span.forward_batch([(hidden, good), item])
    assert "\n" not in str(info.value)
    assert good.length == 2 and (item[1] is good or item[1].length == 0)
    for b, (k, v) in enumerate(before):
        assert torch.equal(good.keys(b), k) and torch.equal(good.values(b), v)
