"""GGUF files as checkpoints: the public entry points, and reading tensors in their GGUF encoding.

Contract: re-exports the pieces of the GGUF checkpoint format (``is_gguf_file`` and ``GgufFile`` from
``models.gguf_file``; ``gguf_view``, ``is_gguf_view``, ``is_gguf_sourced``, ``gguf_section``, ``view_locations``
and ``ensure_tokenizer_dir`` from ``models.gguf_view``) and adds ``read_ggml(root, names)``: exactly these
tensors of a GGUF-sourced checkpoint (a view, read from its ``model.gguf``, or a fetched copy, read from its
safetensors containers with ``safetensors.safe_open``) as ``GgmlTensor``s (``read_gguf_tensors``: the same
from an opened ``GgufFile``), with the q/k rows (weights and
biases) UN-permuted when config.json's ``meshinfer_gguf.qk_permuted`` says llama.cpp permuted them, so they are
in Hugging Face order. Only the requested byte ranges are read. Problems are one-line ``CheckpointError``s.
Writing a GGUF out as a Hugging Face directory is ``models.gguf_convert.convert_gguf``; the tokenizer is
``models.gguf_tokenizer``. No network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from meshinfer.errors import CheckpointError
from meshinfer.models import ggml
from meshinfer.models.ggml import GgmlTensor
from meshinfer.models.gguf_file import GgufFile, is_gguf_file
from meshinfer.models.gguf_view import (
    SECTION,
    VIEW_GGUF,
    container_of,
    ensure_tokenizer_dir,
    gguf_section,
    gguf_view,
    is_gguf_sourced,
    is_gguf_view,
    view_locations,
)

__all__ = [
    "GgufFile", "ensure_tokenizer_dir", "gguf_section", "gguf_view", "is_gguf_file", "is_gguf_sourced",
    "is_gguf_view", "read_ggml", "read_gguf_tensors", "unpermute", "view_locations",
]


def unpermute(name: str, tensor: GgmlTensor, num_heads: int, num_kv_heads: int) -> GgmlTensor:
    """Undo llama.cpp's q/k row permutation on tensor ``name`` (q_proj / k_proj weights and biases;
    any other tensor is returned as is)."""
    if ".self_attn.q_proj." in name:
        heads = num_heads
    elif ".self_attn.k_proj." in name:
        heads = num_kv_heads
    else:
        return tensor
    return tensor.take_rows(ggml.unpermute_rows(tensor.shape[0], heads))


def read_ggml(root: str | os.PathLike[str], names: Iterable[str]) -> dict[str, GgmlTensor]:
    """Exactly these tensors of a GGUF-sourced checkpoint (view or fetched copy) in their GGUF encoding,
    with q/k rows un-permuted when the config says they are permuted."""
    root = Path(root)
    section = gguf_section(root)
    if section is None:
        raise CheckpointError(f"{root} is not a GGUF-sourced checkpoint (no '{SECTION}' in config.json)")
    wanted = list(names)
    unknown = [n for n in wanted if n not in section["tensors"]]
    if unknown:
        raise CheckpointError(f"{root} has no tensor {unknown[0]}")
    if os.path.lexists(root / VIEW_GGUF):
        raw = _read_view(root, wanted)
    else:
        raw = _read_fetched(root, wanted, section["tensors"])
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    out: dict[str, GgmlTensor] = {}
    for name in wanted:
        ggml_type, shape = section["tensors"][name]
        tensor = GgmlTensor(ggml_type, tuple(shape), raw[name].reshape(ggml.byte_shape(ggml_type, shape)))
        out[name] = unpermute(name, tensor, heads, kv_heads) if section["qk_permuted"] else tensor
    return out


def read_gguf_tensors(gguf: GgufFile, names: Iterable[str]) -> dict[str, GgmlTensor]:
    """Tensors of an opened GGUF file by HF name, read from the file itself, q/k rows un-permuted."""
    config = gguf.hf_config()
    out: dict[str, GgmlTensor] = {}
    for name in names:
        info = gguf.tensors[name]
        data = _read_range(gguf.path, info.start, info.end, name).reshape(ggml.byte_shape(info.ggml_type, info.shape))
        tensor = GgmlTensor(info.ggml_type, info.shape, data)
        if gguf.qk_permuted:
            tensor = unpermute(name, tensor, config["num_attention_heads"], config["num_key_value_heads"])
        out[name] = tensor
    return out


def _read_range(path: Path, start: int, end: int, name: str) -> torch.Tensor:
    try:
        data = np.fromfile(path, dtype=np.uint8, count=end - start, offset=start)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {err}") from None
    if data.size != end - start:
        raise CheckpointError(f"{path} is shorter than its header says (tensor {name}; truncated?)")
    return torch.from_numpy(data)


def _read_view(root: Path, names: list[str]) -> dict[str, torch.Tensor]:
    locations = view_locations(root)
    return {n: _read_range(locations[n].path, locations[n].start, locations[n].end, n) for n in names}


def _read_fetched(root: Path, names: list[str], table: dict[str, list]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from meshinfer.models.safetensors_files import tensor_locations

    locations = tensor_locations(root)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        loc = locations.get(name)
        if loc is None:
            raise CheckpointError(f"{root} lacks tensor {name}")
        dtype, shape = container_of(name, *table[name])
        if (loc.dtype, loc.shape) != (dtype, shape):
            raise CheckpointError(f"tensor {name} in {loc.path} is {loc.dtype} {list(loc.shape)}, expected "
                                  f"{dtype} {list(shape)} for its ggml type {table[name][0]}")
        by_file.setdefault(loc.path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).contiguous().view(torch.uint8).reshape(-1)
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            brief = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"cannot read tensors from {path}: {brief}") from None
    return out
