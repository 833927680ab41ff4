"""Helpers shared by benchmark modules.

Contract: small, import-light functions (no torch, no network at import) that several ``bench/<kind>.py``
modules need: which checkpoint a run uses. Never asserts or times anything itself.
"""

from __future__ import annotations

import sys
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
