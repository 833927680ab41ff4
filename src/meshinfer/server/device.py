"""Where a block server computes: its device and dtype resolved at start, and its KV budget sized on it.

Contract: ``open_device(config)`` resolves ``--device`` and ``--dtype`` on this machine (``models.device``: a device
the machine lacks, a dtype it cannot compute in, or a ``--quant`` mode it cannot hold, is a one-line ``ConfigError``
naming the fix, raised before the server touches the network) and returns the config with both made concrete and, on
the CPU, ``--cache-tokens`` unset made ``CPU_CACHE_TOKENS`` (exactly today's behaviour), together with the
``ServerDevice`` (the torch device, its label for people and announcements). ``size_cache(config, span, device)``
runs once the span's weights are loaded: an unset ``--cache-tokens`` on a GPU becomes what
``server.config.auto_cache_tokens`` fits in the device's free memory now (``ConfigError`` when nothing fits).
``free_memory(device)`` is the free memory placement sizes a span with: the device's own on a GPU, the CPU path of
``server.rebalance.available_memory`` otherwise. ``describe(device)`` is the start-up log line. Knows nothing of
sessions, steps or the network; logs, never prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from meshinfer.errors import ConfigError
from meshinfer.models.device import (
    check_device_dtype,
    device_label,
    memory_info,
    release_cached,
    resolve_device,
    resolve_dtype,
)
from meshinfer.models.quant import check_quant_device
from meshinfer.models.span import BlockSpan
from meshinfer.server.config import CPU_CACHE_TOKENS, ServerConfig, activation_reserve, auto_cache_tokens
from meshinfer.server.rebalance import available_memory

log = logging.getLogger(__name__)

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ServerDevice:
    """The device a server's span computes on."""

    device: torch.device
    label: str
    """``NVIDIA H200``, ``Apple MPS`` or ``cpu`` (announced in ``ServerRecord.device``)."""

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def memory_used_free(self) -> tuple[int, int] | None:
        """(used, free) bytes of a GPU's memory now (metrics); None on the CPU."""
        if self.is_cpu:
            return None
        mem = memory_info(self.device)
        return (mem[1] - mem[0], mem[0]) if mem is not None else None


def open_device(config: ServerConfig) -> tuple[ServerConfig, ServerDevice]:
    """``config`` with ``--device``/``--dtype`` resolved on this machine (and, on the CPU, the KV budget)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    check_device_dtype(device, dtype)
    check_quant_device(device, config.quant)  # e.g. int4 on a GPU without bf16 tensor cores: refused before loading
    if config.compile and device.type != "cuda":
        raise ConfigError(f"--compile on a server needs a CUDA device (it captures CUDA graphs per session), not "
                          f"{device}; for a local model on the CPU use `meshinfer generate --compile`")
    cache = config.cache_tokens
    if cache is None and device.type == "cpu":
        cache = CPU_CACHE_TOKENS
    dev = ServerDevice(device, device_label(device)[:64])
    return config.resolved(device=str(device), dtype=dtype, cache_tokens=cache), dev


def describe(dev: ServerDevice) -> str:
    """``NVIDIA H200, 120.3 GiB free of 139.8 GiB`` (``cpu, 12.1 GiB free of 16.0 GiB``; memory where known)."""
    mem = memory_info(dev.device)
    if mem is None:
        return dev.label
    return f"{dev.label}, {mem[0] / GIB:.1f} GiB free of {mem[1] / GIB:.1f} GiB"


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a span's weights and KV cache: the GPU's own memory, or the CPU's available memory."""
    if device.type == "cpu":
        return available_memory()
    mem = memory_info(device)
    return mem[0] if mem is not None else None


def size_cache(config: ServerConfig, span: BlockSpan, dev: ServerDevice) -> ServerConfig:
    """``config`` with its KV budget known: as given, or sized on ``dev`` now that ``span``'s weights are loaded."""
    if config.cache_tokens is not None:
        return config
    release_cached(dev.device)  # the measurement's scratch caches: free, not held by the allocator
    mem = memory_info(dev.device)
    free = mem[0] if mem is not None else None
    per_token = span.cache_bytes(1)  # K+V of every block of the span, one token, in the compute dtype
    spec = span.spec
    reserve = activation_reserve(config.max_step_tokens, spec.hidden_size, spec.intermediate_size,
                                 DTYPE_BYTES.get(config.dtype, 4))
    tokens = auto_cache_tokens(dev.device.type, free, per_token, reserve)
    if tokens <= 0:
        raise ConfigError(f"no room for a KV cache on {dev.label} after loading blocks {span.range} "
                          f"({(free or 0) / GIB:.1f} GiB free, {reserve / GIB:.2f} GiB kept for activations): "
                          f"serve fewer blocks (--num-blocks/--blocks), use --quant int8/int4, or set --cache-tokens")
    log.info("KV cache budget: %d tokens (%.1f GiB of %.1f GiB free on %s, %d bytes per token)", tokens,
             tokens * per_token / GIB, (free or 0) / GIB, dev.label, per_token)
    return config.resolved(device=config.device, dtype=config.dtype, cache_tokens=tokens)
