"""``config.cache_root``: the one place that decides the cache directory, from ``$MESHINFER_CACHE_DIR`` at call time."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshinfer.config import cache_root
from meshinfer.testing.checkpoints import cache_root as checkpoints_root
from meshinfer.weights.catalogue import catalogue_root
from meshinfer.weights.store import models_root


def test_the_environment_is_read_at_each_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHINFER_CACHE_DIR", str(tmp_path / "a"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.setenv("MESHINFER_CACHE_DIR", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "b"
    assert models_root() == tmp_path / "b" / "models"
    assert catalogue_root() == tmp_path / "b" / "catalogue"
    assert checkpoints_root() == tmp_path / "b" / "checkpoints"
    assert checkpoints_root(tmp_path / "given") == tmp_path / "given"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_means_the_home_cache(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("MESHINFER_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("MESHINFER_CACHE_DIR", value)
    assert cache_root() == Path.home() / ".cache" / "meshinfer"
