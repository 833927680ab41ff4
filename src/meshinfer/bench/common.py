"""Helpers shared by benchmark modules.

Contract: small, import-light functions (no torch, no network at import) that several ``bench/<kind>.py``
modules need: which checkpoint a run uses, how a list of counts is parsed, what a percentile is (one
definition for every benchmark's p95). Never asserts or times anything itself.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshinfer.errors import ConfigError

if TYPE_CHECKING:
    from meshinfer.models.engine import LocalModel


def bench_model_dir(model: str | None) -> Path:
    """``--model``: the given checkpoint directory, or (None) the bench checkpoint, built on first use."""
    if model is None:
        from meshinfer.testing.checkpoints import bench_checkpoint

        print("preparing the bench checkpoint (built once, then cached)...", file=sys.stderr, flush=True)
        return bench_checkpoint()
    return _given_dir(model)


def demo_model_dir(model: str | None) -> Path:
    """``--model``: the given checkpoint directory, or (None) the built-in demo checkpoint (chaos, soak)."""
    if model is None:
        from meshinfer.testing.checkpoints import demo_checkpoint

        return demo_checkpoint()
    return _given_dir(model)


def _given_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model directory {model!r} does not exist")
    return path


@dataclass(frozen=True)
class SwarmBenchSetup:
    """What a swarm benchmark starts from: the checkpoint, its dtype, the reference ``LocalModel`` (same
    process, same threads) and the 1-minute load average before anything was loaded."""

    path: Path
    dtype: str
    local: LocalModel
    load_before: float


def swarm_bench_setup(args: argparse.Namespace, context_tokens: int) -> SwarmBenchSetup:
    """``--model``, ``--dtype`` and ``--torch-threads`` applied: the reference model loaded; a ConfigError when
    ``context_tokens`` (prompt + new tokens) does not fit the model's context."""
    import torch

    from meshinfer.models.engine import LocalModel
    from meshinfer.types import canonical_dtype

    dtype = canonical_dtype(args.dtype)
    path = bench_model_dir(args.model)
    torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()[0]
    local = LocalModel.from_pretrained(path, dtype=dtype)
    if local.spec.max_position_embeddings < context_tokens:
        raise ConfigError(f"--prompt-tokens + --new-tokens exceeds the model's context of "
                          f"{local.spec.max_position_embeddings}")
    return SwarmBenchSetup(path, dtype, local, load_before)


def parse_counts(text: str, flag: str, limit: int) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (ascending, duplicates dropped), each in 1..``limit``; ConfigError naming
    ``flag`` for anything else."""
    counts: set[int] = set()
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise ConfigError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
        if not 1 <= n <= limit:
            raise ConfigError(f"each {flag} value must be in 1..{limit}, got {n}")
        counts.add(n)
    return sorted(counts)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, interpolating linearly between ranks (numpy's default, so
    ``q=0.5`` is the median)."""
    if not values:
        raise ConfigError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"quantile must be in 0..1, got {q}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
