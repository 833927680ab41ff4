"""``meshinfer manifest DIR``: print a checkpoint's model id and write its manifest.

Contract: computes the manifest of DIR (``models.fingerprint.checkpoint_manifest``: a valid stored
``meshinfer-manifest.json`` is reused, else the files are hashed; ``--rebuild`` always hashes the files),
writes its canonical bytes to ``DIR/meshinfer-manifest.json`` (or ``--out``), prints the model id on stdout
(one line; ``--json``: one JSON object with id, path, blocks, sizes) and a short summary on stderr. Errors
(missing directory or files, corrupt safetensors, unwritable output) are one-line ``CheckpointError``s,
exit 2. Imports no torch and no network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshinfer.cli.args import add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "manifest", run, help="print a checkpoint's model id (its manifest hash) and write its manifest",
        description="Hash a checkpoint directory piece by piece (tensors per block, client part, config and "
                    "tokenizer files) into a manifest; the model id is the manifest's hash. Writes the manifest "
                    "as DIR/meshinfer-manifest.json (or --out) and prints the id.",
    )
    parser.add_argument("directory", metavar="MODEL", help="checkpoint directory (config.json + safetensors), a .gguf "
                        "file or a catalogue name (its GGUF view is hashed)")
    parser.add_argument("--out", default=None, help="write the manifest here instead of DIR/meshinfer-manifest.json")
    parser.add_argument("--rebuild", action="store_true",
                        help="hash the files even if DIR holds a valid manifest (after editing weights in place)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the bare id")


def run(args: argparse.Namespace) -> int:
    from meshinfer.errors import ConfigError
    from meshinfer.models.fingerprint import (
        MANIFEST_NAME,
        build_manifest,
        checkpoint_manifest,
        manifest_id,
        write_manifest_file,
    )
    from meshinfer.weights.manifest import Manifest
    from meshinfer.weights.resolve import local_checkpoint
    from meshinfer.weights.store import human_bytes

    directory = local_checkpoint(args.directory)
    if directory is None:
        raise ConfigError(f"{args.directory!r} is not on this machine: give a checkpoint directory, a .gguf file or a "
                          "catalogue name")
    if args.rebuild:
        doc = build_manifest(directory)
        model_id = manifest_id(doc)
    else:
        model_id, doc = checkpoint_manifest(directory)
    out = Path(args.out).expanduser() if args.out else directory / MANIFEST_NAME
    write_manifest_file(out, doc)
    manifest = Manifest(doc, model_id)
    size = sum(g.size for g in manifest.groups.values())
    pieces = sum(g.num_pieces for g in manifest.groups.values())
    if args.json:
        print(json.dumps({"model_id": model_id, "manifest": str(out), "num_blocks": manifest.num_blocks,
                          "bytes": size, "pieces": pieces, "piece_size": manifest.piece_size,
                          "files": sorted(doc["files"])}))
    else:
        print(model_id)
    print(f"{directory}: {manifest.num_blocks} blocks, {human_bytes(size)} in {pieces} pieces; manifest written "
          f"to {out}", file=sys.stderr)
    return 0
