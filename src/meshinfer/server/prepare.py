"""Before a block server serves: its checkpoint checked, its model id and card, its node and its span.

Contract: ``prepare(config, p2p, model_ref)`` does everything ``BlockServer.start`` needs before it loads a
span, in this order, and returns a ``Prepared``:

- a local directory is read and checked (the tensors of ``--blocks``, or of every block for a
  self-placing server, which may move anywhere) *before* any network is touched, so bad input fails
  fast with a one-line ``MeshinferError``; a model id (or hub name) is fetched instead: config and
  tokenizer first (``weights.fetch.ensure_local``, at most ``--max-download``), since the span to fetch
  is chosen from the config;
- the model id (``models.fingerprint.checkpoint_fingerprint``) and the ``ModelCard`` to announce;
- the ``PeerNode`` (started once, reused for the fetch);
- the span: ``--blocks``, else chosen from the swarm read through the node (``server.rebalance``:
  length from ``--num-blocks`` or memory, start where the swarm is weakest); a fetched model then
  gets that span's pieces. Memory means the device's: a GPU's free memory (``server.device.free_memory``),
  the CPU's available memory otherwise; ``config`` arrives with ``--device``/``--dtype`` already resolved.

On any failure the node it started is closed before the error propagates. ``read_snapshot`` is the
DHT reader that the start-up choice and the rebalancer share. It knows nothing of step loops, sessions
or announcing; this module logs, never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, MeshinferError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.device import resolve_device
from meshinfer.models.fingerprint import checkpoint_fingerprint
from meshinfer.models.spec import ModelSpec
from meshinfer.p2p.announce import read_coverage
from meshinfer.p2p.node import NodeSettings, PeerNode
from meshinfer.server.config import CPU_CACHE_TOKENS, ServerConfig
from meshinfer.server.device import DTYPE_BYTES, free_memory
from meshinfer.server.rebalance import Snapshot, auto_span_length, choose_start_span
from meshinfer.types import DTYPES, BlockRange, canonical_dtype
from meshinfer.weights.fetch import ensure_local
from meshinfer.wire.records import ModelCard

if TYPE_CHECKING:
    from meshinfer.models.quant import QuantConfig

log = logging.getLogger(__name__)

DHT_READ_TIMEOUT = 5.0
"""Most seconds one read of the swarm's coverage may take."""


@dataclass
class Prepared:
    """What ``prepare`` hands to the server: all of it checked, the node started."""

    model_dir: Path
    ckpt: Checkpoint
    model_id: str
    card: ModelCard
    node: PeerNode
    span: BlockRange
    fetched: bool
    """The model came from the swarm (a model id or hub name), not from a local directory."""


def card_dtype(spec_dtype: str | None, fallback: str) -> str:
    """The dtype a model card announces: the checkpoint's own when it names one we know, else ``fallback``."""
    with contextlib.suppress(ConfigError, AttributeError):
        name = canonical_dtype(spec_dtype or "")
        if name in DTYPES:
            return name
    return fallback


def span_length(config: ServerConfig, spec: ModelSpec, gguf_q4: bool = False) -> tuple[int, str]:
    """How many blocks an automatically placed server serves (``--num-blocks``, else what memory holds: weights
    counted as they will be held, quantized with ``--quant``; ``gguf_q4``: int4 keeps a GGUF's groups of 32).
    Memory is the device's (``server.device.free_memory``: a GPU's own, else the CPU's); an automatic KV budget,
    not known before the weights are loaded, counts as ``CPU_CACHE_TOKENS`` here."""
    from meshinfer.models.quant import GGUF_GROUP, block_weight_bytes

    size = DTYPE_BYTES.get(config.dtype, 4)
    quant = quant_config(config)
    native = gguf_q4 and quant.takes_gguf_q4
    device = resolve_device(config.device)
    return auto_span_length(
        spec.num_blocks, requested=config.num_blocks,
        free_bytes=free_memory(device) if config.num_blocks is None else None,
        weight_bytes=block_weight_bytes(spec, quant, size, GGUF_GROUP if native else None, device.type),
        kv_bytes=spec.kv_cache_bytes(1, config.cache_tokens or CPU_CACHE_TOKENS, dtype_bytes=size),
    )


def quant_config(config: ServerConfig) -> QuantConfig:
    """The ``models.quant`` configuration of ``--quant`` / ``--quant-group-size``."""
    from meshinfer.models.quant import QuantConfig

    return QuantConfig(config.quant, config.quant_group_size)


async def read_snapshot(node: PeerNode, model_id: str, num_blocks: int) -> Snapshot:
    """The model's servers as the DHT shows them now; a failed read is an empty, incomplete snapshot."""
    try:
        coverage = await read_coverage(node, model_id, num_blocks, timeout=DHT_READ_TIMEOUT)
    except (MeshinferError, TimeoutError) as err:
        log.warning("could not read the swarm's coverage: %s", str(err) or "timeout")
        return Snapshot([], complete=False)
    return Snapshot(list(coverage.servers.values()), coverage.complete)


def _check_local(ckpt: Checkpoint, fixed: BlockRange | None) -> None:
    spec = ckpt.spec
    needed = fixed or BlockRange(0, spec.num_blocks)  # a self-placing server may move to any block
    expected: dict[str, tuple[int, ...]] = {}
    for i in needed.blocks():
        expected.update(spec.block_tensors(i))
    ckpt.check(expected, f"blocks {needed}")


async def prepare(config: ServerConfig, p2p: P2PConfig, model_ref: str, settings: NodeSettings) -> Prepared:
    """Check, identify, join and place; see the module docstring."""
    model_dir = Path(model_ref).expanduser()
    fetched = not model_dir.is_dir()
    fixed = config.span
    node: PeerNode | None = None
    try:
        if fetched:
            node = await PeerNode.start(p2p, settings)
            model_dir = await ensure_local(node, model_ref, blocks=None, client_part=False,
                                           max_download=config.max_download_bytes)
        ckpt = await asyncio.to_thread(Checkpoint, model_dir)
        spec = ckpt.spec
        if fixed is not None and fixed.end > spec.num_blocks:
            raise ConfigError(f"--blocks {fixed} lies outside the model: {model_dir.name} has "
                              f"{spec.num_blocks} blocks (valid: 0:{spec.num_blocks} or any part of it)")
        if not fetched:
            _check_local(ckpt, fixed)
        length, why_length = (span_length(config, spec, ckpt.has_gguf_q4) if fixed is None
                              else (len(fixed), "--blocks"))
        model_id = await asyncio.to_thread(checkpoint_fingerprint, model_dir)
        name = config.model_name or (model_dir.resolve().name if not fetched else model_ref)
        card = ModelCard(model_id=model_id, name=name[:256], family=spec.family, num_blocks=spec.num_blocks,
                         hidden_size=spec.hidden_size, dtype=card_dtype(spec.torch_dtype, config.dtype),
                         manifest_hash=model_id)
        if node is None:
            node = await PeerNode.start(p2p, settings)
        started = node
        if fixed is None:
            fixed, why = await choose_start_span(
                lambda: read_snapshot(started, model_id, spec.num_blocks), num_blocks=spec.num_blocks,
                length=length, peer_id=started.peer_id, rng=random.Random())
            log.info("automatic placement: blocks %s of %d; length: %s; place: %s", fixed, spec.num_blocks,
                     why_length, why)
        if fetched:
            model_dir = await ensure_local(started, model_ref, blocks=fixed, client_part=False,
                                           max_download=config.max_download_bytes)
            ckpt = await asyncio.to_thread(Checkpoint, model_dir)  # re-read: the span's tensors arrived
    except BaseException:
        if node is not None:
            await node.close()
        raise
    return Prepared(model_dir=model_dir, ckpt=ckpt, model_id=model_id, card=card, node=started, span=fixed,
                    fetched=fetched)
