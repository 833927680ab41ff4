"""A checkpoint's manifest and content id: the model id servers announce, clients look up and peers fetch by.

Contract: a MANIFEST describes a checkpoint by content, not by file layout: ``piece_size`` (``PIECE_BYTES``,
1 MiB), ``num_blocks`` (config.json's ``num_hidden_layers``), per block the tensors named
``model.layers.<i>.*`` and in ``client`` every other tensor (embeddings, final norm, LM head), each as
``{dtype, shape, size, pieces}`` where ``pieces`` are the sha256 (hex) of the tensor's raw bytes cut into
``piece_size`` pieces, and in ``files`` the small files of ``MANIFEST_FILES`` that exist (config.json,
generation config, tokenizer and chat template files, a GGUF's gguf-metadata.json), each ``{size, pieces}``
the same way (a GGUF view's ``tokenizer/`` subdirectory is derived, so not covered). Its canonical
encoding is JSON with sorted keys, no spaces, ASCII only (``canonical_manifest_bytes``); the MODEL ID is
the first 32 hex characters of the sha256 of that encoding (``manifest_id``), which is also the sha256 of
a stored ``meshinfer-manifest.json`` (``MANIFEST_NAME``: exactly the canonical bytes).

``checkpoint_fingerprint(dir)`` is that model id. The same tensors in other files (sharded or single
file) give the same id; a changed tensor byte, config or tokenizer file gives another. A directory may
carry its manifest in ``meshinfer-manifest.json`` (fetched partial copies do): a stored manifest is used
when it is well formed, its config.json hash matches the directory's, and every tensor the directory's
safetensors headers list is in it with the same dtype, shape and size (tensor bytes are not re-hashed:
a fetch verified them piece by piece; ``meshinfer manifest --rebuild DIR`` rewrites a stale one). Otherwise the
manifest is built from the files (tensor byte ranges from the safetensors headers, read with ``pread``,
never loaded whole). Results are cached in a JSON sidecar ``<cache>/fingerprints.json`` (``<cache>`` =
``meshinfer.config.cache_root()``, decided at each call; this module reads no environment) keyed by the
directory's absolute path and validated by each covered file's (name, size, mtime_ns), and built manifests in
``<cache>/manifests/<id>.json``, so a big checkpoint is hashed once. The caches are caches only:
unreadable or corrupt means "recompute", failed writes are ignored, writes are atomic (temp + rename).
Safetensors headers are read by ``models.safetensors_files``. Problems are one-line ``CheckpointError``s.
Pure file I/O: no torch, no network, no msgspec; nothing about how models are run or fetched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshinfer.config import cache_root
from meshinfer.errors import CheckpointError
from meshinfer.models.safetensors_files import (
    DTYPE_BYTES,
    INDEX_FILE,
    tensor_locations,
    weight_files,
)

FINGERPRINT_HEX_CHARS = 32
PIECE_BYTES = 1024 * 1024
MANIFEST_FORMAT = "meshinfer-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "meshinfer-manifest.json"
MANIFEST_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "gguf-metadata.json",
)
"""The small files a manifest covers (hashed whole, in pieces); other files (README...) are not part of a model."""
MAX_SMALL_FILE_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
SIDECAR_NAME = "fingerprints.json"
MAX_SIDECAR_ENTRIES = 256
_SIDECAR_VERSION = 2
_BLOCK_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ---- manifests -----------------------------------------------------------------------------------


def block_of(tensor_name: str) -> int | None:
    """The block a tensor belongs to (``model.layers.<i>.``), or None for the client part."""
    m = _BLOCK_NAME.match(tensor_name)
    return int(m.group(1)) if m else None


def num_pieces(size: int, piece_size: int = PIECE_BYTES) -> int:
    return (size + piece_size - 1) // piece_size


def _hash_range(path: Path, start: int, size: int, piece_size: int) -> list[str]:
    out = []
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, size, piece_size):
                n = min(piece_size, size - offset)
                data = os.pread(fd, n, start + offset)
                if len(data) != n:
                    raise CheckpointError(f"{path} is shorter than its header says (truncated?)")
                out.append(hashlib.sha256(data).hexdigest())
        finally:
            os.close(fd)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    return out


def _file_entry(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_SMALL_FILE_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_SMALL_FILE_BYTES} bytes")
    return {"size": size, "pieces": _hash_range(path, 0, size, PIECE_BYTES)}


def _config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(root)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{root} has no config.json (not a Hugging Face checkpoint directory?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def build_manifest(directory: str | os.PathLike[str], *, workers: int = 4) -> dict[str, Any]:
    """The manifest of the checkpoint in ``directory``, hashed from its files (no caches)."""
    root = Path(directory)
    config = _config(root)
    locations = tensor_locations(root)
    blocks_seen = [b for b in map(block_of, locations) if b is not None]
    layers = config.get("num_hidden_layers")
    n = layers if isinstance(layers, int) and layers >= 0 else (max(blocks_seen) + 1 if blocks_seen else 0)
    if blocks_seen and max(blocks_seen) >= n:
        raise CheckpointError(f"{root} holds block {max(blocks_seen)} but config.json says {n} blocks")
    names = sorted(locations)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib and pread release the GIL
        hashes = list(pool.map(lambda k: _hash_range(locations[k].path, locations[k].start, locations[k].size,
                                                     PIECE_BYTES), names))
    blocks: list[dict[str, Any]] = [{} for _ in range(n)]
    client: dict[str, Any] = {}
    for name, pieces in zip(names, hashes, strict=True):
        loc = locations[name]
        entry = {"dtype": loc.dtype, "shape": list(loc.shape), "size": loc.size, "pieces": pieces}
        block = block_of(name)
        (client if block is None else blocks[block])[name] = entry
    files = {name: _file_entry(root / name) for name in MANIFEST_FILES if (root / name).is_file()}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "piece_size": PIECE_BYTES, "num_blocks": n,
            "files": files, "blocks": blocks, "client": client}


def canonical_manifest_bytes(doc: dict[str, Any]) -> bytes:
    """The canonical encoding the model id hashes (and ``meshinfer-manifest.json`` holds)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_id(doc: dict[str, Any]) -> str:
    """The model id a manifest names: the first 32 hex characters of the sha256 of its canonical bytes."""
    return hashlib.sha256(canonical_manifest_bytes(doc)).hexdigest()[:FINGERPRINT_HEX_CHARS]


def _check_item(where: str, item: Any, piece_size: int, tensor: bool) -> None:
    if not isinstance(item, dict) or set(item) != ({"dtype", "shape", "size", "pieces"} if tensor
                                                   else {"size", "pieces"}):
        raise CheckpointError(f"manifest: {where} is malformed")
    size, pieces = item["size"], item["pieces"]
    if not isinstance(size, int) or size < 0 or not isinstance(pieces, list) or len(pieces) != num_pieces(
            size, piece_size) or not all(isinstance(p, str) and _HEX64.match(p) for p in pieces):
        raise CheckpointError(f"manifest: {where} has an invalid size or piece list")
    if tensor:
        dtype, shape = item["dtype"], item["shape"]
        if (dtype not in DTYPE_BYTES or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)
                or math.prod(shape) * DTYPE_BYTES[dtype] != size):
            raise CheckpointError(f"manifest: {where} has an invalid dtype or shape")


def validate_manifest(doc: Any) -> None:
    """Raise CheckpointError unless ``doc`` is a well-formed manifest (structure and internal consistency)."""
    keys = {"format", "version", "piece_size", "num_blocks", "files", "blocks", "client"}
    if not isinstance(doc, dict) or set(doc) != keys or doc["format"] != MANIFEST_FORMAT:
        raise CheckpointError("not a meshinfer manifest")
    if doc["version"] != MANIFEST_VERSION:
        raise CheckpointError(f"manifest version {doc['version']!r}; this peer reads version {MANIFEST_VERSION}")
    piece_size, n, blocks = doc["piece_size"], doc["num_blocks"], doc["blocks"]
    if not isinstance(piece_size, int) or not 4096 <= piece_size <= 64 * 1024 * 1024:
        raise CheckpointError("manifest: invalid piece_size")
    if not isinstance(n, int) or not isinstance(blocks, list) or len(blocks) != n:
        raise CheckpointError("manifest: num_blocks does not match the block list")
    if not isinstance(doc["files"], dict) or "config.json" not in doc["files"] or not isinstance(doc["client"], dict):
        raise CheckpointError("manifest: files (with config.json) or client part missing")
    for name, item in doc["files"].items():
        if name not in MANIFEST_FILES:
            raise CheckpointError(f"manifest: unexpected file {str(name)[:100]!r}")
        _check_item(f"file {name}", item, piece_size, tensor=False)
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise CheckpointError(f"manifest: block {i} is malformed")
        for name, item in block.items():
            if block_of(name) != i:
                raise CheckpointError(f"manifest: tensor {name[:100]!r} listed under block {i}")
            _check_item(f"tensor {name}", item, piece_size, tensor=True)
    for name, item in doc["client"].items():
        if not isinstance(name, str) or block_of(name) is not None:
            raise CheckpointError(f"manifest: tensor {str(name)[:100]!r} listed in the client part")
        _check_item(f"tensor {name}", item, piece_size, tensor=True)


def manifest_tensors(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every tensor entry of a manifest by name (blocks and client part)."""
    out = dict(doc["client"])
    for block in doc["blocks"]:
        out.update(block)
    return out


def _stored_manifest(root: Path) -> dict[str, Any] | None:
    """The directory's stored manifest if it is valid for the files present, else None."""
    path = root / MANIFEST_NAME
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        doc = json.loads(path.read_bytes())
        validate_manifest(doc)
        if _file_entry(root / "config.json") != doc["files"]["config.json"]:
            return None
        tensors = manifest_tensors(doc)
        for name, loc in tensor_locations(root).items():
            entry = tensors.get(name)
            if entry is None or (entry["dtype"], tuple(entry["shape"]), entry["size"]) != (
                    loc.dtype, loc.shape, loc.size):
                return None
    except (OSError, ValueError, CheckpointError):
        return None
    return doc


def write_manifest_file(path: Path, doc: dict[str, Any]) -> None:
    """Write a manifest's canonical bytes to ``path`` atomically."""
    _atomic_write(path, canonical_manifest_bytes(doc), strict=True)


def _atomic_write(path: Path, data: bytes, *, strict: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        if strict:
            raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


# ---- the cached entry points ---------------------------------------------------------------------


def fingerprint_files(directory: Path) -> list[Path]:
    """The files whose (name, size, mtime) validate a cached id: config, small files, weights, manifest."""
    _config(directory)
    files = [directory / n for n in MANIFEST_FILES if (directory / n).is_file()]
    files += weight_files(directory)
    files += [p for p in (directory / INDEX_FILE, directory / MANIFEST_NAME) if p.is_file()]
    return files


def _signature(files: list[Path]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for path in files:
        try:
            st = path.stat()
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
        out.append([path.name, st.st_size, st.st_mtime_ns])
    return out


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
    _atomic_write(path, json.dumps({"v": _SIDECAR_VERSION, "entries": entries}).encode(), strict=False)


def _cached_manifest(model_id: str) -> dict[str, Any] | None:
    try:
        data = (cache_root() / "manifests" / f"{model_id}.json").read_bytes()
        doc = json.loads(data)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and manifest_id(doc) == model_id else None


def _compute(root: Path, files: list[Path]) -> tuple[str, dict[str, Any]]:
    signature = _signature(files)
    doc = _stored_manifest(root) if (root / MANIFEST_NAME).is_file() else None
    stored = doc is not None
    if doc is None:
        doc = build_manifest(root)
    model_id = manifest_id(doc)
    if _signature(files) != signature:  # written to while we read: do not cache a torn read
        return model_id, doc
    if not stored:
        _atomic_write(cache_root() / "manifests" / f"{model_id}.json", canonical_manifest_bytes(doc), strict=False)
    sidecar = cache_root() / SIDECAR_NAME
    entries = _load_sidecar(sidecar)  # re-read: another process may have added entries meanwhile
    entries.pop(str(root), None)
    entries[str(root)] = {"id": model_id, "files": signature}
    _store_sidecar(sidecar, entries)
    return model_id, doc


def _cached_id(root: Path, files: list[Path]) -> str | None:
    cached = _load_sidecar(cache_root() / SIDECAR_NAME).get(str(root))
    if isinstance(cached, dict) and cached.get("files") == _signature(files) and isinstance(cached.get("id"), str):
        return str(cached["id"])
    return None


def checkpoint_fingerprint(directory: str | os.PathLike[str]) -> str:
    """The model id (32 hex chars) of the checkpoint in ``directory``: its manifest's hash (cached)."""
    root = Path(directory).expanduser().resolve()
    files = fingerprint_files(root)
    return _cached_id(root, files) or _compute(root, files)[0]


def checkpoint_manifest(directory: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(model id, manifest) of the checkpoint in ``directory`` (stored, cached or built)."""
    root = Path(directory).expanduser().resolve()
    files = fingerprint_files(root)
    model_id = _cached_id(root, files)
    if model_id is not None:
        doc = _stored_manifest(root) if (root / MANIFEST_NAME).is_file() else _cached_manifest(model_id)
        if doc is not None and manifest_id(doc) == model_id:
            return model_id, doc
    return _compute(root, files)
