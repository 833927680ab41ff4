"""``checkpoint_fingerprint``: same bytes, same id; any change, a new id; the sidecar is only a cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from meshinfer.errors import CheckpointError
from meshinfer.models import fingerprint as fp
from meshinfer.models.fingerprint import checkpoint_fingerprint


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MESHINFER_CACHE_DIR", str(root))
    return root


def _make(dir_: Path, weights: bytes = b"w" * 100, config: str = '{"a": 1}', shards: int = 1) -> Path:
    dir_.mkdir(parents=True)
    (dir_ / "config.json").write_text(config)
    for i in range(shards):
        (dir_ / f"model-{i}.safetensors").write_bytes(weights + bytes([i]))
    (dir_ / "tokenizer.json").write_text("{}")  # not part of the fingerprint
    return dir_


def test_same_bytes_same_id_anywhere(tmp_path: Path, cache: Path) -> None:
    a = _make(tmp_path / "a", shards=2)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    ida = checkpoint_fingerprint(a)
    assert len(ida) == fp.FINGERPRINT_HEX_CHARS and int(ida, 16) >= 0
    assert checkpoint_fingerprint(b) == ida
    (b / "tokenizer.json").write_text('{"changed": true}')
    assert checkpoint_fingerprint(b) == ida


def test_any_change_gives_a_new_id(tmp_path: Path, cache: Path) -> None:
    base = checkpoint_fingerprint(_make(tmp_path / "base"))
    assert checkpoint_fingerprint(_make(tmp_path / "w", weights=b"w" * 99 + b"x")) != base
    assert checkpoint_fingerprint(_make(tmp_path / "c", config='{"a": 2}')) != base
    assert checkpoint_fingerprint(_make(tmp_path / "s", shards=2)) != base
    d = _make(tmp_path / "edited")
    assert checkpoint_fingerprint(d) == base
    (d / "model-0.safetensors").write_bytes(b"v" * 100 + b"\0")  # same size, new bytes, new mtime
    assert checkpoint_fingerprint(d) != base


def test_cached_by_path_size_and_mtime(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _make(tmp_path / "m")
    first = checkpoint_fingerprint(d)
    sidecar = json.loads((cache / fp.SIDECAR_NAME).read_text())
    assert sidecar["entries"][str(d.resolve())]["id"] == first
    calls: list[int] = []
    real = fp._hash_files
    monkeypatch.setattr(fp, "_hash_files", lambda files: calls.append(1) or real(files))
    assert checkpoint_fingerprint(d) == first and calls == []  # served from the sidecar
    weights = d / "model-0.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert checkpoint_fingerprint(d) == first and calls == [1]  # re-hashed, same bytes


def test_corrupt_sidecar_is_ignored(tmp_path: Path, cache: Path) -> None:
    d = _make(tmp_path / "m")
    want = checkpoint_fingerprint(d)
    (cache / fp.SIDECAR_NAME).write_text("{not json")
    assert checkpoint_fingerprint(d) == want
    (cache / fp.SIDECAR_NAME).write_text(json.dumps({"v": 1, "entries": {str(d.resolve()): {
        "id": "forged", "files": [["config.json", 0, 0]]}}}))
    assert checkpoint_fingerprint(d) == want  # a stale signature never matches


def test_bad_directories(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_fingerprint(tmp_path / "missing")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        checkpoint_fingerprint(tmp_path / "noconfig")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        checkpoint_fingerprint(tmp_path / "noweights")
