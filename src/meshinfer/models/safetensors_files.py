"""Safetensors files of a checkpoint directory, read from their headers alone: which tensors, where their bytes lie.

Contract: ``read_safetensors_header(path)`` gives every tensor of one file as a ``TensorLocation`` (dtype,
shape and absolute byte range, each checked against the file size and the dtype's width, the header bounded
by ``MAX_HEADER_BYTES``); ``weight_files(root)`` is the files a checkpoint uses (``model.safetensors``, else
the shards of ``model.safetensors.index.json``, checked to stay inside ``root``, else every
``*.safetensors``); ``tensor_locations(root)`` merges them (a tensor stored twice is an error). A GGUF view
directory (``models.gguf_view``) is a checkpoint too: its one weight file is ``model.gguf`` and its locations are
``view_locations`` (tensors by HF name, in their GGUF encoding), so manifests, fingerprints and seeding treat it
like any other. Problems are one-line ``CheckpointError``s. Pure file I/O (headers only, never tensor bytes):
no torch, no network.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from meshinfer.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GGUF_VIEW_FILE = "model.gguf"
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's raw bytes lie: ``path`` bytes [start, end)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """The tensors of one safetensors file from its header alone, with absolute byte ranges (checked)."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(f"{path}: safetensors header of {n} bytes is invalid or too large")
            header = json.loads(f.read(n))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON (truncated or corrupt file?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e and base + e <= file_size
                  and e - b == math.prod(shape) * DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            raise _bad_entry(path, name) from None
        if not ok:
            raise _bad_entry(path, name)
        out[name] = TensorLocation(path, dtype, shape, base + b, base + e)
    return out


def _bad_entry(path: Path, name: object) -> CheckpointError:
    return CheckpointError(f"{path}: invalid safetensors entry for tensor {str(name)[:100]!r}")


def _gguf_view(root: Path) -> bool:
    if not os.path.lexists(root / GGUF_VIEW_FILE):
        return False
    from meshinfer.models.gguf_view import is_gguf_view  # imported here: gguf_view imports this module

    return is_gguf_view(root)


def weight_files(root: Path) -> list[Path]:
    """The files a checkpoint's tensors lie in: model.safetensors, else the index's shards, else every
    *.safetensors; a GGUF view's model.gguf."""
    if _gguf_view(root):
        return [root / GGUF_VIEW_FILE]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"cannot read {index}: no valid 'weight_map'") from None
        for shard in shards:
            parts = PurePosixPath(str(shard)).parts
            if not isinstance(shard, str) or PurePosixPath(shard).is_absolute() or ".." in parts or not parts:
                raise CheckpointError(f"{index} names an invalid shard path {str(shard)[:100]!r}")
            if not (root / shard).is_file():
                raise CheckpointError(f"{INDEX_FILE} refers to shard {shard!r}, which is missing from {root}")
        return [root / s for s in shards]
    found = sorted((p for p in root.glob("*.safetensors") if p.is_file()), key=lambda p: p.name)
    if not found:
        raise CheckpointError(f"{root} has no *.safetensors file")
    return found


def tensor_locations(root: Path) -> dict[str, TensorLocation]:
    """Every tensor of the checkpoint in ``root`` -> where its bytes lie (headers only)."""
    if _gguf_view(root):
        from meshinfer.models.gguf_view import view_locations

        return view_locations(root)
    out: dict[str, TensorLocation] = {}
    for path in weight_files(root):
        for name, loc in read_safetensors_header(path).items():
            if name in out:
                raise CheckpointError(f"tensor {name} is stored twice ({out[name].path.name} and {path.name})")
            out[name] = loc
    return out
