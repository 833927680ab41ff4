"""GGUF view directories as checkpoints: layout, model id, manifest, seeding locations, a fetched copy made by the
real weight store, and every way a user can hand us a bad GGUF (each a one-line error, nothing half-written).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from meshinfer.errors import CheckpointError, ConfigError, MeshinferError, UnsupportedModelError
from meshinfer.models.checkpoint import Checkpoint, load_tokenizer
from meshinfer.models.engine import LocalModel
from meshinfer.models.fingerprint import MANIFEST_FILES, build_manifest, checkpoint_fingerprint
from meshinfer.models.gguf import gguf_view, is_gguf_view, view_locations
from meshinfer.models.gguf_file import GgufFile
from meshinfer.models.gguf_view import views_root
from meshinfer.models.safetensors_files import tensor_locations, weight_files
from meshinfer.models.spec import ModelSpec
from meshinfer.testing.gguf_files import tiny_gguf

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250]


def one_line(err: pytest.ExceptionInfo[MeshinferError]) -> str:
    text = str(err.value)
    assert text and "\n" not in text, repr(text)
    return text


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_gguf("llama", "Q8_0")


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _rewrite(src: Path, dst: Path, kv: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
             tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of GGUF ``src`` with metadata changed (``kv``: key -> (value, type)), keys or tensors dropped
    and ``tensors`` added, written by gguf's own writer."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    kv = dict(kv or {})
    writer = GGUFWriter(str(dst), arch=kv.pop("general.architecture", (arch,))[0])
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in kv:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# ---- layout and identity ------------------------------------------------------------------------


def test_a_view_is_a_deterministic_checkpoint_directory(tiny: Path, cache: Path, tmp_path: Path) -> None:
    view = gguf_view(tiny, cache=cache)
    assert view.parent == cache / "gguf" and view.name.startswith(tiny.stem + "-") and is_gguf_view(view)
    assert os.readlink(view / "model.gguf") == str(tiny.resolve())
    assert sorted(p.name for p in view.iterdir()) == [".gguf-view.json", "config.json", "generation_config.json",
                                                     "gguf-metadata.json", "model.gguf", "tokenizer"]
    config = json.loads((view / "config.json").read_text())
    spec = ModelSpec.from_config(config)
    assert (spec.family, spec.num_blocks) == ("llama", 4)
    section = config["meshinfer_gguf"]
    assert section["version"] == 1 and section["architecture"] == "llama" and section["qk_permuted"] is True
    assert section["tensors"]["model.layers.0.self_attn.q_proj.weight"] == ["Q8_0", [64, 64]]
    assert section["tensors"]["model.norm.weight"] == ["F32", [64]]
    metadata = (view / "gguf-metadata.json").read_bytes()
    assert metadata == json.dumps(json.loads(metadata), sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True).encode()
    assert json.loads(metadata) == GgufFile(tiny).metadata and "GGUF.version" not in json.loads(metadata)
    other = gguf_view(tiny, cache=tmp_path / "other")  # same file, another cache: the very same bytes
    for name in ("config.json", "generation_config.json", "gguf-metadata.json"):
        assert (view / name).read_bytes() == (other / name).read_bytes()
    assert gguf_view(tiny, cache=cache) == view


def test_a_valid_view_is_reused_without_parsing_the_file_again(tiny: Path, cache: Path, monkeypatch) -> None:
    view = gguf_view(tiny, cache=cache)
    import meshinfer.models.gguf_view as gv

    monkeypatch.setattr(gv, "GgufFile", lambda *a: pytest.fail("parsed again"))
    assert gguf_view(tiny, cache=cache) == view


def test_model_id_is_stable_across_views_and_follows_the_content(tiny: Path, tmp_path: Path) -> None:
    a = gguf_view(tiny, cache=tmp_path / "a")
    b = gguf_view(tiny, cache=tmp_path / "b")
    moved = shutil.copy(tiny, tmp_path / "elsewhere.gguf")
    c = gguf_view(moved, cache=tmp_path / "a")
    assert c != a  # another file, another view...
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b) == checkpoint_fingerprint(c)  # ...same model
    changed = tmp_path / "changed.gguf"
    data = bytearray(Path(tiny).read_bytes())
    loc = view_locations(a)["model.layers.2.mlp.up_proj.weight"]
    data[loc.start + 5] ^= 0x01  # one weight byte
    changed.write_bytes(bytes(data))
    assert checkpoint_fingerprint(gguf_view(changed, cache=tmp_path / "a")) != checkpoint_fingerprint(a)


def test_the_manifest_covers_tensors_config_and_metadata_but_not_the_tokenizer(tiny: Path, cache: Path) -> None:
    view = gguf_view(tiny, cache=cache)
    doc = build_manifest(view)
    assert sorted(doc["files"]) == ["config.json", "generation_config.json", "gguf-metadata.json"]
    assert "gguf-metadata.json" in MANIFEST_FILES and (view / "tokenizer" / "tokenizer.json").is_file()
    gguf = GgufFile(tiny)
    tensors = {**doc["client"], **{k: v for block in doc["blocks"] for k, v in block.items()}}
    assert set(tensors) == set(gguf.tensors) and doc["num_blocks"] == 4
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    info = gguf.tensors["model.layers.1.self_attn.q_proj.weight"]
    assert (q["dtype"], q["shape"], q["size"]) == ("U8", [64, 68], info.end - info.start)
    raw = Path(tiny).read_bytes()[info.start:info.end]  # the GGUF's own bytes, still permuted
    assert q["pieces"] == [hashlib.sha256(raw).hexdigest()]
    assert tensors["model.norm.weight"]["dtype"] == "F32" and tensors["model.norm.weight"]["shape"] == [64]
    assert weight_files(view) == [view / "model.gguf"] and tensor_locations(view) == view_locations(view)


def test_a_copy_fetched_by_the_weight_store_is_the_same_checkpoint(tiny: Path, cache: Path, tmp_path: Path) -> None:
    """Pieces served from the view (``weights.seed``) and written by the real store (``weights.store``): a
    directory of safetensors containers, config.json, generation_config.json and gguf-metadata.json only."""
    from meshinfer.weights.seed import LocalPieces
    from meshinfer.weights.store import ModelStore

    view = gguf_view(tiny, cache=cache)
    seeded = LocalPieces(view)
    try:
        assert {g.key for g in seeded.held} == set(seeded.manifest.groups)  # a view serves everything
        store = ModelStore(tmp_path / "models", seeded.manifest)
        store.write_manifest()
        for group in seeded.manifest.groups.values():
            partial = store.begin(group)
            for ref in partial.open():
                assert partial.write(ref, seeded.read_piece(ref.kind, ref.name, ref.index))
            partial.finish()
        store.write_index()
    finally:
        seeded.close()
    copy = store.path
    assert not (copy / "model.gguf").exists() and not is_gguf_view(copy)
    assert checkpoint_fingerprint(copy) == seeded.model_id == checkpoint_fingerprint(view)
    fetched, original = Checkpoint(copy), Checkpoint(view)
    assert fetched.is_gguf and fetched.weight_map != original.weight_map
    fetched.check_all()
    names = list(original.gguf["tensors"])
    a, b = fetched.read_ggml(names), original.read_ggml(names)
    for name in names:
        assert a[name].ggml_type == b[name].ggml_type and torch.equal(a[name].data, b[name].data), name
    assert torch.equal(LocalModel.from_pretrained(copy).prefill_logits(PROMPT),
                       LocalModel.from_pretrained(view).prefill_logits(PROMPT))
    tok = load_tokenizer(copy)  # rebuilt from gguf-metadata.json
    assert (copy / "tokenizer" / "tokenizer.json").is_file()
    assert tok.encode("Hello world") == load_tokenizer(view).encode("Hello world")


def test_a_missing_tokenizer_directory_is_rebuilt(tiny: Path, cache: Path, tmp_path: Path) -> None:
    view = gguf_view(tiny, cache=cache)
    expected = load_tokenizer(tiny).encode("The quick brown fox")
    shutil.rmtree(view / "tokenizer")
    assert load_tokenizer(view).encode("The quick brown fox") == expected
    assert (view / "tokenizer" / "tokenizer_config.json").is_file()


# ---- a source that moved on ----------------------------------------------------------------------


def test_a_view_whose_file_vanished_or_changed_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    path = Path(shutil.copy(tiny, tmp_path / "model.gguf"))
    view = gguf_view(path, cache=tmp_path / "cache")
    os.utime(path, ns=(1, 1))  # same bytes, other mtime: the view no longer vouches for it
    with pytest.raises(CheckpointError, match="changed after its view"):
        Checkpoint(view)
    fresh = gguf_view(path, cache=tmp_path / "cache")
    assert fresh != view and Checkpoint(fresh).spec.num_blocks == 4
    path.unlink()
    with pytest.raises(CheckpointError, match="is gone") as err:
        Checkpoint(fresh)
    one_line(err)
    with pytest.raises(CheckpointError) as err:
        gguf_view(path, cache=tmp_path / "cache")
    one_line(err)


# ---- bad files -----------------------------------------------------------------------------------


def _bad(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cut", [4, 20, 3000, -100, -1], ids=["magic", "counts", "metadata", "data", "last-byte"])
def test_truncated_files_are_one_line_checkpoint_errors(tiny: Path, tmp_path: Path, cut: int) -> None:
    path = _bad(tmp_path, Path(tiny).read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="cut short") as err:
        Checkpoint(path)
    assert str(path) in one_line(err)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


def test_bad_magic_and_other_files_are_refused(tiny: Path, tmp_path: Path) -> None:
    path = _bad(tmp_path, b"GGUX" + Path(tiny).read_bytes()[4:])
    for call in (Checkpoint, gguf_view, GgufFile, LocalModel.from_pretrained):
        with pytest.raises(CheckpointError, match="not a GGUF file") as err:
            call(path)
        one_line(err)


def test_duplicate_tensor_names_are_refused(tiny: Path, tmp_path: Path) -> None:
    data = Path(tiny).read_bytes()
    name = b"blk.1.attn_q.weight"
    i = data.index(name)
    path = _bad(tmp_path, data[:i] + b"blk.1.attn_k.weight" + data[i + len(name):])
    with pytest.raises(CheckpointError, match=r"(?i)duplicate") as err:
        GgufFile(path)
    one_line(err)


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"kv": {"general.architecture": ("gemma2", None)}}, UnsupportedModelError,
     r"architecture 'gemma2'; supported: llama \(Llama, Mistral\), qwen2, qwen3"),
    ({"tensors": {"blk.0.attn_gate.weight": np.zeros((64, 64), np.float32)}}, UnsupportedModelError,
     "blk.0.attn_gate.weight"),
    ({"tensors": {"rope_freqs.weight": np.ones(8, np.float32)}}, UnsupportedModelError, "rope_freqs"),
    ({"kv": {"llama.rope.scaling.type": ("yarn", "STRING")}}, UnsupportedModelError, "rope"),
    ({"kv": {"llama.attention.sliding_window": (128, "UINT32")}}, UnsupportedModelError, "sliding_window"),
    ({"kv": {"llama.expert_count": (8, "UINT32")}}, UnsupportedModelError, "expert_count"),
    ({"kv": {"llama.vocab_size": (999, "UINT32")}}, CheckpointError, "vocabulary size 999"),
    ({"tensors": {"blk.9.attn_norm.weight": np.ones(64, np.float32)}}, UnsupportedModelError, "blk.9"),
    ({"drop": ("blk.3.ffn_down.weight",)}, CheckpointError, "lacks tensor.*blk.3.ffn_down.weight"),
    ({"tensors": {"output_norm.bias": np.ones(64, np.float32)}}, UnsupportedModelError, "output_norm.bias"),
    ({"tensors": {"blk.0.attn_output.bias": np.ones(64, np.int32)}}, UnsupportedModelError, "type I32"),
    ({"kv": {"general.weight": (float("nan"), "FLOAT32")}}, CheckpointError, "NaN"),  # fails mid-write
])
def test_what_we_cannot_honour_is_refused_by_name(tiny: Path, tmp_path: Path, change: dict[str, Any],
                                                 error: type[MeshinferError], message: str) -> None:
    from gguf import GGUFValueType

    kv = {k: (v, GGUFValueType[t] if t else None) for k, (v, t) in change.get("kv", {}).items()}
    path = _rewrite(tiny, tmp_path / "odd.gguf", kv=kv, drop=change.get("drop", ()), tensors=change.get("tensors"))
    cache = tmp_path / "cache"
    with pytest.raises(error, match=message) as err:
        gguf_view(path, cache=cache)
    one_line(err)
    assert not views_root(cache).exists() or not any(views_root(cache).iterdir())  # nothing half-written


def test_convert_refuses_a_non_empty_directory_and_writes_atomically(tiny: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from meshinfer.cli.main import main
    from meshinfer.testing.checkpoints import tiny_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_gguf("llama", "F32")), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", str(tiny_gguf("llama", "F32")), str(out), "--overwrite", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "special_tokens_map.json", "tokenizer.json",
                                                    "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    ours, source = load_file(str(out / "model.safetensors")), load_file(str(tiny_checkpoint("llama") /
                                                                          "model.safetensors"))
    assert set(ours) == set(source)
    for name, value in source.items():  # un-permuted, rounded once to bf16
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], value.to(torch.bfloat16)), name
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        from meshinfer.models.gguf_convert import convert_gguf

        convert_gguf(out / "config.json", tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown dtype"):
        convert_gguf(tiny, tmp_path / "x", dtype="int3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("family", "arch"), [("llama", "LLAMA"), ("qwen2", "QWEN2"), ("qwen3", "QWEN3")])
def test_tensor_names_map_like_the_gguf_package_maps_them(family: str, arch: str) -> None:
    """Our HF <-> llama.cpp name table against gguf-py's own tensor_mapping (what convert_hf_to_gguf.py uses)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    from meshinfer.models.gguf_file import gguf_tensor_name, hf_tensor_name
    from meshinfer.testing.checkpoints import tiny_config

    config = dict(tiny_config(family), attention_bias=True, mlp_bias=family == "llama")
    spec = ModelSpec.from_config(config)
    names = dict(spec.head_tensors(), **{"lm_head.weight": (1,)})
    for i in range(spec.num_blocks):
        names.update(spec.block_tensors(i))
    mapping = get_tensor_name_map(MODEL_ARCH[arch], spec.num_blocks)
    for name in names:
        stem, suffix = name.rsplit(".", 1)
        expected = f"{mapping.get_name(stem)}.{suffix}"
        assert gguf_tensor_name(name) == expected and hf_tensor_name(expected) == name, name
    assert hf_tensor_name("blk.1.attn_gate.weight") is None and hf_tensor_name("blk.01.attn_q.weight") is None
