"""A generation whose tokens are released only once audited, rolled back exactly when an audit catches a liar.

Contract: ``agenerate_audited(session, forward, ids, params, eos)`` runs the rules of
``models.engine.GenerationSteps`` (prefill, decode, sampling, stops) over ``forward`` like
``engine.agenerate_scored``, with ``session.auditor`` (``client.audit.Auditor``) watching every hop:

- Token k (sampled from the logits of position ``len(ids) - 1 + k``) is YIELDED only once every shadowed hop's
  claims are verified up to that position (``auditor.verified_upto``); at the end of the generation the auditor
  settles everything first. So what the caller receives (``stream``, ``generate``, the gateway's SSE) never
  needs to be taken back; with audits on, tokens arrive in bursts, up to about ``audit_every`` tokens (plus the
  time of one audit) after they were computed. The generation itself never waits for an audit.
- A ``Detection`` (hop i lied from position d) rolls back: the session forgets positions >= d and replaces the
  liar (``InferenceSession.rewind``: its span's inputs [0, d) replayed on another server; the next step at d
  makes every server truncate its cache), the tokens whose logits came from positions >= d are dropped, the
  sampler's generator is restored to its state before the first dropped token, and the generation goes on from
  there: greedy output is the honest swarm's, and a seeded sampled one too. A lie in the prompt rolls back to 0
  (the prompt is sent again: no signed step is cut in two, so the hops' later claims can still be reported). A
  detection before a released token (only possible when the shadow colludes with the liar) cannot be undone and
  is logged.
- The step of the last token ``max_new_tokens`` allows asks every hop for a signed commit
  (``InferenceSession.want_commit``), so the audits of the generation's tail can be reported too (a generation
  ending on a stop token may leave its tail unsigned: judged anyway, see ``client.audit``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import torch

from meshinfer.client.session import InferenceSession
from meshinfer.models.engine import GenerationSteps
from meshinfer.models.generator import GenerationParams
from meshinfer.models.sampling import ScoredToken

log = logging.getLogger(__name__)

AsyncForward = Callable[[list[int], int], Awaitable[torch.Tensor]]
"""``forward(ids, position)``: logits [V] of the last of ``ids`` placed at ``position``."""

MAX_ROLLBACKS = 16
"""Most rollbacks one generation takes (each bans a liar) before it gives up on exactness and fails."""


def keep_after_rollback(prompt: int, bad: int, released: int) -> int:
    """History length kept when positions >= ``bad`` are untrusted: max(prompt, bad + 1), never less than what
    ``released`` tokens need (prompt + released)."""
    return max(prompt + released, max(prompt, bad + 1))


def settled_tokens(verified_upto: int, prompt: int, produced: int) -> int:
    """How many of ``produced`` tokens are settled when every audited hop is verified on [0, verified_upto): token
    k came from the logits of position prompt - 1 + k."""
    return max(0, min(produced, verified_upto - prompt + 1))


async def agenerate_audited(session: InferenceSession, forward: AsyncForward, ids: list[int],
                            params: GenerationParams, eos_token_ids: Collection[int]) -> AsyncIterator[ScoredToken]:
    """See the module docstring. ``forward`` runs ``session``; ``ids`` are checked (``check_prompt``)."""
    auditor = session.auditor
    assert auditor is not None
    steps = GenerationSteps(ids, params, eos_token_ids)
    prompt = len(ids)
    produced: list[ScoredToken] = []
    states: list[torch.Tensor] = []  # the sampler's state before each produced token
    released = 0
    rollbacks = 0
    request = steps.first()
    while True:
        settled_all = False
        if request is not None:
            chunk, position = request
            if len(produced) + 1 >= params.max_new_tokens:  # the generation's last step: its tail gets signed
                session.want_commit = True
            logits = await forward(chunk, position)
            states.append(steps.rng_state())
            scored = steps.sample(logits)
            produced.append(scored)
            request = steps.after(scored.token)
        else:
            await auditor.settle()
            settled_all = True
        detection = auditor.take_detection()
        if detection is not None:
            rollbacks += 1
            if rollbacks > MAX_ROLLBACKS:
                raise RuntimeError(f"{MAX_ROLLBACKS} servers caught lying in one generation; giving up")
            keep = keep_after_rollback(prompt, detection.position, released)
            if keep > max(prompt, detection.position + 1):
                log.error("a liar was caught at position %d after tokens up to %d were released (colluding "
                          "verifier?); the output is exact only from there", detection.position, prompt + released)
            # a lie in the prompt: from 0 (no step is cut in two: the hops' signed steps still bind their claims)
            d = keep - 1 if keep > prompt else 0
            kept = keep - prompt
            if kept >= len(produced):  # everything it could change was released already
                log.error("a liar was caught at position %d after every token was released", detection.position)
                await session.rewind(session.position, detection.hop)
                continue
            history = (ids + [t.token for t in produced])[:keep]
            state = states[kept]
            del produced[kept:]
            del states[kept:]
            steps.rewind(history, params.max_new_tokens - kept, state)
            await session.rewind(d, detection.hop)
            log.warning("rolled back to position %d (%d token(s) kept); generation goes on", d, kept)
            request = (history[d:keep], d)
            continue
        settled = len(produced) if settled_all else settled_tokens(auditor.verified_upto, prompt, len(produced))
        while released < settled:
            yield produced[released]
            released += 1
        if settled_all and released == len(produced):
            return
