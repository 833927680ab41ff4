"""Parity of our engine with transformers on every tiny checkpoint (fp32).

For each family/variant: per-layer hidden states and logits close to ``output_hidden_states``; 32
greedy tokens identical to ``generate(do_sample=False)``, both token by token with the KV cache and
prefill-only (one forward over prompt + generated); a split run (span [0, k) then [k, n), separate
caches) equal to the whole model.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import list_tiny_checkpoints
from meshinfer.types import BlockRange

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250, 18, 333, 64, 7, 5, 6, 200, 201]
NEW_TOKENS = 32
VARIANTS = list_tiny_checkpoints()


class Case:
    """One checkpoint with our model, the reference model and the reference's greedy tokens."""

    def __init__(self, path: Path, ours: LocalModel, ref: Any, tokens: list[int]) -> None:
        self.path, self.ours, self.ref, self.tokens = path, ours, ref, tokens


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{f}-{v}" for f, v in VARIANTS])
def case(request: pytest.FixtureRequest, tiny_checkpoints, hf_model, our_model, hf_greedy) -> Case:
    path = tiny_checkpoints[request.param]
    ref = hf_model(path)
    return Case(path, our_model(path), ref, hf_greedy(ref, PROMPT, NEW_TOKENS))


def test_reference_is_not_degenerate(case: Case) -> None:
    # a model stuck on one token would make the token comparisons weak
    assert len(set(case.tokens)) >= 4, case.tokens


def test_hidden_states_and_logits_match(case: Case) -> None:
    with torch.no_grad():
        ref = case.ref(torch.tensor([PROMPT]), output_hidden_states=True)
    ours = case.ours.hidden_states(PROMPT)
    assert len(ours) == len(ref.hidden_states) == case.ours.spec.num_blocks + 1
    for layer, (a, b) in enumerate(zip(ours, ref.hidden_states, strict=True)):
        torch.testing.assert_close(a, b[0], atol=1e-4, rtol=1e-4, msg=lambda m, i=layer: f"layer {i}: {m}")
    torch.testing.assert_close(case.ours.prefill_logits(PROMPT), ref.logits[0].float(), atol=1e-4, rtol=1e-4)


def test_greedy_decode_with_cache_matches_generate(case: Case) -> None:
    assert case.ours.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == case.tokens


def test_greedy_prefill_only_matches_generate(case: Case) -> None:
    seq = list(PROMPT)
    for _ in range(NEW_TOKENS):
        seq.append(int(case.ours.prefill_logits(seq)[-1].argmax()))
    assert seq[len(PROMPT) :] == case.tokens
    # and the logits of one forward over the whole sequence match the reference's
    with torch.no_grad():
        ref = case.ref(torch.tensor([seq])).logits[0].float()
    torch.testing.assert_close(case.ours.prefill_logits(seq), ref, atol=1e-4, rtol=1e-4)


def test_scored_greedy_decode_matches_the_reference_log_probabilities(case: Case) -> None:
    """Each generated token's log-probability and its top 5 come from the reference's own distribution:
    log_softmax of transformers' logits over prompt + generated tokens, position by position."""
    scored = list(case.ours.stream_scored(PROMPT, NEW_TOKENS, stop_token_ids=(), top_logprobs=5))
    assert [s.token for s in scored] == case.tokens
    with torch.no_grad():
        ref = torch.log_softmax(case.ref(torch.tensor([PROMPT + case.tokens])).logits[0].float(), dim=-1)  # [T, V]
    for i, s in enumerate(scored):
        row = ref[len(PROMPT) - 1 + i]  # the distribution the i-th new token was drawn from
        assert s.logprob == pytest.approx(float(row[s.token]), abs=1e-4)
        assert len(s.top) == 5 and s.top[0][0] == s.token  # greedy: the chosen token is the most likely
        assert [lp for _, lp in s.top] == sorted((lp for _, lp in s.top), reverse=True)
        assert [lp for _, lp in s.top] == pytest.approx(torch.topk(row, 5).values.tolist(), abs=1e-4)
        assert all(lp == pytest.approx(float(row[t]), abs=1e-4) for t, lp in s.top)
    assert [s.token for s in case.ours.stream_scored(PROMPT, 4, stop_token_ids=())] == case.tokens[:4]
    assert all(s.logprob is None and s.top == () for s in case.ours.stream_scored(PROMPT, 2, stop_token_ids=()))


def test_prompt_scores_match_the_reference_log_probabilities(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    import meshinfer.models.engine as engine

    monkeypatch.setattr(engine, "SCORE_CHUNK", 5)  # several LM-head chunks over the 16 prompt positions
    scored = case.ours.score_prompt(PROMPT, top_logprobs=3)
    with torch.no_grad():
        ref = torch.log_softmax(case.ref(torch.tensor([PROMPT])).logits[0].float(), dim=-1)  # [T, V]
    assert [s.token for s in scored] == PROMPT[1:]
    for i, s in enumerate(scored):  # position i predicts token i + 1
        assert s.logprob == pytest.approx(float(ref[i, PROMPT[i + 1]]), abs=1e-4)
        assert [t for t, _ in s.top] == torch.topk(ref[i], 3).indices.tolist()
    assert case.ours.score_prompt(PROMPT[:1]) == []  # nothing before the first token to score it by


def test_decode_logits_match_prefill_logits(case: Case) -> None:
    seq = PROMPT + case.tokens
    full = case.ours.prefill_logits(seq)  # [T, V]
    head, span = case.ours.head, case.ours.span
    with torch.inference_mode():
        cache = span.new_cache(len(seq))
        span(head.embed(torch.tensor([PROMPT])), cache)
        for i in range(len(PROMPT), len(seq)):
            step = head.logits(span(head.embed(torch.tensor([[seq[i]]])), cache))[0, -1]  # [V]
            torch.testing.assert_close(step, full[i], atol=1e-4, rtol=1e-4)
    assert cache.length == len(seq)


def _greedy_through_spans(path: Path, cuts: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    ckpt = Checkpoint(path)
    head = ckpt.load_head()
    bounds = [0, *cuts, ckpt.spec.num_blocks]
    spans = [ckpt.load_span(BlockRange(a, b)) for a, b in pairwise(bounds)]
    caches = [s.new_cache(len(PROMPT) + n) for s in spans]
    tokens: list[int] = []
    with torch.inference_mode():
        x = head.embed(torch.tensor([PROMPT]))
        for span, cache in zip(spans, caches, strict=True):
            x = span(x, cache)
        first_logits = head.logits(x)[0]  # [T, V]
        logits = first_logits[-1]
        for _ in range(n):
            tokens.append(int(logits.argmax()))
            x = head.embed(torch.tensor([[tokens[-1]]]))
            for span, cache in zip(spans, caches, strict=True):
                x = span(x, cache)
            logits = head.logits(x)[0, -1]
    return tokens, first_logits


def test_split_spans_equal_whole_model(case: Case) -> None:
    n = case.ours.spec.num_blocks
    for cuts in ([1], [n // 2], [1, 2, 3]):
        tokens, logits = _greedy_through_spans(case.path, cuts, NEW_TOKENS)
        assert tokens == case.tokens, cuts
        torch.testing.assert_close(logits, case.ours.prefill_logits(PROMPT), atol=1e-5, rtol=1e-5)
