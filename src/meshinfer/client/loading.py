"""What ``DistributedModel.from_pretrained`` does before a model exists: join the swarm, fetch and load the
client's share of a checkpoint.

Contract: ``join_swarm(initial_peers, config)`` starts a client ``LoopThread`` and joins a client-mode
``SwarmView`` on it (empty ``initial_peers``: the peers found on this LAN by mDNS); on failure nothing is left
running. ``load_client_part(path, dtype, config, runner, view, model_name)`` resolves ``config.device`` and the
dtypes (a device this machine lacks is a ConfigError), fetches what is missing of ``path`` through the view's peer
(``weights.fetch.ensure_local``: a model id from the swarm's seeders; with ``config.private_blocks`` K, blocks
[0, K) and [n - K, n) too) and loads the head (embeddings, final norm, LM head: ``ClientHead``) and the private
blocks, returning them with the model's ``ModelRef`` (id = ``checkpoint_fingerprint``) as a ``ClientPart``. It
starts nothing and closes nothing: the caller owns the loop and the peer. Knows nothing of sessions or generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from meshinfer.client.config import ClientConfig
from meshinfer.client.private_split import PrivateBlocks, ensure_private_blocks
from meshinfer.client.swarm import ModelRef, SwarmView, check_initial_peers
from meshinfer.loopthread import LoopThread
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.fingerprint import checkpoint_fingerprint
from meshinfer.models.head import ClientHead
from meshinfer.models.kv_cache import torch_dtype
from meshinfer.models.ops import autotune_linear, layer_weights
from meshinfer.models.spec import ModelSpec
from meshinfer.weights.fetch import ensure_local
from meshinfer.weights.resolve import display_name


@dataclass(frozen=True)
class ClientPart:
    """A model's share loaded on this machine."""

    spec: ModelSpec
    head: ClientHead
    ref: ModelRef
    path: Path
    wire_dtype: str
    """The dtype of the hidden states on the wire (``auto`` read as float32: see ``from_pretrained``)."""
    private: PrivateBlocks | None


def check_device(config: ClientConfig, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype, str]:
    """``(device, compute dtype, wire dtype)`` for ``config.device`` and ``dtype``; ConfigError for a device this
    machine lacks or a dtype it cannot compute in."""
    from meshinfer.models.device import check_device_dtype, resolve_device, resolve_dtype

    where = resolve_device(config.device)
    compute = resolve_dtype(dtype, where)
    check_device_dtype(where, compute)
    return where, torch_dtype(compute), resolve_dtype(dtype, torch.device("cpu"))


def join_swarm(initial_peers: Sequence[str], config: ClientConfig) -> tuple[LoopThread, SwarmView]:
    """A started client loop and a client-mode peer on it (see the module docstring)."""
    peers = check_initial_peers(initial_peers) if initial_peers else ()
    runner = LoopThread("meshinfer-client").start()
    try:
        view = runner.run(SwarmView.join(peers, host=config.host, identity=config.identity,
                                         dht_timeout=config.dht_timeout, prior_cap=config.prior_cap,
                                         spread=config.spread, refuted_ban=config.refuted_ban,
                                         swarm_key=config.swarm_key, swarm_allow=config.swarm_allow),
                          timeout=config.join_timeout)
    except BaseException:
        runner.stop()
        raise
    return runner, view


def load_client_part(path: str | Path, dtype: str | torch.dtype, config: ClientConfig, runner: LoopThread,
                     view: SwarmView, model_name: str | None = None) -> ClientPart:
    """Fetch what is missing and load the head (see the module docstring); ``model_name``: the name shown
    (default: from ``path``)."""
    from meshinfer.models.quant import QuantConfig

    where, dt, wire = check_device(config, dtype)
    local = runner.run(ensure_local(view.node, str(path), blocks=None, client_part=True,
                                    max_download=config.max_download), timeout=config.fetch_timeout)
    if config.private_blocks:  # blocks [0, K) and [n - K, n) too (client.private_split)
        local = runner.run(ensure_private_blocks(view.node, str(path), local, config.private_blocks,
                                                 config.max_download), timeout=config.fetch_timeout)
    ckpt = Checkpoint(local)
    head = ckpt.load_head(dt, where, quant=QuantConfig(config.head_quant))
    private = PrivateBlocks.load(ckpt, config.private_blocks, dt, where) if config.private_blocks else None
    autotune_linear(layer_weights(head))  # CPU fp32 heads only: oneDNN or MKL, timed once
    ref = ModelRef(checkpoint_fingerprint(local), ckpt.spec.num_blocks, model_name or display_name(str(path), local),
                   quant=config.quant)
    return ClientPart(ckpt.spec, head, ref, local, wire, private)
