"""``meshinfer convert FILE.gguf OUTDIR``: write a GGUF model out as a plain Hugging Face checkpoint directory.

Contract: ``models.gguf_convert.convert_gguf``: OUTDIR gets config.json, generation_config.json, tokenizer files
and a model.safetensors of the dequantized weights (``--dtype`` fp32, fp16 or bf16) that transformers loads
as it is. A non-empty OUTDIR is refused unless ``--overwrite``; nothing is half-written. Prints OUTDIR on
stdout and a summary on stderr. Errors (not a GGUF, unsupported model, unwritable OUTDIR) are one line, exit 2.
Imports no torch at import time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshinfer.cli.args import add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "convert", run, help="write a GGUF model as a Hugging Face checkpoint directory (safetensors)",
        description="Dequantize a GGUF file (llama, Mistral, qwen2, qwen3) into a Hugging Face checkpoint "
                    "directory: config.json, tokenizer files and model.safetensors, loadable by transformers.",
    )
    parser.add_argument("file", metavar="FILE.gguf", help="the GGUF file to convert")
    parser.add_argument("outdir", metavar="OUTDIR", help="directory to write (must be empty or absent)")
    parser.add_argument("--dtype", default="fp32", help="dtype of the written weights: fp32, fp16 or bf16 "
                                                        "(default: fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    from meshinfer.models.gguf_convert import convert_gguf
    from meshinfer.types import canonical_dtype
    from meshinfer.weights.store import directory_bytes, human_bytes

    dtype = canonical_dtype(args.dtype)
    out = convert_gguf(Path(args.file).expanduser(), args.outdir, dtype=dtype, overwrite=args.overwrite)
    print(out)
    print(f"{args.file}: written to {out} as {dtype} ({human_bytes(directory_bytes(out))})", file=sys.stderr)
    return 0
