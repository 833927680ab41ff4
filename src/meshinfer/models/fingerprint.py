"""A checkpoint's content fingerprint: the model id servers announce and clients look up.

Contract: ``checkpoint_fingerprint(dir)`` is a 32-hex-character digest (the first 128 bits of a
sha256) over ``config.json`` and every ``*.safetensors`` file of the directory, in sorted name order,
each as ``name \\0 size \\0 bytes`` (files streamed in 8 MiB chunks, never loaded whole). Two
directories holding the same bytes under the same file names get the same id, wherever they live.
Hashing a large checkpoint takes a while, so results are cached in a small JSON sidecar,
``<cache>/fingerprints.json`` (``<cache>`` = ``$MESHINFER_CACHE_DIR`` read at call time, else
``~/.cache/meshinfer``), keyed by the directory's absolute path and validated by each hashed file's
(name, size, mtime_ns): a file changed, added or removed means a fresh hash. The sidecar is a cache
only: unreadable or corrupt means "recompute", a failed write is ignored, writes are atomic
(temporary file + rename). Missing directory or config.json, or no safetensors file, is a one-line
``CheckpointError``. Pure file I/O: no torch, no network, nothing about how models are run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from meshinfer.errors import CheckpointError

FINGERPRINT_HEX_CHARS = 32
CHUNK_BYTES = 8 * 1024 * 1024
SIDECAR_NAME = "fingerprints.json"
MAX_SIDECAR_ENTRIES = 256
_SIDECAR_VERSION = 1


def cache_dir() -> Path:
    """Where meshinfer caches small local state: ``$MESHINFER_CACHE_DIR`` or ``~/.cache/meshinfer``."""
    env = os.environ.get("MESHINFER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "meshinfer"


def fingerprint_files(directory: Path) -> list[Path]:
    """The files a fingerprint covers: config.json, then every *.safetensors file by sorted name."""
    if not directory.is_dir():
        raise CheckpointError(f"model directory {str(directory)!r} does not exist")
    config = directory / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{directory} has no config.json (not a Hugging Face checkpoint directory?)")
    weights = sorted((p for p in directory.glob("*.safetensors") if p.is_file()), key=lambda p: p.name)
    if not weights:
        raise CheckpointError(f"{directory} has no *.safetensors file to fingerprint")
    return [config, *weights]


def _signature(files: list[Path]) -> list[list[Any]]:
    """[[name, size, mtime_ns], ...]: what must be unchanged for a cached fingerprint to hold."""
    out: list[list[Any]] = []
    for path in files:
        try:
            st = path.stat()
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
        out.append([path.name, st.st_size, st.st_mtime_ns])
    return out


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        try:
            size = path.stat().st_size
            digest.update(path.name.encode() + b"\0" + str(size).encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()[:FINGERPRINT_HEX_CHARS]


def _load_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("v") != _SIDECAR_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _store_sidecar(path: Path, entries: dict[str, Any]) -> None:
    if len(entries) > MAX_SIDECAR_ENTRIES:  # keep the most recently written ones (dicts keep order)
        entries = dict(list(entries.items())[-MAX_SIDECAR_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fingerprints-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"v": _SIDECAR_VERSION, "entries": entries}, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a cache only: the next call recomputes


def checkpoint_fingerprint(directory: str | os.PathLike[str]) -> str:
    """The content id (32 hex chars) of the checkpoint in ``directory``; cached by path, size, mtime."""
    root = Path(directory).expanduser().resolve()
    files = fingerprint_files(root)
    signature = _signature(files)
    sidecar = cache_dir() / SIDECAR_NAME
    entries = _load_sidecar(sidecar)
    cached = entries.get(str(root))
    if isinstance(cached, dict) and cached.get("files") == signature and isinstance(cached.get("id"), str):
        return str(cached["id"])
    fingerprint = _hash_files(files)
    if _signature(files) != signature:  # written to while we hashed: do not cache a torn read
        return fingerprint
    entries = _load_sidecar(sidecar)  # re-read: another process may have added entries meanwhile
    entries.pop(str(root), None)
    entries[str(root)] = {"id": fingerprint, "files": signature}
    _store_sidecar(sidecar, entries)
    return fingerprint
