"""logit_bias, presence/frequency penalties and min_p (``models.penalties``) against outside references:
Hugging Face's ``SequenceBiasLogitsProcessor`` and its full warper chain with ``MinPLogitsWarper``, a numpy
rendering of OpenAI's documented penalty formula; and speculative decoding with them equal to plain decoding."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from meshinfer.config import SamplingConfig, parse_logit_bias
from meshinfer.errors import ConfigError
from meshinfer.models.penalties import LogitBias, apply_logit_bias, apply_presence_frequency, min_p_filter
from meshinfer.models.sampling import Sampler
from meshinfer.models.speculate import accept, prompt_lookup

VOCAB = 97


def _ids(history: list[int]) -> torch.LongTensor:
    return cast(torch.LongTensor, torch.tensor([history], dtype=torch.long))  # [1, n]


def _case(seed: int) -> tuple[torch.Tensor, list[int], list[tuple[int, float]]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g) * 3.0  # [vocab]
    history = torch.randint(0, VOCAB, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
    ids = torch.randperm(VOCAB, generator=g)[:8].tolist()
    biases = ((torch.rand(8, generator=g) - 0.5) * 20).tolist()
    return logits, history, list(zip(ids, biases, strict=True))


@pytest.mark.parametrize("seed", range(5))
def test_logit_bias_matches_hf_sequence_bias(seed: int) -> None:
    logits, history, pairs = _case(seed)
    ours = apply_logit_bias(logits.clone(), LogitBias(pairs))
    hf = SequenceBiasLogitsProcessor([[[t], b] for t, b in pairs])
    theirs = hf(_ids(history), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(ours, logits)


def _openai_reference(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's documented formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = np.zeros_like(logits)
    for token in generated:
        counts[token] += 1
    return logits - counts * frequency - (counts > 0).astype(logits.dtype) * presence


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 0.5), (1.5, 0.0), (-0.7, 2.0), (2.0, -2.0)])
@pytest.mark.parametrize("seed", range(4))
def test_presence_frequency_match_openais_formula_over_generated_tokens_only(presence: float, frequency: float,
                                                                             seed: int) -> None:
    logits, history, _ = _case(10 + seed)
    prompt_len = len(history) // 2
    ours = apply_presence_frequency(logits.clone(), history, prompt_len, presence, frequency)
    theirs = _openai_reference(logits.numpy().astype(np.float64), history[prompt_len:], presence, frequency)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)
    only_prompt = [t for t in history[:prompt_len] if t not in history[prompt_len:]]
    if only_prompt:  # a token only the prompt holds is not penalised
        assert ours[only_prompt[0]] == logits[only_prompt[0]]
    # through the Sampler (greedy keeps the processed row as it is)
    cfg = SamplingConfig(presence_penalty=presence, frequency_penalty=frequency)
    row = Sampler(cfg, prompt_len=prompt_len).processed_logits(logits, history)
    np.testing.assert_allclose(row.numpy(), theirs, rtol=0, atol=1e-5)


def _hf_chain(logits: torch.Tensor, history: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """``transformers``' processors in ``_get_logits_processor``'s order (sequence bias, repetition penalty,
    temperature, top-k, top-p, min-p)."""
    ids = _ids(history)  # [1, n]
    scores = logits[None].clone()  # [1, vocab]
    if cfg.logit_bias:
        scores = SequenceBiasLogitsProcessor([[[t], b] for t, b in cfg.logit_bias])(ids, scores)
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    if cfg.top_k > 0:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    if cfg.min_p > 0.0:
        scores = MinPLogitsWarper(cfg.min_p)(ids, scores)
    return scores[0]


CHAINS = [
    SamplingConfig(temperature=1.0, min_p=0.1),
    SamplingConfig(temperature=0.7, min_p=0.05, top_k=30),
    SamplingConfig(temperature=1.5, min_p=0.2, top_p=0.9),
    SamplingConfig(temperature=0.9, min_p=0.02, top_k=50, top_p=0.95, repetition_penalty=1.2),
    SamplingConfig(temperature=2.0, min_p=1.0),
]


@pytest.mark.parametrize("cfg", CHAINS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}-m{c.min_p}")
@pytest.mark.parametrize("seed", range(5))
def test_warper_chain_with_min_p_and_bias_matches_hf(cfg: SamplingConfig, seed: int) -> None:
    logits, history, pairs = _case(200 + seed)
    cfg = SamplingConfig(**{**cfg.__dict__, "logit_bias": tuple(pairs)})
    ours = Sampler(cfg).processed_logits(logits, history)
    theirs = _hf_chain(logits, history, cfg)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_min_p_keeps_the_expected_set() -> None:
    scores = torch.log(torch.tensor([0.5, 0.3, 0.11, 0.05, 0.04]))
    kept = torch.isfinite(min_p_filter(scores, 0.2)).tolist()  # threshold 0.2 * 0.5 = 0.1
    assert kept == [True, True, True, False, False]
    assert torch.isfinite(min_p_filter(scores, 1.0)).tolist() == [True, False, False, False, False]
    assert torch.equal(min_p_filter(scores, 0.0), scores)


def test_logit_bias_bans_and_forces_tokens_greedily() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])
    assert Sampler(SamplingConfig(logit_bias=((1, -100.0),))).next_token(logits) == 3
    assert Sampler(SamplingConfig(logit_bias=((0, 100.0),))).next_token(logits) == 0
    with pytest.raises(ConfigError, match="not in the model's vocabulary"):
        Sampler(SamplingConfig(logit_bias=((4, 1.0),))).next_token(logits)


def _toy_model(seq: list[int], vocab: int = 11) -> torch.Tensor:
    """Deterministic logits [vocab] that depend on the last two tokens (repetitive enough to draft well)."""
    key = (seq[-1] * 31 + (seq[-2] if len(seq) > 1 else 0)) % 17
    return torch.randn(vocab, generator=torch.Generator().manual_seed(key)) * 2.0


SPEC_CONFIGS = [
    SamplingConfig(presence_penalty=0.4, frequency_penalty=0.3, logit_bias=((3, 2.0), (5, -1.0))),
    SamplingConfig(temperature=0.9, presence_penalty=-0.5, frequency_penalty=0.2, min_p=0.05, seed=11,
                   logit_bias=((2, 1.5),)),
    SamplingConfig(temperature=1.2, top_k=6, frequency_penalty=-0.3, repetition_penalty=1.1, min_p=0.1, seed=3),
]


@pytest.mark.parametrize("cfg", SPEC_CONFIGS, ids=["greedy", "seeded", "seeded-topk"])
def test_speculation_with_penalties_gives_plain_decodings_tokens(cfg: SamplingConfig) -> None:
    prompt = [1, 2, 3, 1, 2]
    steps = 40
    plain_sampler = Sampler(cfg, prompt_len=len(prompt))
    plain = list(prompt)
    while len(plain) < len(prompt) + steps:
        plain.append(plain_sampler.next_token(_toy_model(plain), plain))
    spec_sampler = Sampler(cfg, prompt_len=len(prompt))
    spec = list(prompt)
    accepted = 0
    while len(spec) < len(prompt) + steps:
        drafts = prompt_lookup(spec, 3)
        rows = torch.stack([_toy_model(spec + drafts[:i]) for i in range(len(drafts) + 1)])  # [1 + d, vocab]
        verdict = accept(spec_sampler, rows, spec, drafts)
        spec.extend(verdict.tokens)
        accepted += verdict.accepted
    assert spec[:len(plain)] == plain
    assert accepted > 0  # drafts were taken, so the penalties did see draft-extended histories


def test_config_validation_and_cli_parsing() -> None:
    assert parse_logit_bias(["42=-100", "7=2.5"]) == ((42, -100.0), (7, 2.5))
    for bad in (["42"], ["x=1"], ["3=y"]):
        with pytest.raises(ConfigError, match="--logit-bias takes ID=BIAS"):
            parse_logit_bias(bad)
    cases = [({"presence_penalty": 2.5}, "--presence-penalty"), ({"frequency_penalty": -3.0}, "--frequency-penalty"),
             ({"min_p": 1.5}, "--min-p"), ({"logit_bias": ((1, 101.0),)}, "--logit-bias"),
             ({"logit_bias": ((-1, 1.0),)}, "--logit-bias"), ({"logit_bias": ((1, 1.0), (1, 2.0))}, "twice"),
             ({"logit_bias": tuple((i, 1.0) for i in range(1025))}, "at most 1024"),
             ({"min_p": float("nan")}, "--min-p")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            SamplingConfig(**kwargs)  # type: ignore[arg-type]
