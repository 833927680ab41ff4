"""Fixtures for the weight-distribution tests (issue 9): tiny checkpoints, private caches, partial copies."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint


@pytest.fixture(scope="session")
def llama(meshinfer_cache_dir: Path) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def llama_sharded(meshinfer_cache_dir: Path) -> Path:
    return tiny_checkpoint("llama", sharded=True)


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama: Path, llama_sharded: Path) -> Path:
    """A fresh ``$MESHINFER_CACHE_DIR`` for fingerprint caches (checkpoints were built before it is set)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MESHINFER_CACHE_DIR", str(root))
    return root


@pytest.fixture()
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    counter = iter(range(1000))

    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy-{next(counter)}"
        shutil.copytree(src, dst)
        return dst

    return copy
