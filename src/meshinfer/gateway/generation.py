"""What the gateway generates with: the ``Generator`` protocol, the swarm's ``SwarmGenerator``, and the text
pipeline from token ids to OpenAI text deltas.

Contract: the HTTP layer (``gateway.app``) sees only ``Generator`` (a ``models.generator.ModelHandle``:
``tokenizer``, ``spec``, its ``max_position_embeddings`` and ``eos_token_ids``; plus an async face):
``stream(ids, params)`` (one ``GenerationParams``; an async iterator of ``ScoredToken``s that runs on the
caller's event loop; scored when ``params.top_logprobs`` is set), ``score`` and ``health()``; unit tests use a
fake. ``SwarmGenerator`` adapts the client's API (``DistributedModel.agenerate``, which must run on
``model.loop``, the client's own loop thread). When the gateway itself runs on ``model.loop`` (``ApiServer(...,
loop=model.loop)``, as ``meshinfer api`` and ``bench api`` do) a generation is iterated directly: no thread
hand-off per token. Otherwise each generation is started there with ``asyncio.run_coroutine_threadsafe`` and
hands its tokens to the gateway's loop through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``.
Either way closing the stream early (a stop string, a client that went away) cancels that generation, whose
session then closes itself on every server and frees its memory.

``generate_text`` turns the token stream into text deltas: ``IncrementalDetokenizer`` (never half a
character), then ``StopStringFilter`` (stop strings never emitted). Counting rules (``Outcome``):
``prompt_tokens`` is the number of tokens of the rendered prompt; ``completion_tokens`` is the number of
tokens actually generated for the answer, up to and including the token that ended it (an end-of-turn / eos
token, the token whose text completed a stop string, or the ``max_tokens``-th); a token the engine computed
ahead after a stop string had matched is discarded and not counted. ``finish_reason`` is ``stop`` when a stop
token or stop string ended the answer, else ``length``. With ``top_logprobs`` set, every counted token's
``TokenLogprob`` is appended to ``Outcome.logprobs`` before its text delta is yielded; a token's text is what
it adds after the few tokens before it (``token_text``), for the chosen token and each alternative alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from meshinfer.client.routing import NoRouteError
from meshinfer.errors import TransportError
from meshinfer.gateway.responses import FinishReason, StopStringFilter, TokenLogprob
from meshinfer.metrics import SessionMetrics
from meshinfer.models.detokenize import IncrementalDetokenizer, text_decoder
from meshinfer.models.generator import GenerationParams, ModelHandle
from meshinfer.models.sampling import ScoredToken

if TYPE_CHECKING:
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.spec import ModelSpec


class Generator(ModelHandle, Protocol):
    """A model the gateway can generate with: a ``models.generator.ModelHandle`` (spec, tokenizer) with an async
    face. It differs from the models layer's ``TextGenerator`` on purpose: the gateway runs on its own event
    loop, so a generation is an async iterator on the caller's loop, and it also scores prompts and reports
    health."""

    def stream(self, input_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[ScoredToken]:
        """Tokens as they are generated (with their log-probability and ``top_logprobs`` alternatives when
        that is set), on the caller's loop; ``aclose()`` abandons the generation."""
        ...

    async def score(self, input_ids: Sequence[int], top_logprobs: int) -> list[ScoredToken]:
        """Each token of ``input_ids`` after the first, scored at the position before it (for ``echo``)."""
        ...

    async def health(self) -> dict[str, Any]:
        """Whether the model can be served now: at least ``{"ok": bool}`` plus details."""
        ...


_END = object()


class SwarmGenerator:
    """A ``Generator`` over a ``DistributedModel`` (the client's public API only)."""

    def __init__(self, model: DistributedModel) -> None:
        self.model = model
        self.metrics = SessionMetrics.create()
        """Prometheus metrics of the gateway's generations (served at ``/metrics``)."""
        self._failovers_seen = 0

    def sync_metrics(self) -> None:
        """Bring counters kept by the client (failovers) into ``metrics``; call before a scrape."""
        total = self.model.failovers_total
        if total > self._failovers_seen:
            self.metrics.failovers.inc(total - self._failovers_seen)
            self._failovers_seen = total

    def prompt_cache_stats(self) -> dict[str, int]:
        """The client's prompt-cache counters (``client.prefix_cache.PromptCacheStats``) and ``held``: the
        sessions held now (for ``gateway.cachemetrics``; read on the client's loop)."""
        cache = self.model.prompt_cache
        return {**dataclasses.asdict(cache.stats), "held": len(cache)}

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    async def stream(self, input_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[ScoredToken]:
        on_client_loop = asyncio.get_running_loop() is self.model.loop  # then iterate the generation in place
        source = (self.model.agenerate(list(input_ids), params) if on_client_loop
                  else self._handed_off(input_ids, params))
        metrics = self.metrics
        metrics.sessions_open.inc()
        last = time.perf_counter()
        try:
            async with contextlib.aclosing(source) as tokens:
                async for token in tokens:
                    now = time.perf_counter()
                    metrics.step_seconds.observe(now - last)
                    metrics.tokens_served.inc()
                    last = now
                    yield token
        finally:
            metrics.sessions_open.dec()

    async def _handed_off(self, input_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[ScoredToken]:
        """The generation run on the client's loop, its tokens handed to the caller's loop through a queue."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the gateway's loop is closed: nobody listens any more
                loop.call_soon_threadsafe(tokens.put_nowait, item)

        async def produce() -> None:  # runs on the client's loop
            try:
                async with contextlib.aclosing(self.model.agenerate(list(input_ids), params)) as generation:
                    async for token in generation:
                        put(token)
                put(_END)
            except asyncio.CancelledError:  # by the consumer (then nobody reads this) or by the loop stopping
                put(TransportError("the generation was cancelled: the swarm client is shutting down"))
                raise
            except BaseException as err:  # handed to the gateway's loop
                put(err)

        future = asyncio.run_coroutine_threadsafe(produce(), self.model.loop)
        try:
            while True:
                item = await tokens.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()  # thread-safe; a no-op once the generation has finished

    async def score(self, input_ids: Sequence[int], top_logprobs: int) -> list[ScoredToken]:
        if asyncio.get_running_loop() is self.model.loop:
            return await self.model.ascore_prompt(list(input_ids), top_logprobs)
        future = asyncio.run_coroutine_threadsafe(self.model.ascore_prompt(list(input_ids), top_logprobs),
                                                  self.model.loop)
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # a no-op once it finished; else (the client went away) its session closes

    async def health(self) -> dict[str, Any]:
        if asyncio.get_running_loop() is self.model.loop:
            return await self._probe()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._probe(), self.model.loop))

    async def swarm_models(self) -> list[tuple[str, int]]:
        """``(model_id, blocks)`` of every model some live server of the swarm announces now."""
        if asyncio.get_running_loop() is self.model.loop:
            return await self._list_models()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._list_models(), self.model.loop))

    async def _list_models(self) -> list[tuple[str, int]]:
        from meshinfer.p2p.directory import list_models

        return [(e.card.model_id, e.card.num_blocks) for e in await list_models(self.model.view.node)]

    async def _probe(self) -> dict[str, Any]:
        model = self.model
        cov = await model.view.coverage(model.ref)
        info: dict[str, Any] = {
            "model_id": model.model_id, "num_blocks": model.spec.num_blocks, "servers": len(cov.servers),
            "servers_per_block": cov.counts(), "view_age_s": model.view.age(model.model_id),
        }
        try:
            middle = model.private.middle if model.private is not None else None  # a private split's route
            route = await model.view.plan(model.ref, blocks=middle, wait=0.0)
        except NoRouteError as err:
            return {"ok": False, "reason": str(err), **info}
        return {"ok": True, "route": [str(hop.span) for hop in route], **info}


@dataclass
class Outcome:
    """How a generation ended; filled in by ``generate_text`` as it runs (see the module docstring)."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason = "length"
    finished: bool = False
    """True once the answer is complete (False: abandoned or failed)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """With ``top_logprobs`` asked for: one entry per counted token, in order."""


CONTEXT_TOKENS = 4
"""How many tokens before a token ``token_text`` decodes it after (enough for spaces and merges)."""


def token_text(decode: Callable[[list[int]], str], before: Sequence[int], token: int) -> str:
    """The text ``token`` adds after the tokens ``before`` it (the last ``CONTEXT_TOKENS`` of them): so a
    tokenizer that drops a leading space when decoding a lone token still shows it. An incomplete UTF-8
    sequence shows as U+FFFD."""
    context = list(before[-CONTEXT_TOKENS:])
    prefix = decode(context)
    text = decode([*context, token])
    return text[len(prefix):] if text.startswith(prefix) else decode([token])


def _scored_entry(decode: Callable[[list[int]], str], before: Sequence[int], scored: ScoredToken) -> TokenLogprob:
    logprob = scored.logprob if scored.logprob is not None else float("nan")
    return TokenLogprob(token_text(decode, before, scored.token), logprob,
                        tuple((token_text(decode, before, t), lp) for t, lp in scored.top))


async def echo_prompt(generator: Generator, prompt_ids: Sequence[int], text: str, top_logprobs: int | None,
                      outcome: Outcome) -> str:
    """``text`` (the prompt as the answer repeats it, for ``echo``), after appending its tokens'
    ``TokenLogprob``s to ``outcome.logprobs`` when ``top_logprobs`` is set (the first with no score)."""
    if top_logprobs is None:
        return text
    decode = text_decoder(generator.tokenizer)
    scored = await generator.score(prompt_ids, top_logprobs)
    outcome.logprobs.append(TokenLogprob(decode([prompt_ids[0]]), None))
    outcome.logprobs += [_scored_entry(decode, prompt_ids[max(0, i + 1 - CONTEXT_TOKENS):i + 1], s)
                         for i, s in enumerate(scored)]
    return text


async def generate_text(generator: Generator, prompt_ids: Sequence[int], params: GenerationParams,
                        stop: Sequence[str], outcome: Outcome, keep: Mapping[int, str] | None = None
                        ) -> AsyncIterator[str]:
    """Text deltas of the answer: one item per generated token (possibly ``""``: the first item marks the
    first token), then the held-back tail. ``outcome`` says how it ended once the iterator is exhausted (and,
    with ``params.top_logprobs`` set, holds each token's ``TokenLogprob``). Special tokens are skipped but those
    in ``keep`` (id -> text: ``models.detokenize.text_decoder``)."""
    decode = text_decoder(generator.tokenizer, keep)
    detok = IncrementalDetokenizer(decode)
    stops = StopStringFilter(stop)
    stop_ids = params.stops(generator.spec.eos_token_ids)
    top_logprobs = params.top_logprobs
    before = list(prompt_ids[-CONTEXT_TOKENS:])
    last = None
    async with contextlib.aclosing(generator.stream(prompt_ids, params)) as scored_tokens:
        async for scored in scored_tokens:
            token = scored.token
            outcome.completion_tokens += 1
            if top_logprobs is not None:
                outcome.logprobs.append(_scored_entry(decode, before, scored))
                before = [*before[1 - CONTEXT_TOKENS:], token]
            last = token
            piece = stops.push(detok.push(token))
            yield piece
            if stops.stopped:
                break
    if not stops.stopped:
        tail = stops.push(detok.flush())
        tail += stops.flush()
        if tail:
            yield tail
    outcome.finish_reason = "stop" if stops.stopped or last in stop_ids else "length"
    outcome.finished = True
