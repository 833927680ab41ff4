"""Prompt-lookup drafts, greedy and speculative-sampling acceptance (against the exact distribution), and the
adaptive draft switch (``models.speculate``)."""

from __future__ import annotations

import pytest
import torch

from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError
from meshinfer.models.sampling import Sampler, apply_repetition_penalty, warp_logits
from meshinfer.models.speculate import BUSY_MIN_NGRAM, DraftSwitch, SpecStats, accept, prompt_lookup


def test_prompt_lookup_longest_ngram_first_most_recent_full_continuation() -> None:
    # tail (2, 3): the 3-gram (1, 2, 3) matches at 0 -> continuation 4, 5
    assert prompt_lookup([1, 2, 3, 4, 5, 9, 1, 2, 3], 2) == [4, 5]
    # the most recent match wins: (7, 8) at 0 -> 1, 0; at 4 -> 2, 6
    assert prompt_lookup([7, 8, 1, 0, 7, 8, 2, 6, 7, 8], 2) == [2, 6]
    # no 3-gram or 2-gram match, a 1-gram one
    assert prompt_lookup([4, 5, 6, 9, 6], 3) == [9, 6, 9]
    # a run of one token gets a full draft (the continuation repeats past the history's end)
    assert prompt_lookup([3, 3, 3], 4) == [3, 3, 3, 3]
    # a loop of period 3 is drafted for the full length from its last period
    assert prompt_lookup([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]
    # a continuation reaching the end repeats with the period from the match to the tail: (5, 6) at 2, period 3
    assert prompt_lookup([9, 0, 5, 6, 1, 5, 6], 4) == [1, 5, 6, 1]


def test_prompt_lookup_min_ngram_ignores_short_matches() -> None:
    # only a 1-gram match (6): drafted by default, not with min_ngram 2 or 3
    assert prompt_lookup([4, 5, 6, 9, 6], 3) == [9, 6, 9]
    assert prompt_lookup([4, 5, 6, 9, 6], 3, min_ngram=2) == []
    # a 3-gram repeat (1, 2, 3) drafts whatever min_ngram up to 3
    assert prompt_lookup([1, 2, 3, 4, 5, 9, 1, 2, 3], 2, min_ngram=3) == [4, 5]
    # a 2-gram repeat only: min_ngram 3 (a busy client, BUSY_MIN_NGRAM) drafts nothing
    assert BUSY_MIN_NGRAM == 3
    assert prompt_lookup([7, 8, 1, 0, 7, 8], 2, min_ngram=BUSY_MIN_NGRAM) == []
    assert prompt_lookup([7, 8, 1, 0, 7, 8], 2, min_ngram=2) == [1, 0]
    with pytest.raises(ConfigError):
        prompt_lookup([1, 2], 2, min_ngram=0)
    with pytest.raises(ConfigError):
        prompt_lookup([1, 2], 2, max_ngram=2, min_ngram=3)


def test_prompt_lookup_without_match_or_room_drafts_nothing() -> None:
    assert prompt_lookup([1, 2, 3, 4], 4) == []
    assert prompt_lookup([1], 4) == []
    assert prompt_lookup([], 4) == []
    assert prompt_lookup([1, 2, 1], 0) == []
    with pytest.raises(ConfigError):
        prompt_lookup([1, 2], -1)


def _onehot_logits(rows: list[int], vocab: int = 8) -> torch.Tensor:  # ids [R] -> [R, V], argmax at each id
    out = torch.zeros(len(rows), vocab)
    for i, t in enumerate(rows):
        out[i, t] = 5.0
    return out


def test_greedy_accepts_the_matching_prefix_then_corrects() -> None:
    sampler = Sampler(SamplingConfig(temperature=0.0))
    verdict = accept(sampler, _onehot_logits([3, 4, 6, 1]), [0], [3, 4, 5])
    assert verdict.tokens == [3, 4, 6] and verdict.accepted == 2 and len(verdict.states) == 3
    full = accept(sampler, _onehot_logits([3, 4, 5, 1]), [0], [3, 4, 5])
    assert full.tokens == [3, 4, 5, 1] and full.accepted == 3  # the bonus token after a full acceptance
    none = accept(sampler, _onehot_logits([2]), [0], [])
    assert none.tokens == [2] and none.accepted == 0
    with pytest.raises(ConfigError):
        accept(sampler, _onehot_logits([2, 2]), [0], [])


def test_greedy_applies_the_repetition_penalty_with_each_rows_history() -> None:
    # row 1 sees the accepted draft 3 in its history: penalised there, so 2 wins (as plain decoding would choose)
    logits = torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 1.5, 2.0]])
    sampler = Sampler(SamplingConfig(temperature=0.0, repetition_penalty=2.0))
    verdict = accept(sampler, logits, [0], [3])
    plain = Sampler(SamplingConfig(temperature=0.0, repetition_penalty=2.0))
    assert verdict.tokens == [3, plain.next_token(logits[1], [0, 3])] == [3, 2]


@pytest.mark.parametrize("draft", [0, 1, 4], ids=["likely-draft", "mid-draft", "unlikely-draft"])
def test_speculative_sampling_keeps_the_warped_distribution(draft: int) -> None:
    # target p: the row's logits after the penalty (history [2]) and temperature / top-k, exactly as plain sampling
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 6, generator=gen) * 2  # [2, V]
    logits[0, 0] = 4.0
    config = SamplingConfig(temperature=0.8, top_k=5, repetition_penalty=1.3, seed=1234)
    p = torch.softmax(warp_logits(apply_repetition_penalty(logits[0], [2], 1.3), config), dim=-1)  # [V]
    # the token after an accepted draft: row 1's distribution with the draft in its history
    p1 = torch.softmax(warp_logits(apply_repetition_penalty(logits[1], [2, draft], 1.3), config), dim=-1)
    sampler = Sampler(config)
    draws = 4000
    first = torch.zeros(6)
    second = torch.zeros(6)
    for _ in range(draws):
        verdict = accept(sampler, logits, [2], [draft])
        first[verdict.tokens[0]] += 1
        if verdict.accepted == 1:
            second[verdict.tokens[1]] += 1
    kept = int(second.sum())
    assert 0.5 * float((first / draws - p).abs().sum()) < 0.035, (p, first / draws)  # sampling error ~0.012
    assert abs(kept / draws - float(p[draft])) < 0.025  # the draft is accepted with probability p(draft)
    if kept > 1500:
        assert 0.5 * float((second / kept - p1).abs().sum()) < 0.06, (p1, second / kept)


def test_seeded_speculative_sampling_draws_what_plain_sampling_draws() -> None:
    # drafts that are the plain draws themselves are all accepted, and the draws stay those of plain decoding
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))  # [4, V]
    config = SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.1, seed=5)
    plain = Sampler(config)
    history = [1]
    drawn: list[int] = []
    for row in logits:
        drawn.append(plain.next_token(row, history + drawn))
    full = accept(Sampler(config), logits, history, drawn[:3])
    assert full.tokens == drawn and full.accepted == 3
    wrong = (drawn[1] + 1) % 10
    cut = accept(Sampler(config), logits, history, [drawn[0], wrong, 0])
    assert cut.tokens == drawn[:2] and cut.accepted == 1  # the correction is plain decoding's own draw


def test_draft_switch_pauses_after_misses_and_retries_longer() -> None:
    switch = DraftSwitch(misses=2, pause=3)
    assert switch.want()
    switch.record(4, 0)
    assert switch.want()
    switch.record(4, 0)  # second miss in a row: pause 3 steps
    assert [switch.want() for _ in range(4)] == [False, False, False, True]
    switch.record(4, 0)  # the retry misses: pause 6
    assert [switch.want() for _ in range(7)] == [False] * 6 + [True]
    switch.record(4, 2)  # a hit resets everything
    switch.record(4, 0)
    assert switch.want()
    switch.record(0, 0)  # no draft sent: not a miss
    assert switch.want()


def test_spec_stats_tokens_per_trip() -> None:
    stats = SpecStats(trips=4, verify_steps=3, drafted=12, accepted=6, tokens=10)
    other = SpecStats()
    other.add(stats)
    assert other.tokens_per_trip == 2.5 and other.as_dict()["accepted"] == 6
    assert SpecStats().tokens_per_trip == 0.0
