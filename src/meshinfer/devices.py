"""Which torch device a process computes on, decided from what the machine has: pure decisions, no torch.

Contract: ``--device`` text (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) is parsed by ``parse_device``
into a ``DeviceChoice`` (a one-line ``ConfigError`` naming the accepted forms otherwise); configs call it to
validate without importing torch. ``choose_device(choice, facts)`` turns a choice into the concrete device
given ``DeviceFacts`` (how many CUDA devices torch sees, whether MPS is built and available): ``auto`` is the
first CUDA device, else MPS, else the CPU; asking for a device the machine does not have is a ``ConfigError``
that says why and what to use instead. ``default_dtype(kind, bf16_ok)`` is the compute dtype when none is
given: fp32 on CPU (exact, and what CPU kernels are fastest at for our matmuls), bf16 on CUDA (fp16 where the
GPU has no bf16), fp16 on MPS. ``kv_tokens_for(free_bytes, ...)`` sizes a KV cache budget from a device's free
memory. The effectful side (asking torch for the facts, memory, synchronisation) is ``models.device``. Knows
nothing of torch, files, the network or the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from meshinfer.errors import ConfigError

DEVICE_KINDS: Final = ("auto", "cpu", "cuda", "mps")
"""What ``--device`` accepts (``cuda`` also as ``cuda:N``)."""

DEVICE_HELP: Final = ("where to compute: auto (the first CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, "
                      "cuda:N or mps")
"""Flag help shared by every command that takes ``--device``."""

_PATTERN = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d{1,3}))?$")


@dataclass(frozen=True)
class DeviceChoice:
    """A parsed ``--device``: its kind and, for CUDA, the index asked for (None: the first / any)."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "mps")


@dataclass(frozen=True)
class DeviceFacts:
    """What the machine offers, as torch reports it (``models.device.device_facts``)."""

    cuda_count: int = 0
    mps: bool = False
    cuda_built: bool = False
    """Whether this torch build has CUDA at all (False: the CPU wheel; used only to explain errors)."""


def parse_device(text: str) -> DeviceChoice:
    """``text`` as a ``DeviceChoice`` (case-insensitive, surrounding blanks ignored) or a one-line ConfigError."""
    key = text.strip().lower()
    match = _PATTERN.match(key)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {str(text)[:32]!r}")
    index = int(match.group(2)) if match.group(2) is not None else None
    return DeviceChoice(match.group(1), index)


def _no_cuda(facts: DeviceFacts) -> str:
    if not facts.cuda_built:
        return "this torch build has no CUDA support (a CPU-only wheel); install a CUDA build of torch"
    return "torch sees no CUDA device (no driver loaded, or CUDA_VISIBLE_DEVICES hides them)"


def choose_device(choice: DeviceChoice, facts: DeviceFacts) -> DeviceChoice:
    """The concrete device for ``choice`` on a machine with ``facts`` (``auto`` resolved, ``cuda`` -> ``cuda:0``)."""
    if choice.kind == "auto":
        if facts.cuda_count > 0:
            return DeviceChoice("cuda", 0)
        return DeviceChoice("mps") if facts.mps else DeviceChoice("cpu")
    if choice.kind == "cuda":
        if facts.cuda_count <= 0:
            raise ConfigError(f"--device {choice}: {_no_cuda(facts)}; use --device cpu (or auto)")
        index = choice.index or 0
        if index >= facts.cuda_count:
            raise ConfigError(f"--device {choice}: this machine has {facts.cuda_count} CUDA device(s), "
                              f"cuda:0..cuda:{facts.cuda_count - 1}")
        return DeviceChoice("cuda", index)
    if choice.kind == "mps" and not facts.mps:
        raise ConfigError("--device mps: Apple MPS is not available here (it needs macOS on Apple silicon and a "
                          "torch build with MPS); use --device cpu (or auto)")
    return choice


def default_dtype(kind: str, bf16_ok: bool = True) -> str:
    """The compute dtype used when none is given: ``float32`` on CPU, ``bfloat16`` on CUDA (``float16`` when the
    GPU cannot do bf16), ``float16`` on MPS."""
    if kind == "cuda":
        return "bfloat16" if bf16_ok else "float16"
    if kind == "mps":
        return "float16"
    return "float32"


def kv_tokens_for(free_bytes: int, kv_bytes_per_token: int, *, fraction: float = 0.9,
                  reserve_bytes: int = 0, at_most: int | None = None) -> int:
    """KV cache tokens that fit in ``fraction`` of ``free_bytes`` less ``reserve_bytes`` (activations, the
    allocator's slack), at ``kv_bytes_per_token`` each; capped at ``at_most``; 0 when nothing fits."""
    if kv_bytes_per_token <= 0:
        raise ConfigError(f"kv_bytes_per_token must be > 0, got {kv_bytes_per_token}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    usable = int(max(0, free_bytes) * fraction) - max(0, reserve_bytes)
    tokens = max(0, usable) // kv_bytes_per_token
    return tokens if at_most is None else min(tokens, at_most)
