"""What the gateway generates with: the ``Generator`` protocol, the swarm's ``SwarmGenerator``, and the text
pipeline from token ids to OpenAI text deltas.

Contract: the HTTP layer (``gateway.app``) sees only ``Generator``: ``tokenizer``, ``spec`` (its
``max_position_embeddings`` and ``eos_token_ids``), ``stream(ids, max_new_tokens, sampling, stop_token_ids)``
(an async iterator of token ids that runs on the caller's event loop) and ``health()``; unit tests use a
fake. ``SwarmGenerator`` adapts the client's public API (``DistributedModel.astream``, which must run on
``model.loop``, the client's own loop thread): each generation is started there with
``asyncio.run_coroutine_threadsafe`` and hands its tokens to the gateway's loop through an ``asyncio.Queue``
fed with ``loop.call_soon_threadsafe``; closing the stream early (a stop string, a client that went away)
cancels that generation, whose session then closes itself on every server and frees its memory.

``generate_text`` turns the token stream into text deltas: ``IncrementalDetokenizer`` (never half a
character), then ``StopStringFilter`` (stop strings never emitted). Counting rules (``Outcome``):
``prompt_tokens`` is the number of tokens of the rendered prompt; ``completion_tokens`` is the number of
tokens actually generated for the answer, up to and including the token that ended it (an end-of-turn / eos
token, the token whose text completed a stop string, or the ``max_tokens``-th); a token the engine computed
ahead after a stop string had matched is discarded and not counted. ``finish_reason`` is ``stop`` when a stop
token or stop string ended the answer, else ``length``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meshinfer.client.routing import NoRouteError
from meshinfer.config import SamplingConfig
from meshinfer.errors import TransportError
from meshinfer.gateway.responses import FinishReason, StopStringFilter
from meshinfer.metrics import SessionMetrics
from meshinfer.models.detokenize import IncrementalDetokenizer, text_decoder

if TYPE_CHECKING:
    from meshinfer.client.model import DistributedModel


class Generator(Protocol):
    """A model the gateway can generate with."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def spec(self) -> Any: ...

    def stream(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig,
               stop_token_ids: Collection[int]) -> AsyncIterator[int]:
        """Token ids as they are generated, on the caller's loop; ``aclose()`` abandons the generation."""
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

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def spec(self) -> Any:
        return self.model.spec

    async def stream(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig,
                     stop_token_ids: Collection[int]) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the gateway's loop is closed: nobody listens any more
                loop.call_soon_threadsafe(tokens.put_nowait, item)

        async def produce() -> None:  # runs on the client's loop
            try:
                async with contextlib.aclosing(self.model.astream(list(input_ids), max_new_tokens, sampling,
                                                                  stop_token_ids)) as generation:
                    async for token in generation:
                        put(token)
                put(_END)
            except asyncio.CancelledError:  # by the consumer (then nobody reads this) or by the loop stopping
                put(TransportError("the generation was cancelled: the swarm client is shutting down"))
                raise
            except BaseException as err:  # handed to the gateway's loop
                put(err)

        future = asyncio.run_coroutine_threadsafe(produce(), self.model.loop)
        metrics = self.metrics
        metrics.sessions_open.inc()
        last = time.perf_counter()
        try:
            while True:
                item = await tokens.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                now = time.perf_counter()
                metrics.step_seconds.observe(now - last)
                metrics.tokens_served.inc()
                last = now
                yield int(item)
        finally:
            metrics.sessions_open.dec()
            future.cancel()  # thread-safe; a no-op once the generation has finished

    async def health(self) -> dict[str, Any]:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._probe(), self.model.loop))

    async def _probe(self) -> dict[str, Any]:
        model = self.model
        cov = await model.view.coverage(model.model)
        info: dict[str, Any] = {
            "model_id": model.model_id, "num_blocks": model.spec.num_blocks, "servers": len(cov.servers),
            "servers_per_block": cov.counts(), "view_age_s": model.view.age(model.model_id),
        }
        try:
            route = await model.view.plan(model.model, wait=0.0)
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


async def generate_text(generator: Generator, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingConfig,
                        stop_token_ids: Collection[int], stop: Sequence[str], outcome: Outcome) -> AsyncIterator[str]:
    """Text deltas of the answer: one item per generated token (possibly ``""``: the first item marks the
    first token), then the held-back tail. ``outcome`` says how it ended once the iterator is exhausted."""
    detok = IncrementalDetokenizer(text_decoder(generator.tokenizer))
    stops = StopStringFilter(stop)
    stop_ids = frozenset(stop_token_ids)
    last = None
    async with contextlib.aclosing(generator.stream(prompt_ids, max_tokens, sampling, stop_ids)) as tokens:
        async for token in tokens:
            outcome.completion_tokens += 1
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
