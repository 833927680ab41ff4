"""Checkpoint loading: sharded files, span-only and head-only loading, and every kind of bad directory.

Bad directories are copies of a real tiny checkpoint, damaged the way users damage them: a cut
download, a scrambled header, a missing shard, tensors left out, a config.json of another model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshinfer.errors import CheckpointError, MeshinferError, UnsupportedModelError
from meshinfer.models.checkpoint import Checkpoint, load_tokenizer
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.types import BlockRange

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250]


@pytest.fixture(scope="module")
def llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints[("llama", "default")]


@pytest.fixture()
def copy_of(tmp_path: Path):
    def make(src: Path) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        return dst

    return make


def one_line(err: pytest.ExceptionInfo[MeshinferError]) -> str:
    text = str(err.value)
    assert text and "\n" not in text, repr(text)
    return text


# ---- good checkpoints -------------------------------------------------------------------------


def test_sharded_checkpoint_loads_identically(llama: Path, our_model) -> None:
    sharded = tiny_checkpoint("llama", sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) == 2
    assert not (sharded / "model.safetensors").exists()
    a, b = our_model(llama), LocalModel.from_pretrained(sharded)
    sa, sb = a.span.state_dict(), b.span.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert torch.equal(a.head.lm_head, b.head.lm_head)
    assert torch.equal(a.prefill_logits(PROMPT), b.prefill_logits(PROMPT))


def test_load_span_holds_only_its_blocks(llama: Path) -> None:
    ckpt = Checkpoint(llama)
    span = ckpt.load_span(BlockRange(1, 3))
    names = [n for n, _ in span.named_parameters()]
    assert names and all(n.startswith(("layers.0.", "layers.1.")) for n in names), names
    assert [layer.index for layer in span.layers] == [1, 2]
    assert sum(p.numel() for p in span.parameters()) == 2 * ckpt.spec.block_param_count()
    head = ckpt.load_head()
    assert {n for n, _ in head.named_parameters()} == {"embedding.weight", "norm", "output.weight"}


def test_span_loads_from_a_directory_holding_only_its_tensors(llama: Path, copy_of) -> None:
    """A server with only its span's tensors on disk can load that span (and nothing else)."""
    full = load_file(str(llama / "model.safetensors"))
    keep = {n: t for n, t in full.items() if n.startswith(("model.layers.1.", "model.layers.2."))}
    part = copy_of(llama)
    save_file(keep, str(part / "model.safetensors"), metadata={"format": "pt"})

    span = Checkpoint(part).load_span(BlockRange(1, 3))
    reference = Checkpoint(llama).load_span(BlockRange(1, 3))
    for (na, pa), (nb, pb) in zip(span.named_parameters(), reference.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    with pytest.raises(CheckpointError) as err:
        Checkpoint(part).load_span(BlockRange(0, 2))
    assert "model.layers.0." in one_line(err)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight"):
        Checkpoint(part).load_head()


def test_tokenizer_loads(llama: Path) -> None:
    tok = load_tokenizer(llama)
    ids = tok.encode("The keeper climbed the tower", add_special_tokens=False)
    assert ids and tok.decode(ids).strip() == "The keeper climbed the tower"


# ---- bad checkpoints --------------------------------------------------------------------------


def test_unsupported_architecture(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    config = json.loads((bad / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as err:
        LocalModel.from_pretrained(bad)
    assert one_line(err) == "unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3"


def test_missing_tensors_are_named(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    tensors = load_file(str(bad / "model.safetensors"))
    dropped = ["model.layers.2.mlp.up_proj.weight", "model.layers.3.self_attn.k_proj.weight"]
    save_file({n: t for n, t in tensors.items() if n not in dropped}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        LocalModel.from_pretrained(bad)
    text = one_line(err)
    assert "2 tensor(s)" in text and all(name in text for name in dropped), text


def test_many_missing_tensors_are_summarised(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    tensors = load_file(str(bad / "model.safetensors"))
    save_file({n: t for n, t in tensors.items() if ".layers.3." not in n}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(bad).load_span(BlockRange(0, 4))
    text = one_line(err)
    assert "9 tensor(s) of blocks 0:4" in text and "model.layers.3." in text and "and 6 more" in text, text


def test_truncated_safetensors(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as err:
        LocalModel.from_pretrained(bad)
    assert "model.safetensors" in one_line(err) and "truncated or corrupt" in one_line(err)


def test_corrupt_header(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:24] = b"#not json here!!"
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        LocalModel.from_pretrained(bad)
    assert "model.safetensors" in one_line(err) and "corrupt" in one_line(err)


def test_tiny_file(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    (bad / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Checkpoint(bad)


def test_index_pointing_to_missing_shard(copy_of) -> None:
    bad = copy_of(tiny_checkpoint("llama", sharded=True))
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        LocalModel.from_pretrained(bad)
    assert "model-00002-of-00002.safetensors" in one_line(err) and "missing" in one_line(err)


def test_index_naming_a_tensor_its_shard_lacks(copy_of) -> None:
    bad = copy_of(tiny_checkpoint("llama", sharded=True))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    if "model.norm.weight" in load_file(str(bad / "model-00001-of-00002.safetensors")):
        index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"places model\.norm\.weight in"):
        Checkpoint(bad).load_head()


def test_wrong_shapes(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        LocalModel.from_pretrained(bad)
    assert "mlp." in one_line(err) and "expected" in one_line(err)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("no_dir", "does not exist"),
        ("no_config", "config.json not found"),
        ("bad_config", "cannot read"),
        ("no_weights", "no model.safetensors or model.safetensors.index.json"),
        ("bin_only", "only safetensors"),
    ],
)
def test_broken_directories(llama: Path, copy_of, tmp_path: Path, damage: str, needle: str) -> None:
    bad = copy_of(llama)
    if damage == "no_dir":
        bad = tmp_path / "nowhere"
    elif damage == "no_config":
        (bad / "config.json").unlink()
    elif damage == "bad_config":
        (bad / "config.json").write_text("{ not json")
    else:
        (bad / "model.safetensors").unlink()
        if damage == "bin_only":
            (bad / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError) as err:
        LocalModel.from_pretrained(bad)
    assert needle in one_line(err)


def test_missing_tokenizer(llama: Path, copy_of) -> None:
    bad = copy_of(llama)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(bad)
    assert "cannot load the tokenizer" in one_line(err)


def test_span_outside_the_model(llama: Path) -> None:
    with pytest.raises(CheckpointError, match="exceeds the model's 4 blocks"):
        Checkpoint(llama).load_span(BlockRange(2, 6))
