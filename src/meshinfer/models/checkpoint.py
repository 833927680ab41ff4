"""Open a Hugging Face checkpoint directory and load only the tensors a span (or the head) needs.

Contract: reads ``config.json`` (through ``ModelSpec``), ``model.safetensors`` or a sharded
``model.safetensors.index.json`` with its shards, memory-mapped through safetensors' ``safe_open``;
``load_span`` reads only the tensors of the requested blocks, ``load_head`` only embeddings, final
norm and LM head. Names, shapes and dtypes are checked against the spec before any tensor is read.
Every problem (missing directory/file/shard/tensor, wrong shape, truncated or corrupt file) is a
one-line ``CheckpointError``. Loaded weights are moved into 2 MiB pages where the kernel allows
(``models.hugepages``: about 10% faster decode on the bench model). The tokenizer comes from
``transformers.AutoTokenizer`` on the same directory (local files only). Knows nothing of the network
or of how spans are chosen.

GGUF: a ``.gguf`` file path opens its view directory (``models.gguf_view.gguf_view``). A GGUF-sourced
directory (a view, or a fetched copy of one) is recognised by the ``meshinfer_gguf`` section of its config.json
(``is_gguf``): ``check`` compares the logical shapes of that section with the spec and the containers
(``model.gguf`` byte ranges or safetensors entries) with the ggml types; ``read`` returns float32 tensors
(dequantized, q/k rows un-permuted) so spans and heads load unchanged; ``read_ggml`` returns the raw
``GgmlTensor``s (for quantized kernels). Its tokenizer is ``<dir>/tokenizer`` (built from gguf-metadata.json
when missing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from meshinfer.errors import CheckpointError
from meshinfer.models.block import TransformerBlock
from meshinfer.models.ggml import GgmlTensor, cat_rows, q4_decompose
from meshinfer.models.gguf import (
    ensure_tokenizer_dir,
    gguf_section,
    gguf_view,
    read_ggml,
    view_locations,
)
from meshinfer.models.gguf_view import VIEW_GGUF, container_of, read_metadata
from meshinfer.models.head import ClientHead
from meshinfer.models.hugepages import rehome
from meshinfer.models.kv_cache import torch_dtype
from meshinfer.models.quant import Q4Source, QuantConfig, quantize_block, quantize_head
from meshinfer.models.span import BlockSpan
from meshinfer.models.spec import ModelSpec
from meshinfer.types import BlockRange

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_MAX_NAMES_SHOWN = 3


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


class Checkpoint:
    """A checkpoint directory whose safetensors headers have been read (no tensor data yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = _checkpoint_dir(path)
        self.spec = ModelSpec.from_dir(self.path)
        self.gguf = gguf_section(self.path)
        """The config's ``meshinfer_gguf`` section (None: a plain Hugging Face checkpoint)."""
        self._headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        self.weight_map = self._weight_map()  # tensor name -> file name

    @property
    def is_gguf(self) -> bool:
        """Whether the tensors are GGUF-encoded (a GGUF view or a fetched copy of one)."""
        return self.gguf is not None

    @property
    def has_gguf_q4(self) -> bool:
        """Whether some tensors are GGUF Q4_0/Q4_1 (which int4 takes as they are: ``gguf_q4_sources``)."""
        return self.gguf is not None and any(t[0] in Q4_TYPES for t in self.gguf["tensors"].values())

    # ---- discovery ----------------------------------------------------------------------------

    def _weight_map(self) -> dict[str, str]:
        if self.gguf is not None and os.path.lexists(self.path / VIEW_GGUF):
            locations = view_locations(self.path)  # checks that the source file is still the one viewed
            self._headers[VIEW_GGUF] = {n: (loc.dtype, loc.shape) for n, loc in locations.items()}
            return dict.fromkeys(locations, VIEW_GGUF)
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in self._header(SINGLE_FILE)}
        if index.is_file():
            return self._read_index(index)
        found = sorted(p.name for p in self.path.glob("*.bin"))
        hint = f" (found {found[0]}: only safetensors checkpoints are supported)" if found else ""
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.path)!r}{hint}")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read {index}: {_brief(err)}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index} has no valid 'weight_map' (tensor name -> shard file)")
        for shard in sorted(set(weight_map.values())):
            parts = PurePosixPath(shard).parts
            if PurePosixPath(shard).is_absolute() or ".." in parts or not parts:
                raise CheckpointError(f"{index} names an invalid shard path {shard!r}")
            if not (self.path / shard).is_file():
                raise CheckpointError(f"{INDEX_FILE} refers to shard {shard!r}, which is missing from {self.path}")
        return dict(weight_map)

    def _header(self, file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{name: (dtype, shape)} of one safetensors file, read from its header only."""
        if file not in self._headers:
            out: dict[str, tuple[str, tuple[int, ...]]] = {}
            try:
                with safe_open(str(self.path / file), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        out[name] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
            except Exception as err:  # safetensors raises its own SafetensorError, or OSError
                raise CheckpointError(
                    f"cannot read {self.path / file}: {_brief(err)} (truncated or corrupt safetensors file?)"
                ) from None
            self._headers[file] = out
        return self._headers[file]

    # ---- verification and reading -------------------------------------------------------------

    def missing(self, expected: Iterable[str]) -> list[str]:
        """Names in ``expected`` that no file of the checkpoint holds."""
        return [name for name in expected if name not in self.weight_map]

    def check(self, expected: dict[str, tuple[int, ...]], what: str) -> None:
        """Raise CheckpointError unless every expected tensor exists with its shape and a float dtype."""
        missing = self.missing(expected)
        if missing:
            raise CheckpointError(
                f"{self.path} lacks {len(missing)} tensor(s) of {what}: {_list_names(missing)}"
            )
        for name, shape in expected.items():
            file = self.weight_map[name]
            header = self._header(file)
            if name not in header:
                raise CheckpointError(f"{INDEX_FILE} places {name} in {file!r}, but that file lacks it")
            dtype, actual = header[name]
            if self.gguf is not None:
                self._check_gguf(name, shape, dtype, actual)
                continue
            if actual != shape:
                raise CheckpointError(
                    f"tensor {name} has shape {list(actual)}, expected {list(shape)} from config.json"
                )
            if dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name} has dtype {dtype}; expected a float type")

    def _check_gguf(self, name: str, shape: tuple[int, ...], dtype: str, actual: tuple[int, ...]) -> None:
        assert self.gguf is not None
        entry = self.gguf["tensors"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: config.json's GGUF section lacks tensor {name}")
        ggml_type, logical = entry[0], tuple(entry[1])
        if logical != shape:
            raise CheckpointError(f"tensor {name} has shape {list(logical)}, expected {list(shape)} from config.json")
        if (dtype, actual) != container_of(name, ggml_type, list(logical)):
            raise CheckpointError(f"tensor {name} is stored as {dtype} {list(actual)}, which does not hold a "
                                  f"{ggml_type} tensor of shape {list(logical)}")

    def check_all(self) -> None:
        """Check every tensor of every block and of the head (headers only)."""
        expected: dict[str, tuple[int, ...]] = dict(self.spec.head_tensors())
        for i in range(self.spec.num_blocks):
            expected.update(self.spec.block_tensors(i))
        self.check(expected, "the model")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly these tensors (memory-mapped; grouped by file); GGUF tensors dequantized to float32."""
        if self.gguf is not None:
            return {n: t.dequantize(torch.float32) for n, t in self.read_ggml(names).items()}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(self.path / file), framework="pt", device="cpu") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name)
            except Exception as err:
                raise CheckpointError(f"cannot read tensors from {self.path / file}: {_brief(err)}") from None
        return out

    def read_ggml(self, names: Iterable[str]) -> dict[str, GgmlTensor]:
        """Exactly these tensors in their GGUF encoding, q/k rows un-permuted (GGUF-sourced checkpoints only)."""
        if self.gguf is None:
            raise CheckpointError(f"{self.path} is not GGUF-sourced: its tensors have no ggml encoding")
        return read_ggml(self.path, names)

    # ---- the pieces ---------------------------------------------------------------------------

    def load_span(
        self, blocks: BlockRange, dtype: str | torch.dtype = "float32", device: torch.device | str = "cpu",
        quant: QuantConfig | None = None,
    ) -> BlockSpan:
        """Load blocks [start, end) only; with ``quant``, each block is quantized as soon as it is built (peak
        memory: the quantized span plus one float block). GGUF Q4_0/Q4_1 weights go to int4 as they are
        (``quant.group_size`` unset or 32), never re-quantized."""
        try:
            blocks.check_within(self.spec.num_blocks)
        except Exception as err:
            raise CheckpointError(str(err)) from None
        dt = torch_dtype(dtype)
        expected: dict[str, tuple[int, ...]] = {}
        for i in blocks.blocks():
            expected.update(self.spec.block_tensors(i))
        self.check(expected, f"blocks {blocks}")
        layers = []
        for i in blocks.blocks():  # one block at a time keeps peak memory at one block's tensors
            names = self.spec.block_tensors(i)
            sources: dict[tuple[int, str], Q4Source] = {}
            if self.gguf is not None:
                raw = self.read_ggml(names)
                tensors = {n: t.dequantize(torch.float32) for n, t in raw.items()}
                if quant is not None and quant.takes_gguf_q4:
                    sources = gguf_q4_sources(raw, i)
            else:
                tensors = self.read(names)
            layer = TransformerBlock.from_hf(self.spec, i, tensors, dt, device)
            del tensors
            if quant is not None and quant.mode != "none":
                quantize_block(layer, quant, sources)
            rehome(layer)  # weights in 2 MiB pages where the kernel allows (models.hugepages)
            layers.append(layer)
        return BlockSpan(self.spec, blocks, layers, dt, device)

    def load_head(self, dtype: str | torch.dtype = "float32", device: torch.device | str = "cpu",
                  quant: QuantConfig | None = None) -> ClientHead:
        """Load embeddings, final norm and LM head only (quantized with ``quant``: ``models.quant.quantize_head``)."""
        expected = self.spec.head_tensors()
        self.check(expected, "the head (embeddings, final norm, LM head)")
        head = ClientHead.from_hf(self.spec, self.read(expected), dtype, device)
        if quant is not None and quant.mode != "none":
            quantize_head(head, quant)
        rehome(head)
        return head


Q4_TYPES = ("Q4_0", "Q4_1")
_FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def gguf_q4_sources(raw: dict[str, GgmlTensor], block: int) -> dict[tuple[int, str], Q4Source]:
    """Block ``block``'s matrices whose parts are all GGUF Q4_0/Q4_1 (q/k already un-permuted), fused as the
    block fuses them, as (q, scale, low) decompositions: the int4 kernel takes them with no re-quantization."""
    out: dict[tuple[int, str], Q4Source] = {}
    for fused, parts in _FUSED.items():
        tensors = [raw[f"model.layers.{block}.{part}.weight"] for part in parts]
        if all(t.ggml_type in Q4_TYPES for t in tensors):
            out[(block, fused)] = q4_decompose(cat_rows(tensors) if len(tensors) > 1 else tensors[0])
    return out


def _checkpoint_dir(path: str | Path) -> Path:
    """``path``, or the view directory of ``path`` when it is a file (a GGUF: any other file is an error)."""
    p = Path(path)
    return gguf_view(p) if p.is_file() else p


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face checkpoint directory (reads config.json and safetensors headers) or a GGUF file."""
    return Checkpoint(path)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory (or GGUF file), through ``transformers.AutoTokenizer`` (local
    files only); a GGUF-sourced directory's comes from its ``tokenizer/`` subdirectory."""
    root = _checkpoint_dir(path)
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(root)!r} does not exist")
    if gguf_section(root) is not None:
        tokdir = ensure_tokenizer_dir(root)
        if tokdir is None:  # a read-only directory: build it in memory
            from meshinfer.models.gguf_tokenizer import build_tokenizer

            return build_tokenizer(read_metadata(root))
        root = tokdir
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load the tokenizer from {root}: {_brief(err)}") from None
