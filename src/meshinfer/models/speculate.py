"""Speculative decoding without a draft model: prompt-lookup drafts, and which drafts one verify step accepts.

Contract: pure decision code over token ids and logits (torch for the math, no network, no sessions).

- ``prompt_lookup(history, draft)`` proposes up to ``draft`` tokens: the tail of ``history`` (prompt + output)
  of n = ``MAX_NGRAM``..1 tokens (longest first) is looked up earlier in ``history``; the tokens that followed
  the most recent match are the draft, continued past the history's end as the sequence would if it repeats
  (the period: from the match to the tail), so every match gives a full draft: a loop of period P is drafted
  ``draft`` tokens ahead. No match: no draft (the step is a plain one-token step). ``min_ngram`` (default 1)
  ignores shorter tails: ``BUSY_MIN_NGRAM`` (3) is what a busy client asks for (see ``client.speculative``).
- ``accept(sampler, logits[1 + d, V], history, drafts)`` judges one verify step: row i of ``logits`` is the
  model's output after ``history + drafts[:i]``. Row by row, the token is chosen exactly as plain decoding chooses
  it (``Sampler.next_token``: repetition penalty over that row's own history, temperature / top-k / top-p, one
  draw from the sampler's generator); a draft is accepted while it equals that token, and the first token that
  differs (the correction), or the token after a fully accepted draft (the bonus), ends the step. Greedy: argmax
  equality, identical tokens to plain greedy decoding. Sampled: this IS standard speculative sampling (Leviathan
  et al. 2023, Chen et al. 2023) for a deterministic draft, i.e. q one-hot on the draft x: x is accepted with
  probability p(x), and on rejection the token is distributed as norm(max(0, p - q)) = p with x removed (the law
  of a draw from p given that it is not x); the bonus is drawn from p. Realised with ONE draw per produced token,
  in order, it also consumes the generator exactly as plain decoding does: a seed gives the same tokens with
  speculation on and off (given the same logits). ``Verdict.tokens`` are the new tokens (accepted drafts, then one
  more), ``accepted`` how many drafts were kept, ``states`` the sampler's generator state before each token.
- ``DraftSwitch`` stops drafting where it does not pay: after ``misses`` verify steps in a row with no draft
  accepted it pauses for ``pause`` steps (doubling per failed retry, up to ``MAX_PAUSE``), then tries again.
- ``SpecStats`` counts trips, drafts and accepted tokens (the client's and the bench's figures).

Draft length (``DEFAULT_DRAFT`` = 6): a verify step of 1 + d tokens costs about one trip on a WAN (the ring's
delays dominate; each extra row is one more [H] vector on the wire and one more LM-head row), so longer drafts are
nearly free when they match; 6 covers most repeated phrases of edited or summarised text while keeping the rows
per step (and the rejected work on the servers) small on CPU servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from meshinfer.errors import ConfigError
from meshinfer.models.sampling import Sampler

DEFAULT_DRAFT = 6
"""Draft tokens per verify step (see the module docstring)."""
MAX_DRAFT = 32
"""The longest draft a client may ask for (a verify step carries 1 + draft rows)."""
MAX_NGRAM = 3
"""The longest tail looked up (then shorter ones, down to one token)."""
BUSY_MIN_NGRAM = 3
"""The shortest matching tail a busy client drafts from: a 3-token repeat is a copy in progress (an edit, code, a
quote), where drafts are mostly accepted; a 1- or 2-token match in text that does not repeat mostly fails."""
MAX_LOOKBACK = 4096
"""How far back in the history a match is searched (bounds the Python scan per step)."""
MISSES_BEFORE_PAUSE = 3
"""Verify steps in a row with no accepted draft before drafting pauses."""
FIRST_PAUSE = 4
MAX_PAUSE = 64
"""Plain steps of the first pause, and the longest pause (each failed retry doubles it)."""


def prompt_lookup(history: Sequence[int], draft: int, max_ngram: int = MAX_NGRAM, min_ngram: int = 1) -> list[int]:
    """Up to ``draft`` tokens that followed an earlier occurrence of ``history``'s tail (see the module doc); only
    tails of at least ``min_ngram`` tokens count as a match."""
    if draft < 0 or not 1 <= min_ngram <= max_ngram:
        raise ConfigError(f"need draft >= 0 and 1 <= min_ngram <= max_ngram, got {draft}, {min_ngram} and "
                          f"{max_ngram}")
    hist = list(history[-MAX_LOOKBACK:])
    size = len(hist)
    if draft == 0:
        return []
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = hist[size - n:]
        for start in range(size - n - 1, -1, -1):  # the most recent match; the tail itself excluded
            if hist[start:start + n] == tail:
                seq = hist
                out: list[int] = []
                for j in range(draft):  # what followed the match, extended periodically past the history's end
                    at = start + n + j
                    out.append(seq[at] if at < size else out[at - size])
                return out
    return []


@dataclass(frozen=True)
class Verdict:
    """What one verify step produced."""

    tokens: list[int]
    """The new tokens: the accepted drafts, then the correction (or the bonus after a fully accepted draft)."""
    accepted: int
    """Drafts kept (``len(tokens) - 1``)."""
    states: list[torch.Tensor]
    """The sampler's generator state before each of ``tokens`` (a rollback to token k restores ``states[k]``)."""


def accept(sampler: Sampler, logits: torch.Tensor, history: Sequence[int], drafts: Sequence[int]) -> Verdict:
    """Judge ``drafts`` against ``logits`` [1 + len(drafts), V] (row i: after ``history + drafts[:i]``)."""
    if logits.dim() != 2 or logits.shape[0] != len(drafts) + 1:
        raise ConfigError(f"expected logits [{len(drafts) + 1}, vocab], got {tuple(logits.shape)}")
    seen = list(history)
    tokens: list[int] = []
    states: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(len(drafts) + 1):
            states.append(sampler.generator.get_state())
            token = sampler.next_token(logits[i], seen)  # exactly plain decoding's choice (and draw) at this row
            tokens.append(token)
            if i == len(drafts) or token != drafts[i]:
                break  # the correction (a rejected draft) or the bonus (every draft accepted)
            seen.append(token)
    return Verdict(tokens, len(tokens) - 1, states)


@dataclass
class DraftSwitch:
    """Whether the next step drafts (see the module docstring)."""

    misses: int = MISSES_BEFORE_PAUSE
    pause: int = FIRST_PAUSE
    _missed: int = field(default=0, init=False)
    _paused: int = field(default=0, init=False)
    _next_pause: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.misses < 1 or self.pause < 0:
            raise ConfigError(f"need misses >= 1 and pause >= 0, got {self.misses} and {self.pause}")
        self._next_pause = self.pause

    def want(self) -> bool:
        """Draft on the next step? (A paused step counts down the pause.)"""
        if self._paused > 0:
            self._paused -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        """A verify step of ``drafted`` drafts kept ``accepted`` of them."""
        if drafted == 0:
            return
        if accepted > 0:
            self._missed = 0
            self._next_pause = self.pause
            return
        self._missed += 1
        if self._missed >= self.misses:
            self._paused = self._next_pause
            self._next_pause = min(MAX_PAUSE, max(1, 2 * self._next_pause))
            self._missed = self.misses - 1  # one more miss after the pause pauses again (longer)


@dataclass
class SpecStats:
    """Speculation figures over generations (a client's, or one bench run's)."""

    trips: int = 0
    """Decode steps through the route (verify steps and plain ones; the prefill not counted)."""
    verify_steps: int = 0
    """Steps that carried drafts."""
    drafted: int = 0
    accepted: int = 0
    """Draft tokens sent, and those accepted."""
    tokens: int = 0
    """Tokens produced by decode steps (the prefill's first token not counted)."""

    @property
    def tokens_per_trip(self) -> float:
        return self.tokens / self.trips if self.trips else 0.0

    def add(self, other: SpecStats) -> None:
        self.trips += other.trips
        self.verify_steps += other.verify_steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.tokens += other.tokens

    def as_dict(self) -> dict[str, float]:
        return {"trips": self.trips, "verify_steps": self.verify_steps, "drafted": self.drafted,
                "accepted": self.accepted, "tokens": self.tokens,
                "tokens_per_trip": round(self.tokens_per_trip, 3)}
