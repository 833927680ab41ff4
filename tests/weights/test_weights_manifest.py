"""Manifests and model ids: content addressed (layout-free), deterministic, cached, kept by partial copies."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from weights_helpers import local_copy, span_output

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models import fingerprint as fp
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.fingerprint import (
    MANIFEST_NAME,
    build_manifest,
    checkpoint_fingerprint,
    checkpoint_manifest,
    manifest_id,
    validate_manifest,
)
from meshinfer.models.safetensors_files import read_safetensors_header
from meshinfer.types import BlockRange
from meshinfer.weights.manifest import CLIENT_GROUP, Manifest, Want, block_group, check_model_id, is_model_id


def test_id_is_deterministic_and_is_the_manifest_hash(llama: Path, private_cache: Path) -> None:
    first = checkpoint_fingerprint(llama)
    assert is_model_id(first)
    doc = build_manifest(llama)
    assert manifest_id(doc) == first
    assert checkpoint_manifest(llama) == (first, doc)
    assert checkpoint_fingerprint(llama) == first
    manifest = Manifest(doc, first)
    assert manifest.num_blocks == 4 and manifest.piece_size == fp.PIECE_BYTES
    assert {g for g in manifest.groups if g.startswith("file:")} >= {"file:config.json", "file:tokenizer.json"}
    assert all(name.startswith("model.layers.2.") for name in doc["blocks"][2])
    assert set(doc["client"]) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_same_tensors_in_another_layout_have_the_same_id(llama: Path, llama_sharded: Path,
                                                         private_cache: Path) -> None:
    assert sorted(p.name for p in llama_sharded.glob("*.safetensors")) != ["model.safetensors"]
    assert checkpoint_fingerprint(llama_sharded) == checkpoint_fingerprint(llama)


def _flip_tensor_byte(directory: Path, tensor: str) -> None:
    loc = read_safetensors_header(directory / "model.safetensors")[tensor]
    with (directory / "model.safetensors").open("r+b") as f:
        f.seek(loc.start + loc.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _edit_json(directory: Path, name: str) -> None:
    doc = json.loads((directory / name).read_text())
    doc["edited_by_test"] = True
    (directory / name).write_text(json.dumps(doc))


@pytest.mark.parametrize(("change", "same"), [
    (lambda d: _flip_tensor_byte(d, "model.layers.3.mlp.down_proj.weight"), False),
    (lambda d: _flip_tensor_byte(d, "lm_head.weight"), False),
    (lambda d: _edit_json(d, "config.json"), False),
    (lambda d: _edit_json(d, "tokenizer.json"), False),
    (lambda d: _edit_json(d, "generation_config.json"), False),
    (lambda d: (d / "README.md").write_text("not part of the model"), True),
    (lambda d: (d / "model.safetensors").touch(), True),  # a new mtime, the same bytes
], ids=["block-tensor-byte", "head-tensor-byte", "config", "tokenizer", "generation-config", "readme", "touch"])
def test_changes_to_content_change_the_id(llama: Path, private_cache: Path, copy_of: Callable[[Path], Path],
                                          change: Callable[[Path], Any], same: bool) -> None:
    base = checkpoint_fingerprint(llama)
    edited = copy_of(llama)
    assert checkpoint_fingerprint(edited) == base
    change(edited)
    assert (checkpoint_fingerprint(edited) == base) is same


def test_partial_copy_with_its_manifest_keeps_the_id_and_loads_its_span(llama: Path, tmp_path: Path,
                                                                        private_cache: Path) -> None:
    model_id = checkpoint_fingerprint(llama)
    part = local_copy(llama, tmp_path / "models", Want(blocks=BlockRange(1, 3)))
    assert (part / MANIFEST_NAME).read_bytes() == fp.canonical_manifest_bytes(build_manifest(llama))
    assert not (part / "client.safetensors").exists() and not (part / "block-00000.safetensors").exists()
    assert checkpoint_fingerprint(part) == model_id
    assert torch.equal(span_output(part, BlockRange(1, 3)), span_output(llama, BlockRange(1, 3)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\."):
        Checkpoint(part).load_span(BlockRange(0, 2))
    # without its manifest a partial copy is a different (smaller) model
    (part / MANIFEST_NAME).unlink()
    assert checkpoint_fingerprint(part) != model_id


def test_a_stored_manifest_that_does_not_fit_the_files_is_ignored(llama: Path, tmp_path: Path,
                                                                  private_cache: Path) -> None:
    model_id = checkpoint_fingerprint(llama)
    part = local_copy(llama, tmp_path / "models", Want(blocks=BlockRange(0, 1)))
    _edit_json(part, "config.json")  # config no longer matches the manifest's hash
    assert checkpoint_fingerprint(part) != model_id
    part2 = local_copy(llama, tmp_path / "models2", Want(client_part=True))
    (part2 / MANIFEST_NAME).write_text("{not json")
    assert checkpoint_fingerprint(part2) != model_id


def test_built_once_then_served_from_the_caches(llama: Path, private_cache: Path, copy_of: Callable[[Path], Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = copy_of(llama)
    calls: list[int] = []
    real = fp.build_manifest
    monkeypatch.setattr(fp, "build_manifest", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = checkpoint_fingerprint(d)
    assert calls == [1]
    sidecar = json.loads((private_cache / fp.SIDECAR_NAME).read_text())
    assert sidecar["entries"][str(d.resolve())]["id"] == first
    assert (private_cache / "manifests" / f"{first}.json").is_file()
    assert checkpoint_fingerprint(d) == first and checkpoint_manifest(d)[0] == first and calls == [1]
    weights = d / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert checkpoint_fingerprint(d) == first and calls == [1, 1]  # re-hashed: same bytes, same id


def test_corrupt_caches_are_ignored(llama: Path, private_cache: Path) -> None:
    want = checkpoint_fingerprint(llama)
    (private_cache / fp.SIDECAR_NAME).write_text("{not json")
    assert checkpoint_fingerprint(llama) == want
    (private_cache / fp.SIDECAR_NAME).write_text(json.dumps({"v": 2, "entries": {str(llama.resolve()): {
        "id": "f" * 32, "files": [["config.json", 0, 0]]}}}))
    assert checkpoint_fingerprint(llama) == want  # a stale signature never matches
    (private_cache / "manifests" / f"{want}.json").write_text('{"format": "forged"}')
    assert checkpoint_manifest(llama)[0] == want  # a cached manifest not hashing to its id is rebuilt


def test_bad_directories(tmp_path: Path, private_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_fingerprint(tmp_path / "missing")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        checkpoint_fingerprint(tmp_path / "noconfig")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        checkpoint_fingerprint(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="safetensors header"):
        checkpoint_fingerprint(tmp_path / "noweights")


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    return [
        ("format", lambda d: d.update(format="other")),
        ("version", lambda d: d.update(version=2)),
        ("extra key", lambda d: d.update(extra=1)),
        ("piece size", lambda d: d.update(piece_size=0)),
        ("num_blocks", lambda d: d.update(num_blocks=5)),
        ("no config", lambda d: d["files"].pop("config.json")),
        ("unknown file", lambda d: d["files"].update({"../evil": d["files"]["config.json"]})),
        ("short piece list", lambda d: d["client"]["model.norm.weight"]["pieces"].clear()),
        ("bad hash", lambda d: d["client"]["model.norm.weight"]["pieces"].__setitem__(0, "zz")),
        ("size vs shape", lambda d: d["client"]["model.norm.weight"].update(size=3)),
        ("dtype", lambda d: d["client"]["model.norm.weight"].update(dtype="F128")),
        ("block tensor in client", lambda d: d["client"].update(d["blocks"][0])),
        ("tensor in wrong block", lambda d: d["blocks"][1].update(d["blocks"][0])),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_manifests_are_refused(llama: Path, what: str, mutate: Callable[[dict[str, Any]], Any]) -> None:
    _, doc = checkpoint_manifest(llama)
    validate_manifest(doc)
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(CheckpointError):
        validate_manifest(bad)
    with pytest.raises(CheckpointError):
        Manifest.from_bytes(fp.canonical_manifest_bytes(bad), manifest_id(bad))


def test_manifest_bytes_from_a_peer_must_hash_to_the_id(llama: Path) -> None:
    model_id, doc = checkpoint_manifest(llama)
    data = fp.canonical_manifest_bytes(doc)
    assert Manifest.from_bytes(data, model_id).model_id == model_id
    assert Manifest.from_bytes(json.dumps(doc, indent=2).encode(), model_id).model_id == model_id  # any spelling
    with pytest.raises(CheckpointError, match="hashes to"):
        Manifest.from_bytes(data, "0" * 32)
    for junk in (b"", b"[" * 100_000, b"\xff\xfe", b'{"a": 1}'):
        with pytest.raises(CheckpointError):
            Manifest.from_bytes(junk, model_id)


@pytest.mark.parametrize(("want", "groups"), [
    (Want(), []),
    (Want(client_part=True), [CLIENT_GROUP]),
    (Want(blocks=BlockRange(1, 3)), [block_group(1), block_group(2)]),
    (Want(blocks=BlockRange(3, 4), client_part=True), [CLIENT_GROUP, block_group(3)]),
    (Want.whole(), [CLIENT_GROUP, *(block_group(i) for i in range(4))]),
])
def test_groups_for_a_want(llama: Path, want: Want, groups: list[str]) -> None:
    model_id, doc = checkpoint_manifest(llama)
    manifest = Manifest(doc, model_id)
    got = [g.key for g in manifest.groups_for(want)]
    files = [g.key for g in manifest.file_groups()]
    assert got == files + groups
    pieces = [t["pieces"] for t in fp.manifest_tensors(doc).values()] + [f["pieces"] for f in doc["files"].values()]
    assert sum(g.num_pieces for g in manifest.groups.values()) == sum(map(len, pieces))


def test_a_want_outside_the_model_and_bad_ids_are_config_errors(llama: Path) -> None:
    manifest = Manifest(*reversed(checkpoint_manifest(llama)))
    with pytest.raises(ConfigError, match="exceeds"):
        manifest.groups_for(Want(blocks=BlockRange(2, 6)))
    for bad in ("", "xyz", "A" * 32, "0" * 31, "0" * 33, "../" + "0" * 29):
        assert not is_model_id(bad)
        with pytest.raises(ConfigError, match="not a model id"):
            check_model_id(bad)


def test_manifest_command_prints_the_id_and_writes_the_manifest(llama: Path, private_cache: Path, tmp_path: Path,
                                                                copy_of: Callable[[Path], Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from meshinfer.cli.main import main

    model_id = checkpoint_fingerprint(llama)
    d = copy_of(llama)
    assert main(["manifest", str(d)]) == 0
    assert capsys.readouterr().out.strip() == model_id
    assert manifest_id(json.loads((d / MANIFEST_NAME).read_bytes())) == model_id
    assert checkpoint_fingerprint(d) == model_id  # with its manifest stored, still the same id
    out = tmp_path / "elsewhere.json"
    assert main(["manifest", str(llama), "--out", str(out), "--json", "--rebuild"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_id"] == model_id and doc["num_blocks"] == 4 and doc["manifest"] == str(out)
    assert out.read_bytes() == (d / MANIFEST_NAME).read_bytes()
    assert main(["manifest", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"error: model {str(tmp_path / 'nope')!r} does not exist")
