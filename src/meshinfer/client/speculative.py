"""Speculative generation through a session: prompt-lookup drafts verified in one trip, rejected positions
rolled back, audited or not.

Contract: ``agenerate_speculative(session, forward, ids, params, eos, draft=..., stats=...)`` yields the same
``ScoredToken``s as ``engine.agenerate_scored`` (greedy: the very same tokens; sampled: the same distribution,
and with a seed the same draws, see ``models.speculate.accept``) with fewer trips through the route.
``forward(chunk, position, rows)`` runs ``chunk`` at ``position`` through ``session`` and returns the logits of
its last ``rows`` positions [rows, V].

After the prefill, each step sends [last token + drafts] (``models.speculate.prompt_lookup``, at most ``draft``
and never more than the tokens still wanted or the session holds) as ONE step of T = 1 + d positions; the head
returns T rows of logits and ``models.speculate.accept`` keeps the longest acceptable prefix plus one token.
Rollback: the KV caches then hold d - accepted positions too many; ``session.rewind(accepted length)`` cuts the
client's own per-hop history (a failover replays only accepted positions) and the next step is sent at that
position, where every server truncates its cache. Only the session's public ``forward``/``rewind``/``position``
(and ``auditor`` / ``want_commit``, as ``client.audited`` does) are used. ``models.speculate.DraftSwitch`` stops
drafting while drafts keep failing. ``busy()`` (the caller's load gate; ``DistributedModel``: more than
``speculate_busy_sessions`` generations decoding at once) makes a step draft only from a tail of at least
``BUSY_MIN_NGRAM`` (3) tokens that repeats earlier text. Why: in a busy batch the servers are compute-bound, so a
draft costs a token's compute instead of saving a trip; drafts from 1- and 2-token matches in text that does not
repeat (the random-weight bench model: 8 of 751 accepted) cost 30-40% of the aggregate tokens/s at 16 sessions,
while a copy in progress (SmolLM2 rewriting a passage: 81% accepted) still gains 1.72x at 8 sessions with this rule
(1.75x drafting always; ``bench load`` and a side-by-side run, session 25).

Audits (``session.auditor`` set): tokens are released once verified, a ``Detection`` rolls the generation back
and fails the liar over, exactly as ``client.audited.agenerate_audited`` does (token k still comes from the
logits of position ``len(ids) - 1 + k``, so the same release rule holds); the auditor forgets only windows that
a rewind cut (``Auditor.rewind``). Limit: a speculative step cut by a rollback leaves the hop's signed commits
unable to cover the later positions as evidence (``client.evidence.committed_upto``), so a lie found after the
first rejected draft is still caught, banned and rolled back, but not published as a report.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import torch

from meshinfer.client.audited import MAX_ROLLBACKS, keep_after_rollback, settled_tokens
from meshinfer.client.session import InferenceSession
from meshinfer.errors import ConfigError
from meshinfer.models.generator import GenerationParams
from meshinfer.models.sampling import MAX_TOP_LOGPROBS, ScoredToken, score_token
from meshinfer.models.speculate import BUSY_MIN_NGRAM, DraftSwitch, SpecStats, accept, prompt_lookup

log = logging.getLogger(__name__)

RowsForward = Callable[[list[int], int, int], Awaitable[torch.Tensor]]
"""``forward(chunk, position, rows)``: logits [rows, V] of the last ``rows`` of ``chunk`` placed at ``position``."""

MIN_NEW_TOKENS = 8
"""Speculation pays from this many new tokens (shorter generations decode plainly)."""


def worth_speculating(params: GenerationParams, enabled: bool) -> bool:
    """Whether a generation speculates: switched on, and at least ``MIN_NEW_TOKENS`` tokens wanted."""
    return enabled and params.max_new_tokens >= MIN_NEW_TOKENS


async def agenerate_speculative(session: InferenceSession, forward: RowsForward, ids: list[int],
                                params: GenerationParams, eos_token_ids: Collection[int], *, draft: int,
                                stats: SpecStats | None = None, switch: DraftSwitch | None = None,
                                busy: Callable[[], bool] | None = None) -> AsyncIterator[ScoredToken]:
    """See the module docstring. ``ids`` are checked (``engine.check_prompt``). ``busy()`` is asked before each
    decode step (None: never busy)."""
    top = params.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
    if draft < 0:
        raise ConfigError(f"draft must be >= 0, got {draft}")
    auditor = session.auditor
    stats = stats if stats is not None else SpecStats()
    switch = switch if switch is not None else DraftSwitch()
    sampler = params.sampler(len(ids))
    stops = params.stops(eos_token_ids)
    wanted = params.max_new_tokens
    prompt = len(ids)
    produced: list[ScoredToken] = []
    states: list[torch.Tensor] = []  # the sampler's state before each produced token
    released = 0
    rollbacks = 0
    done = wanted == 0

    def history() -> list[int]:
        return ids + [t.token for t in produced]

    def scored(logits: torch.Tensor, token: int) -> ScoredToken:
        return score_token(logits, token, top) if top is not None else ScoredToken(token)

    # the next request: (chunk, position, drafts) -- drafts are the tail of chunk being verified
    request: tuple[list[int], int, list[int]] | None = (list(ids), 0, []) if not done else None
    while True:
        settled_all = False
        if request is not None:
            chunk, position, drafts = request
            if auditor is not None and len(produced) + 1 + len(drafts) >= wanted:  # may give the last token:
                session.want_commit = True  # its tail gets signed (audits report from signed commits)
            logits = await forward(chunk, position, 1 + len(drafts))  # [1 + d, V]
            with torch.inference_mode():
                verdict = accept(sampler, logits, history(), drafts)
                new = [scored(logits[i], t) for i, t in enumerate(verdict.tokens)]
            decode = position > 0 and len(chunk) == 1 + len(drafts)
            if decode:
                stats.trips += 1
                stats.verify_steps += bool(drafts)
                stats.drafted += len(drafts)
                stats.accepted += verdict.accepted
                switch.record(len(drafts), verdict.accepted)
            for item, state in zip(new, verdict.states, strict=True):
                if done:
                    break
                produced.append(item)
                states.append(state)
                stats.tokens += decode
                done = item.token in stops or len(produced) >= wanted
            keep = prompt + len(produced) - 1  # positions whose inputs are accepted (the last token: not yet sent)
            if session.position > keep:  # drop the rejected drafts (servers truncate at the next step); also at
                await session.rewind(keep)  # the end: audits then judge only positions the output depends on
            request = None if done else _next(history(), wanted - len(produced), draft, switch, busy)
        else:
            if auditor is not None:
                await auditor.settle()
            settled_all = True
        detection = auditor.take_detection() if auditor is not None else None
        if detection is not None:
            rollbacks += 1
            if rollbacks > MAX_ROLLBACKS:
                raise RuntimeError(f"{MAX_ROLLBACKS} servers caught lying in one generation; giving up")
            keep = keep_after_rollback(prompt, detection.position, released)
            d = keep - 1 if keep > prompt else 0
            kept = keep - prompt
            if kept >= len(produced):
                log.error("a liar was caught at position %d after every token was released", detection.position)
                await session.rewind(session.position, detection.hop)
                continue
            full = history()[:keep]
            sampler.generator.set_state(states[kept])
            del produced[kept:]
            del states[kept:]
            done = False
            await session.rewind(d, detection.hop)
            log.warning("rolled back to position %d (%d token(s) kept); generation goes on", d, kept)
            request = (full[d:keep], d, [])
            continue
        if auditor is None or settled_all:
            settled = len(produced)
        else:
            settled = settled_tokens(auditor.verified_upto, prompt, len(produced))
        while released < settled:
            yield produced[released]
            released += 1
        if request is None and (auditor is None or settled_all) and released == len(produced):
            return


def _next(history: list[int], left: int, draft: int, switch: DraftSwitch,
          busy: Callable[[], bool] | None) -> tuple[list[int], int, list[int]]:
    """The next decode step after ``history`` (its last token not yet sent), with drafts where they may pay: never
    more than the ``left`` tokens still wanted need (the session holds prompt + every wanted token), and while
    ``busy()`` only from a match of at least ``BUSY_MIN_NGRAM`` tokens."""
    d = min(draft, left - 1)
    drafts: list[int] = []
    if d > 0 and switch.want():
        min_ngram = BUSY_MIN_NGRAM if busy is not None and busy() else 1
        drafts = prompt_lookup(history, d, min_ngram=min_ngram)
    return [history[-1], *drafts], len(history) - 1, drafts
