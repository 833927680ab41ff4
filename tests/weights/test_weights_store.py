"""The local weight store: verified in-place writes, resume by re-hashing, memory-mappable files, budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.weights.manifest import CLIENT_GROUP, PieceRef, Want, block_group
from meshinfer.weights.seed import LocalPieces
from meshinfer.weights.store import ModelStore, directory_bytes, group_filename


@pytest.fixture()
def local(llama: Path):
    model = LocalPieces(llama)
    yield model
    model.close()


def _piece(local: LocalPieces, ref: PieceRef) -> bytes:
    return local.read_piece(ref.kind, ref.name, ref.index)


def test_resume_rehashes_and_keeps_only_verified_pieces(local: LocalPieces, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, local.manifest)
    group = local.manifest.groups[block_group(2)]
    first = store.begin(group)
    pieces = first.open()
    assert len(pieces) == group.num_pieces == 9 and first.reused == 0
    written = pieces[::2]
    for ref in written:
        assert first.write(ref, _piece(local, ref))
    first.close()  # interrupted

    second = store.begin(group)
    missing = second.open()
    assert set(missing) == set(pieces) - set(written) and second.reused == len(written)
    second.close()

    # a piece torn on disk is fetched again
    item = local.manifest.item(written[0].kind, written[0].name)[1]  # type: ignore[index]
    with second.path.open("r+b") as f:
        f.seek(len(second.header) + item.offset)
        f.write(b"\0\1\2\3")
    third = store.begin(group)
    assert set(third.open()) == set(missing) | {written[0]}
    for ref in pieces:
        if ref not in written[1:]:
            assert third.write(ref, _piece(local, ref))
    assert third.complete
    final = third.finish(durable=False)
    assert final.name == group_filename(group) == "block-00002.safetensors" and not third.path.exists()
    assert store.is_complete(group)


def test_wrong_bytes_are_refused(local: LocalPieces, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, local.manifest)
    partial = store.begin(local.manifest.groups[CLIENT_GROUP])
    ref = partial.open()[0]
    good = _piece(local, ref)
    assert not partial.write(ref, bytes([good[0] ^ 1]) + good[1:])
    assert not partial.write(ref, good[:-1])
    assert not partial.write(ref, good + b"\0")
    assert not partial.complete
    with pytest.raises(CheckpointError, match="not part of"):
        partial.write(PieceRef("tensor", "model.layers.0.mlp.up_proj.weight", 0), b"")
    with pytest.raises(CheckpointError, match="not part of"):
        partial.write(PieceRef(ref.kind, ref.name, 99), good)
    with pytest.raises(CheckpointError, match="still missing"):
        partial.finish(durable=False)
    partial.close()


def test_finished_files_are_safetensors_that_map_the_same_tensors(local: LocalPieces, llama: Path,
                                                                 tmp_path: Path) -> None:
    store = ModelStore(tmp_path, local.manifest)
    store.write_manifest()
    for key in (CLIENT_GROUP, "file:config.json"):
        partial = store.begin(local.manifest.groups[key])
        for ref in partial.open():
            assert partial.write(ref, _piece(local, ref))
        partial.finish(durable=False)
    store.write_index()
    original = Checkpoint(llama).read(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"])
    with safe_open(str(store.path / "client.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(original)
        for name, tensor in original.items():
            assert torch.equal(f.get_tensor(name), tensor)
    assert (store.path / "config.json").read_bytes() == (llama / "config.json").read_bytes()


def test_disk_budget_is_checked_before_writing(local: LocalPieces, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, local.manifest)
    groups = local.manifest.groups_for(Want.whole())
    needed = store.needed_bytes(groups)
    assert needed > sum(g.size for g in groups)  # headers and the manifest come on top
    store.check_budget(groups, needed)
    (tmp_path / "other-model").mkdir()
    (tmp_path / "other-model" / "blob").write_bytes(b"\0" * 1000)
    assert directory_bytes(tmp_path) == 1000
    with pytest.raises(ConfigError, match=r"needs .* more.*--max-cache-bytes") as err:
        store.check_budget(groups, needed + 999, "the whole model")
    assert "\n" not in str(err.value)
    store.check_budget(groups, None)
    assert not store.path.exists()  # nothing written by a check


def test_one_fetching_process_per_model(local: LocalPieces, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, local.manifest)
    fd = store.acquire_lock()
    try:
        with pytest.raises(ConfigError, match="another process"):
            ModelStore(tmp_path, local.manifest).acquire_lock(timeout=0.3)
    finally:
        store.release_lock(fd)
    store.release_lock(store.acquire_lock(timeout=0.3))
