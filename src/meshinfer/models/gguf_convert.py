"""``convert_gguf``: a GGUF file written out as a plain Hugging Face checkpoint directory.

Contract: ``convert_gguf(path, outdir, dtype)`` writes ``outdir`` as ``save_pretrained`` would lay it out, so that
``transformers.AutoModelForCausalLM.from_pretrained(outdir)`` loads it and generates: config.json (the GGUF's
Hugging Face config without meshinfer's section, plus ``torch_dtype``), generation_config.json, tokenizer files
(``models.gguf_tokenizer``) and one ``model.safetensors`` of the dequantized tensors with q/k rows un-permuted,
in float32, float16 or bfloat16 (dequantized in float32 first, then rounded once). Tensors are streamed one at a
time into the file (memory peaks at one tensor, not the model), with a ``rich`` progress bar on a terminal
for big models. It refuses a non-empty ``outdir`` unless ``overwrite`` (a one-line ``ConfigError``); it writes
into a temporary directory beside ``outdir`` and renames it into place, so a failure or interruption leaves
nothing half-written. Errors are one-line ``MeshinferError``s. No network.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models.gguf import GgufFile, read_gguf_tensors
from meshinfer.models.gguf_tokenizer import write_tokenizer_files
from meshinfer.models.gguf_view import replace_dir
from meshinfer.models.kv_cache import torch_dtype
from meshinfer.models.spec import ModelSpec
from meshinfer.types import canonical_dtype

PROGRESS_MIN_BYTES = 64 * 1024 * 1024
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _ordered_names(gguf: GgufFile) -> list[str]:
    spec = ModelSpec.from_config(gguf.hf_config())
    names = list(spec.head_tensors())[:1]  # embeddings first, as save_pretrained lists them
    for i in range(spec.num_blocks):
        names += list(spec.block_tensors(i))
    names += list(spec.head_tensors())[1:]
    return names


def _header(gguf: GgufFile, names: list[str], dtype: torch.dtype) -> bytes:
    doc: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape = list(gguf.tensors[name].shape)
        size = dtype.itemsize
        for d in shape:
            size *= d
        doc[name] = {"dtype": _ST_DTYPE[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_weights(gguf: GgufFile, path: Path, dtype: torch.dtype, progress: bool | None) -> None:
    names = _ordered_names(gguf)
    total = sum(t.end - t.start for t in gguf.tensors.values())
    show = progress if progress is not None else (total >= PROGRESS_MIN_BYTES and sys.stderr.isatty())
    with path.open("wb") as f:
        f.write(_header(gguf, names, dtype))
        if not show:
            for name in names:
                _write_tensor(f, gguf, name, dtype)
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("convert", total=total)
            for name in names:
                _write_tensor(f, gguf, name, dtype)
                bar.advance(task, gguf.tensors[name].end - gguf.tensors[name].start)


def _write_tensor(f: Any, gguf: GgufFile, name: str, dtype: torch.dtype) -> None:
    values = read_gguf_tensors(gguf, [name])[name].dequantize(torch.float32).to(dtype).contiguous()
    f.write(values.view(torch.uint8).numpy().data)


def convert_gguf(path: str | os.PathLike[str], outdir: str | os.PathLike[str], dtype: str = "float32",
                 overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write the GGUF file ``path`` as a Hugging Face checkpoint directory ``outdir`` in ``dtype`` (fp32, fp16,
    bf16); ``progress``: show a progress bar (None: on a terminal, for models of 64 MiB or more)."""
    dt = torch_dtype(canonical_dtype(dtype))
    gguf = GgufFile(path)
    out = Path(outdir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise CheckpointError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        config = dict(gguf.hf_config(), torch_dtype=str(dt).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(gguf.generation_config(), indent=2, sort_keys=True)
                                                    + "\n", encoding="utf-8")
        write_tokenizer_files(gguf.metadata, tmp)
        _write_weights(gguf, tmp / "model.safetensors", dt, progress)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    except OSError as err:
        raise CheckpointError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
