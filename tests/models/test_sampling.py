"""Sampler vs Hugging Face's logits processors, plus greedy, seeding and the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError
from meshinfer.models.sampling import (
    Sampler,
    ScoredToken,
    apply_repetition_penalty,
    score_token,
    top_k_filter,
    top_p_filter,
)

VOCAB = 97


def _random_case(seed: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g) * 3.0  # [vocab], both signs
    history = torch.randint(0, VOCAB, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
    return logits, history


def _hf_scores(logits: torch.Tensor, history: list[int], cfg: SamplingConfig) -> torch.Tensor:
    ids = torch.tensor([history], dtype=torch.long)  # [1, n]
    scores = logits[None].clone()  # [1, vocab]
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    if cfg.greedy:
        return scores[0]
    scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    if cfg.top_k > 0:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
@pytest.mark.parametrize("seed", range(5))
def test_repetition_penalty_matches_hf(penalty: float, seed: int) -> None:
    logits, history = _random_case(seed)
    ours = apply_repetition_penalty(logits, history, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if penalty != 1.0:  # the case is not vacuous: seen logits did change
        assert not torch.equal(ours, logits)


CONFIGS = [
    SamplingConfig(temperature=0.0, repetition_penalty=1.2),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.3, top_k=5),
    SamplingConfig(temperature=1.0, top_p=0.9),
    SamplingConfig(temperature=0.8, top_k=20, top_p=0.5, repetition_penalty=1.1),
    SamplingConfig(temperature=2.0, top_p=0.05),
    SamplingConfig(temperature=0.5, top_k=1),
    SamplingConfig(temperature=1.0, top_k=VOCAB + 10, top_p=0.999),
]


def _cfg_id(c: SamplingConfig) -> str:
    return f"T{c.temperature}-k{c.top_k}-p{c.top_p}-r{c.repetition_penalty}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("seed", range(6))
def test_processed_logits_match_hf_chain(cfg: SamplingConfig, seed: int) -> None:
    logits, history = _random_case(100 + seed)
    ours = Sampler(cfg).processed_logits(logits, history)
    theirs = _hf_scores(logits, history, cfg)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_top_k_and_top_p_keep_expected_sets() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0])
    kept = torch.isfinite(top_k_filter(scores, 2))
    assert kept.tolist() == [False, True, False, True, False]
    kept = torch.isfinite(top_k_filter(scores, 3))
    assert kept.tolist() == [False, True, True, True, False]
    # top-p with a tiny p keeps exactly the most likely token.
    kept = torch.isfinite(top_p_filter(torch.tensor([0.1, 5.0, 0.2]), 1e-6))
    assert kept.tolist() == [False, True, False]
    # p = 1 disables the filter.
    assert torch.isfinite(top_p_filter(scores, 1.0)).all()


def test_greedy_is_argmax_after_penalty() -> None:
    logits = torch.tensor([0.0, 2.0, 1.9, -3.0])
    assert Sampler(SamplingConfig()).next_token(logits, []) == 1
    # Token 1 was seen: 2.0 / 1.5 = 1.33 < 1.9, so token 2 wins.
    assert Sampler(SamplingConfig(repetition_penalty=1.5)).next_token(logits, [1, 1]) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits_are_processed_in_float32(dtype: torch.dtype) -> None:
    logits, history = _random_case(7)
    cfg = SamplingConfig(temperature=0.9, top_k=10, repetition_penalty=1.2, seed=3)
    scores = Sampler(cfg).processed_logits(logits.to(dtype), history)
    assert scores.dtype == torch.float32
    token = Sampler(cfg).next_token(logits.to(dtype), history)
    assert 0 <= token < VOCAB and torch.isfinite(scores[token])


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(VOCAB, generator=g) for _ in range(60)]

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingConfig(temperature=1.5, top_p=0.95, seed=seed))
        history: list[int] = []
        for row in rows:
            history.append(sampler.next_token(row, history))
        return history

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_always_picks_argmax() -> None:
    logits, _ = _random_case(11)
    sampler = Sampler(SamplingConfig(temperature=5.0, top_k=1, seed=1))
    want = int(torch.argmax(logits))
    assert {sampler.next_token(logits, []) for _ in range(50)} == {want}


def test_sampled_frequencies_follow_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    temperature = 0.8
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=123))
    n = 6000
    counts = torch.zeros(5)
    for _ in range(n):
        counts[sampler.next_token(logits, [])] += 1
    expected = torch.softmax(logits / temperature, dim=-1)
    # 4 standard deviations of a binomial proportion: fails only on a real bias.
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((counts / n - expected).abs() < tolerance), (counts / n, expected)


def test_sampling_never_leaves_the_nucleus() -> None:
    logits, history = _random_case(21)
    cfg = SamplingConfig(temperature=1.0, top_p=0.6, top_k=30, repetition_penalty=1.3, seed=5)
    sampler = Sampler(cfg)
    allowed = torch.isfinite(_hf_scores(logits, history, cfg)).nonzero().flatten().tolist()
    drawn = {sampler.next_token(logits, history) for _ in range(200)}
    assert drawn <= set(allowed)
    assert len(drawn) > 1  # it really samples


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="shape"):
        Sampler().next_token(torch.zeros(2, VOCAB), [])
    with pytest.raises(ConfigError, match="negative"):
        Sampler(SamplingConfig(repetition_penalty=1.2)).next_token(torch.zeros(VOCAB), [-1])
    # Ids beyond the vocabulary are ignored by the penalty, as in HF.
    assert Sampler(SamplingConfig(repetition_penalty=1.2)).next_token(torch.arange(5.0), [3, 10]) == 4


def test_score_token_is_log_softmax_of_the_raw_logits() -> None:
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0], dtype=torch.bfloat16)
    got = score_token(logits, 1, top=3)
    want = torch.log_softmax(logits.float(), dim=-1)
    assert isinstance(got, ScoredToken) and got.token == 1
    assert got.logprob == pytest.approx(float(want[1]))
    assert [t for t, _ in got.top] == [2, 0, 1]
    assert [lp for _, lp in got.top] == pytest.approx([float(want[2]), float(want[0]), float(want[1])])
    assert sum(math.exp(lp) for lp in want.tolist()) == pytest.approx(1.0)
    assert score_token(logits, 3, top=0).top == ()
    assert len(score_token(logits, 0, top=20).top) == 4  # no more alternatives than the vocabulary has


@pytest.mark.parametrize(("shape", "top", "message"), [((4,), -1, "top must be in 0..20"), ((4,), 21, "0..20"),
                                                       ((2, 4), 1, "shape \\[vocab\\]")])
def test_score_token_refuses_bad_input(shape: tuple[int, ...], top: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        score_token(torch.zeros(shape), 0, top)
