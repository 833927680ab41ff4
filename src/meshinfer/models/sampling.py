"""Choosing the next token from logits: logit bias, penalties, temperature, top-k, top-p, min-p, seeded sampling.

Contract: ``Sampler(config).next_token(logits[vocab], history) -> int``. Pure torch, no
``transformers`` and no network. Semantics follow Hugging Face ``generate()`` exactly, in its order:
``logit_bias`` added to the raw logits (OpenAI; HF's ``SequenceBiasLogitsProcessor``), repetition penalty
over every token of ``history`` (positive logits divided by the penalty, negative ones multiplied; ids
beyond the vocabulary ignored), then OpenAI's presence/frequency penalties over the generated tokens only
(``models.penalties``), then, unless greedy, temperature, top-k (ties with the k-th logit kept), top-p
(smallest set of most likely tokens whose mass reaches p; at least one kept), min-p (HF's
``MinPLogitsWarper``), softmax and one draw from a ``torch.Generator`` seeded with ``config.seed``.
Every step depends only on (logits, history, prompt_len), so speculative acceptance stays exact.
With a ``constraint`` (``models.constraint.TokenConstraint``, e.g. a JSON grammar), tokens it does not
allow after the generated ones (``history[prompt_len:]``) are set to -inf after the penalty, before the warpers
(so top-p works over the allowed mass). ``temperature == 0`` is greedy (argmax after the penalty and mask).
Work is done in float32 whatever the logits' dtype. A sampler carries its generator's state, so one
sampler per generation: the same seed and logits give the same tokens.

Devices: greedy decoding stays on the logits' device (penalty and argmax there; only the chosen id comes
back, one sync per token; argmax returns the first maximal index on every device, as on the CPU). Sampled
decoding brings the row to the CPU (one copy per token) and warps and draws there, with a CPU
``torch.Generator``: a seed then gives the same tokens whatever device computed the logits (CUDA generators
draw different streams, and GPU softmax/cumsum may round differently at the top-p boundary); the copy of one
[vocab] row per token costs far less than the forward pass that made it.

``score_token(logits, token, top)`` gives a chosen token's log-probability and the ``top`` most likely
tokens' under the model's own distribution: ``log_softmax`` of the raw logits, before penalty and warpers
(what vLLM returns by default, and what ``transformers`` reports as ``output_logits``), so a score does not
depend on how the token was chosen. ``score_rows(logits[T, vocab], targets[T], top)`` does the same for
many positions at once (a prompt's tokens, each under the distribution of the position before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError
from meshinfer.models.constraint import TokenConstraint
from meshinfer.models.penalties import LogitBias, apply_logit_bias, apply_presence_frequency, min_p_filter

__all__ = ["Sampler", "apply_mask", "apply_repetition_penalty", "top_k_filter", "top_p_filter", "warp_logits"]


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor`` on one row: returns a new float32 tensor [vocab]."""
    scores = logits.to(torch.float32).clone()  # [vocab], on the logits' device
    if penalty == 1.0 or len(history) == 0:
        return scores
    ids = torch.as_tensor(list(history), dtype=torch.long)  # [n], checked on the host
    if bool((ids < 0).any()):
        raise ConfigError("token history holds a negative token id")
    ids = ids[ids < scores.shape[0]].to(scores.device)  # like HF: ids beyond the vocabulary cannot be penalised
    seen = scores.gather(0, ids)  # [n]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(0, ids, seen)


def apply_mask(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``scores`` [vocab] with every token not ``allowed`` (bool [n], CPU; ids past n forbidden) set to -inf."""
    if allowed is None:
        return scores
    vocab = scores.shape[0]
    keep = torch.zeros(vocab, dtype=torch.bool)
    n = min(vocab, allowed.shape[0])
    keep[:n] = allowed[:n]
    if not bool(keep.any()):
        raise ConfigError("the decoding constraint allows no token here (a grammar that cannot go on)")
    return scores.masked_fill(~keep.to(scores.device), float("-inf"))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (HF ``TopKLogitsWarper``); k <= 0 disables."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k).values[..., -1:]  # [1]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (HF ``TopPLogitsWarper``): keep the top tokens whose mass reaches ``p``."""
    if p >= 1.0:
        return scores
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)  # [vocab] ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [vocab]
    remove_sorted = cumulative <= (1.0 - p)
    remove_sorted[-1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def warp_logits(scores: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as HF applies its warpers (non-greedy only)."""
    scores = scores / config.temperature
    scores = top_k_filter(scores, config.top_k)
    scores = top_p_filter(scores, config.top_p)
    return min_p_filter(scores, config.min_p)


class Sampler:
    """Turns one row of logits at a time into a token id, following ``SamplingConfig``."""

    def __init__(self, config: SamplingConfig | None = None, *, prompt_len: int = 0,
                 constraint: TokenConstraint | None = None) -> None:
        self.config = config if config is not None else SamplingConfig()
        self.prompt_len = prompt_len
        """How many leading tokens of ``history`` are the prompt (the rest: this generation's output)."""
        self.constraint = constraint
        self.bias = LogitBias(self.config.logit_bias) if self.config.logit_bias else None
        """Which tokens may come next (``models.constraint``); asked before every token, after the penalties."""
        self.generator = torch.Generator(device="cpu")
        if self.config.seed is not None:
            self.generator.manual_seed(int(self.config.seed))
        else:
            self.generator.seed()

    def processed_logits(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The float32 scores a token is chosen from (after bias, penalties and, unless greedy, warpers): on the
        logits' device when greedy, on the CPU otherwise (see the module docstring)."""
        if logits.dim() != 1:
            raise ConfigError(f"Sampler expects logits of shape [vocab], got {tuple(logits.shape)}")
        c = self.config
        row = logits.detach() if c.greedy else logits.detach().cpu()  # [vocab]
        row = apply_logit_bias(row.to(torch.float32), self.bias)
        scores = apply_repetition_penalty(row, history, c.repetition_penalty)
        scores = apply_presence_frequency(scores, history, self.prompt_len, c.presence_penalty, c.frequency_penalty)
        if self.constraint is not None:
            scores = apply_mask(scores, self.constraint.allowed(history[self.prompt_len:]))
        if self.config.greedy:
            return scores
        return warp_logits(scores, self.config)

    def next_token(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """Choose the next token from ``logits`` [vocab] given the ids seen so far (prompt included)."""
        scores = self.processed_logits(logits, history)  # [vocab] float32
        if self.config.greedy:
            return int(torch.argmax(scores).item())  # on the logits' device: only the id comes back
        probs = torch.softmax(scores, dim=-1)  # [vocab] on the CPU
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


MAX_TOP_LOGPROBS = 20
"""The most alternatives ``score_token`` lists per token (the OpenAI API's limit)."""


@dataclass(frozen=True)
class ScoredToken:
    """A generated token, with its log-probability when one was asked for."""

    token: int
    logprob: float | None = None
    """log p(token) under the model's distribution (natural log); None when scores were not asked for."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens at this position and their log-probabilities, most likely first."""


def score_token(logits: torch.Tensor, token: int, top: int) -> ScoredToken:
    """``token``'s log-probability under ``logits`` [vocab] and the ``top`` (0..20) most likely tokens'."""
    if logits.dim() != 1:
        raise ConfigError(f"score_token expects logits of shape [vocab], got {tuple(logits.shape)}")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
    logprobs = torch.log_softmax(logits.detach().cpu().float(), dim=-1)  # [vocab]
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[0]))  # [top], sorted, most likely first
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return ScoredToken(token, float(logprobs[token]), best)


def score_rows(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[ScoredToken]:
    """``score_token`` for each row of ``logits`` [T, vocab] and its target id (``len(targets) == T``)."""
    if logits.dim() != 2 or logits.shape[0] != len(targets):
        raise ConfigError(f"score_rows expects logits [{len(targets)}, vocab], got {tuple(logits.shape)}")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
    logprobs = torch.log_softmax(logits.detach().cpu().float(), dim=-1)  # [T, vocab]
    chosen = logprobs.gather(1, torch.tensor(list(targets), dtype=torch.long).unsqueeze(1))[:, 0].tolist()  # [T]
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[1]), dim=-1)  # [T, top] each
        best = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        best = [()] * len(targets)
    return [ScoredToken(int(t), lp, b) for t, lp, b in zip(targets, chosen, best, strict=True)]
