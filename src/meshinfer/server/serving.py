"""What a block server serves with: the span it loaded (``Serving``, what a move swaps as one), who it is
(``Identity``: its announced record and metrics sample) and the two steps every (re)load repeats.

Contract: ``load_serving`` loads a span of a checkpoint and measures it on a new step loop, not yet started
(the caller starts it once the session service runs over it); a failed measurement stops that loop.
``publish`` publishes a record at once, logging (not raising) a DHT that does not answer within
``PUBLISH_TIMEOUT``. ``Identity.record``/``Identity.sample`` take ``serving`` and ``service`` as None before
the first span is loaded (the first ``joining`` record: no throughput, the whole KV budget left, 0 while a GPU's
budget is not yet sized). Spans load on the server's device (``server.device``) in its resolved dtype, and the
record announces both (``device``: the label, ``dtype``). Used by ``server.app`` only; logs, never prints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshinfer import __version__
from meshinfer.errors import MeshinferError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.ops import autotune_linear, layer_weights
from meshinfer.models.quant import weight_bytes
from meshinfer.p2p.announce import Announcer
from meshinfer.p2p.node import PeerNode
from meshinfer.server.config import ServerConfig
from meshinfer.server.device import ServerDevice, describe
from meshinfer.server.handler import SessionService
from meshinfer.server.metrics import ServerMetrics, ServerSample
from meshinfer.server.prepare import quant_config
from meshinfer.server.runtime import DeliverFn, StepLoop
from meshinfer.server.throughput import TYPICAL_BATCH, Throughput, measure_throughputs
from meshinfer.types import BlockRange
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import PROTOCOL_VERSION
from meshinfer.wire.records import ModelCard, ServerRecord, ServerState

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
"""Most seconds one state change waits for the DHT (the refresh task retries after that)."""


@dataclass
class Serving:
    """What a move swaps, as one: the span loaded, its step loop, its measured throughput, its weights' size."""

    span: BlockRange
    steps: StepLoop
    measured: Throughput
    weight_bytes: int
    """Bytes of the span's weights, as held (quantized or not); announced."""


@dataclass(frozen=True)
class Identity:
    """Who the server is in the swarm; builds its record and its metrics sample from the serving state."""

    config: ServerConfig
    node: PeerNode
    model_id: str
    card: ModelCard
    device: ServerDevice

    def record(self, span: BlockRange, state: ServerState, serving: Serving | None,
               service: SessionService | None) -> ServerRecord:
        """The announced record (``serving``/``service`` None: nothing loaded yet, the first ``joining``)."""
        cfg, measured = self.config, serving.measured if serving is not None else None
        budget = cfg.cache_tokens or 0  # unset only before a GPU's budget is sized (joining)
        return ServerRecord(
            peer_id=self.node.peer_id, model_id=self.model_id, span=span, state=state,
            throughput=measured.single if measured is not None else 0.0,
            cache_tokens_left=service.budget.tokens_left if service is not None else budget,
            addresses=self.node.maddrs[:16], direct_addresses=self.node.direct_addresses[:8],
            sessions=len(service.sessions) if service is not None else 0,
            queued_steps=serving.steps.queued_steps if serving is not None else 0,
            batch_throughput=measured.batch if measured is not None else 0.0,
            batch_size=measured.batch_size if measured is not None else 0,
            software_version=__version__, public_name=cfg.public_name, protocol_version=PROTOCOL_VERSION,
            quant=cfg.quant, weight_bytes=serving.weight_bytes if serving is not None else 0,
            device=self.device.label, dtype=cfg.dtype, credit_to=cfg.credit_to,
        )

    def sample(self, span: BlockRange, state: ServerState, serving: Serving | None,
               service: SessionService | None) -> ServerSample:
        """The levels ``ServerMetrics`` exports (read on the server's event loop)."""
        budget = self.config.cache_tokens or 0  # unset only before a GPU's budget is sized (joining)
        left = service.budget.tokens_left if service is not None else budget
        return ServerSample(
            sessions_open=len(service.sessions) if service is not None else 0,
            queued_steps=serving.steps.queued_steps if serving is not None else 0,
            kv_tokens_used=budget - left, kv_tokens_capacity=budget,
            throughput=serving.measured.single if serving is not None else 0.0, state=state,
            peer_id=self.node.peer_id, model_id=self.model_id, model_name=self.card.name, span=str(span),
            version=__version__, device=self.device.label, device_memory=self.device.memory_used_free())


async def publish(announcer: Announcer, record: ServerRecord) -> None:
    """Publish ``record`` at once (not through the refresh task: no racing duplicate); a DHT that does not
    answer in time is logged and left to the refresh task."""
    announcer.record = record
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            await announcer.publish()
    except (TimeoutError, MeshinferError) as err:
        log.warning("could not announce %s blocks %s now (%s); the refresh will retry",
                    record.state, record.span, str(err) or "timeout")


async def load_serving(config: ServerConfig, ckpt: Checkpoint, span_range: BlockRange, deliver: DeliverFn,
                metrics: ServerMetrics | None, device: ServerDevice,
                credit: Callable[[str], int] | None = None) -> Serving:
    """Load ``span_range`` on ``device`` and measure it on a new (not yet started) step loop."""
    t0 = time.perf_counter()
    span = await asyncio.to_thread(ckpt.load_span, span_range, config.dtype, device.device, quant_config(config))
    held = weight_bytes(span)
    if device.is_cpu:
        await asyncio.to_thread(autotune_linear, layer_weights(span))  # once per process: oneDNN or MKL
    if config.compile:  # CUDA only (server.device.open_device refuses it elsewhere): graphed decode per session
        span.compile_decode()
    log.info("loaded blocks %s on %s (%s, weights %s: %.1f MB) in %.2f s", span_range, describe(device),
             config.dtype, config.quant, held / 1e6, time.perf_counter() - t0)
    steps = StepLoop(span, deliver, limits=DEFAULT_LIMITS, max_batch_sessions=config.max_batch_sessions,
                     credit=credit, priority=config.priority_policy())
    steps.on_step = metrics.on_step if metrics is not None else None
    try:
        measured = await steps.call(measure_throughputs, span, TYPICAL_BATCH)
    except BaseException:
        await steps.stop()
        raise
    log.info("measured %.1f decode tokens/s for blocks %s (%.1f aggregate at %d sessions)",
             measured.single, span_range, measured.batch, measured.batch_size)
    return Serving(span_range, steps, measured, held)
