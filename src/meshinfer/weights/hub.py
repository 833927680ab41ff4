"""The Hugging Face hub path: ``--model org/name`` fetches only the safetensors shards a span needs.

NOT EXERCISED HERE: this machine has no network, so only the argument handling and the pure shard
selection are tested; ``hub_download`` itself is a thin, clearly bounded use of ``huggingface_hub``.

Contract: ``is_hub_ref``/``parse_hub_ref`` recognise ``org/name`` or ``org/name@revision``;
``needed_tensors(config, blocks, client_part)`` names the tensors a span (and the client part) needs from
the model's ``config.json`` (``models.spec``); ``shards_for(weight_map, names)`` picks the shards of a
sharded checkpoint's index holding them. ``hub_download`` downloads config, generation config and tokenizer
files and those shards (``hf_hub_download`` per file; a single-file checkpoint is downloaded whole) and
returns a directory ``models.checkpoint.Checkpoint`` opens: links to the downloaded files plus an index
listing only the shards present. Without ``huggingface_hub`` installed: a one-line ``ConfigError``. The id
of such a partial directory (``checkpoint_fingerprint``) is built from the files it holds, so it differs
from the full model's id; the swarm path (model ids) has no such limit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from meshinfer.config import cache_root
from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models.fingerprint import MANIFEST_FILES
from meshinfer.models.safetensors_files import INDEX_FILE, SINGLE_FILE
from meshinfer.models.spec import ModelSpec
from meshinfer.types import BlockRange

_HUB_REF = re.compile(r"^([A-Za-z0-9][\w.\-]{0,95})/([\w.\-]{1,96})(?:@([\w.\-/]{1,128}))?$")


def is_hub_ref(text: str) -> bool:
    """Whether ``text`` reads as ``org/name[@revision]`` (and is not a local path that exists)."""
    return bool(_HUB_REF.match(text)) and not Path(text).expanduser().exists() and ".." not in text


def parse_hub_ref(text: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of ``org/name[@revision]``; ConfigError otherwise."""
    m = _HUB_REF.match(text)
    if not m or ".." in text:
        raise ConfigError(f"{text[:100]!r} is not a hub model name (expected org/name or org/name@revision)")
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def needed_tensors(config: dict[str, Any], blocks: BlockRange | None, client_part: bool) -> set[str]:
    """The tensor names of ``blocks`` (and of the client part if asked) for a model with this config."""
    spec = ModelSpec.from_config(config)
    names: set[str] = set(spec.head_tensors()) if client_part else set()
    if blocks is not None:
        blocks.check_within(spec.num_blocks)
        for i in blocks.blocks():
            names.update(spec.block_tensors(i))
    return names


def shards_for(weight_map: dict[str, str], names: set[str]) -> list[str]:
    """The shard files (sorted) of a safetensors index that hold ``names``; CheckpointError if one is unmapped."""
    missing = sorted(n for n in names if n not in weight_map)
    if missing:
        raise CheckpointError(f"the checkpoint's index lacks {len(missing)} needed tensor(s), e.g. {missing[0]}")
    return sorted({weight_map[n] for n in names})


def _link_dir(snapshot: Path, repo: str, revision: str | None, cache: Path | None) -> Path:
    """A directory of links to the downloaded files plus an index of the shards present."""
    base = (cache / "hub-links") if cache is not None else cache_root() / "hub-links"
    out = base / (repo.replace("/", "--") + (f"@{revision.replace('/', '--')}" if revision else ""))
    out.mkdir(parents=True, exist_ok=True)
    for path in snapshot.iterdir():
        link = out / path.name
        if path.name != INDEX_FILE and not link.exists():
            os.symlink(path.resolve(), link)
    index = json.loads((snapshot / INDEX_FILE).read_text(encoding="utf-8"))
    present = {k: v for k, v in index.get("weight_map", {}).items() if (snapshot / v).is_file()}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": index.get("metadata", {}), "weight_map": present}))
    return out


def hub_download(model_ref: str, *, blocks: BlockRange | None, client_part: bool,
                 cache_dir: Path | None = None) -> Path:  # pragma: no cover - needs the network
    """Download what ``blocks``/``client_part`` need of hub model ``model_ref``; returns a checkpoint dir."""
    repo, revision = parse_hub_ref(model_ref)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise ConfigError(f"--model {model_ref} needs the huggingface_hub package (pip install huggingface_hub)"
                          ) from None
    hub_cache = str(cache_dir / "hub") if cache_dir is not None else None

    def get(name: str, required: bool = True) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=hub_cache))
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"hub model {repo} has no {name}") from None
            return None
        except Exception as err:
            raise CheckpointError(f"cannot download {name} of {repo} from the hub: {str(err)[:200]}") from None

    config_path = get("config.json")
    assert config_path is not None
    snapshot = config_path.parent
    for name in MANIFEST_FILES:
        if name != "config.json":
            get(name, required=False)
    index = get(INDEX_FILE, required=False)
    if index is None:
        get(SINGLE_FILE)
        return snapshot
    config = json.loads(config_path.read_text(encoding="utf-8"))
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    for shard in shards_for(weight_map, needed_tensors(config, blocks, client_part)):
        get(shard)
    return _link_dir(snapshot, repo, revision, cache_dir)
