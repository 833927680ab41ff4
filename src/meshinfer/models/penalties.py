"""Logit adjustments beyond Hugging Face's repetition penalty: OpenAI's ``logit_bias`` and presence/frequency
penalties, and the ``min_p`` warper.

Contract: pure torch functions on one row of float32 scores [vocab], on whatever device the row lives on; no
``transformers``, no network, no state. Each result depends only on its arguments (the history and the prompt
length, never on earlier calls), which keeps ``models.speculate.accept`` exact: a row scored with a draft's
history gets what plain decoding of that history would. Semantics of the reference engines:

- ``apply_logit_bias``: the bias added to the raw logits (OpenAI ``logit_bias``; Hugging Face's
  ``SequenceBiasLogitsProcessor`` for one-token sequences). An id past the vocabulary is a ``ConfigError``.
- ``apply_presence_frequency``: ``logits[t] -= frequency * count(t) + presence * (count(t) > 0)``, counted over
  the generated tokens only (``history[prompt_len:]``), as OpenAI documents and vLLM does.
- ``min_p_filter``: Hugging Face's ``MinPLogitsWarper``: tokens whose probability (softmax of the warped scores)
  is below ``min_p`` times the most likely token's are set to -inf, the most likely token always kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshinfer.errors import ConfigError

__all__ = ["LogitBias", "apply_logit_bias", "apply_presence_frequency", "min_p_filter"]


class LogitBias:
    """``logit_bias`` pairs as a dense [vocab] tensor, built once per device and vocabulary size."""

    def __init__(self, pairs: Sequence[tuple[int, float]]) -> None:
        self.pairs = tuple(pairs)
        self._dense: torch.Tensor | None = None

    def dense(self, vocab: int, device: torch.device) -> torch.Tensor:
        """The bias of every token: float32 [vocab] on ``device`` (zero where none is given)."""
        dense = self._dense
        if dense is None or dense.shape[0] != vocab or dense.device != device:
            ids = [token for token, _ in self.pairs]
            if ids and max(ids) >= vocab:
                raise ConfigError(f"--logit-bias: token id {max(ids)} is not in the model's vocabulary "
                                  f"(ids 0..{vocab - 1})")
            dense = torch.zeros(vocab, dtype=torch.float32)  # [vocab]
            if ids:
                dense[torch.tensor(ids, dtype=torch.long)] = torch.tensor([b for _, b in self.pairs],
                                                                          dtype=torch.float32)
            dense = dense.to(device)
            self._dense = dense
        return dense


def apply_logit_bias(scores: torch.Tensor, bias: LogitBias | None) -> torch.Tensor:
    """``scores`` [vocab] float32 plus ``bias`` (a new tensor; the same one when there is none)."""
    if bias is None or not bias.pairs:
        return scores
    return scores + bias.dense(scores.shape[0], scores.device)


def apply_presence_frequency(scores: torch.Tensor, history: Sequence[int], prompt_len: int, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over ``history[prompt_len:]`` (ids past the vocabulary are
    ignored); ``scores`` [vocab] float32, a new tensor back."""
    generated = history[prompt_len:]
    if (presence == 0.0 and frequency == 0.0) or len(generated) == 0:
        return scores
    vocab = scores.shape[0]
    ids = torch.as_tensor(list(generated), dtype=torch.long)  # [n], on the host
    if bool((ids < 0).any()):
        raise ConfigError("token history holds a negative token id")
    ids = ids[ids < vocab].to(scores.device)
    counts = torch.bincount(ids, minlength=vocab).to(torch.float32)  # [vocab]
    return scores - (frequency * counts + presence * (counts > 0).to(torch.float32))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """HF ``MinPLogitsWarper`` (``min_tokens_to_keep`` 1) on ``scores`` [vocab]; ``min_p`` 0 disables."""
    if min_p <= 0.0:
        return scores
    probs = torch.softmax(scores, dim=-1)  # [vocab]
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove[torch.argmax(probs)] = False  # the most likely token always stays
    return scores.masked_fill(remove, float("-inf"))
