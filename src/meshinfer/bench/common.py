"""Helpers shared by benchmark modules.

Contract: small, import-light functions (no torch, no network at import) that several ``bench/<kind>.py``
modules need: which checkpoint a run uses, how a list of counts is parsed, what a percentile is (one
definition for every benchmark's p95). Never asserts or times anything itself.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from meshinfer.errors import ConfigError


def bench_model_dir(model: str | None) -> Path:
    """``--model``: the given checkpoint directory, or (None) the bench checkpoint, built on first use."""
    if model is None:
        from meshinfer.testing.checkpoints import bench_checkpoint

        print("preparing the bench checkpoint (built once, then cached)...", file=sys.stderr, flush=True)
        return bench_checkpoint()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model directory {model!r} does not exist")
    return path


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
