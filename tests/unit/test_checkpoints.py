"""The tiny checkpoint factory: real HF format (checked with transformers), determinism, caching."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from meshinfer.errors import ConfigError
from meshinfer.testing.checkpoints import (
    bench_config,
    demo_checkpoint,
    list_tiny_checkpoints,
    parameter_count,
    tiny_checkpoint,
    tiny_config,
)
from meshinfer.testing.tokenizer import corpus_text, recipe_for, write_tokenizer

ALL = list_tiny_checkpoints()
PROMPTS = ["The keeper climbed the tower", "Rivers also flood.", "Dear Anna, the snow came early"]


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Collect WARNING+ records of the ``transformers`` logger (it does not propagate to root)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _tree_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_families_and_variants_listed() -> None:
    assert set(ALL) >= {("llama", "default"), ("llama", "tied"), ("llama", "llama3"), ("llama", "mha"),
                        ("mistral", "default"), ("qwen2", "default"), ("qwen3", "default")}


@pytest.mark.parametrize(("family", "variant"), ALL)
def test_layout_and_tensor_names(family: str, variant: str,
                                 tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    d = tiny_checkpoints[(family, variant)]
    names = {p.name for p in d.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == tiny_config(family, variant)
    assert cfg["model_type"] == family and cfg["architectures"][0].lower().startswith(family)
    assert cfg["torch_dtype"] == "float32"
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    n = cfg["num_hidden_layers"]
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    for i in range(n):
        for proj in ("q", "k", "v", "o"):
            assert f"model.layers.{i}.self_attn.{proj}_proj.weight" in keys
        for proj in ("gate", "up", "down"):
            assert f"model.layers.{i}.mlp.{proj}_proj.weight" in keys
    assert ("lm_head.weight" in keys) == (not cfg["tie_word_embeddings"])
    assert any(".q_proj.bias" in k for k in keys) == (family == "qwen2")
    assert any(".o_proj.bias" in k for k in keys) is False
    assert any(".q_norm." in k for k in keys) == (family == "qwen3")


def test_variant_specifics() -> None:
    assert tiny_config("llama")["num_key_value_heads"] < tiny_config("llama")["num_attention_heads"]
    mha = tiny_config("llama", "mha")
    assert mha["num_key_value_heads"] == mha["num_attention_heads"]
    assert tiny_config("llama", "tied")["tie_word_embeddings"] is True
    l3 = tiny_config("llama", "llama3")
    assert l3["rope_scaling"]["rope_type"] == "llama3"
    assert l3["max_position_embeddings"] > l3["rope_scaling"]["original_max_position_embeddings"]
    q3 = tiny_config("qwen3")
    assert q3["head_dim"] != q3["hidden_size"] // q3["num_attention_heads"]
    mistral = tiny_config("mistral")
    assert mistral["num_key_value_heads"] < mistral["num_attention_heads"]
    assert mistral["sliding_window"] is None


@pytest.mark.slow
@pytest.mark.parametrize(("family", "variant"), ALL)
def test_transformers_loads_cleanly_and_logits_are_well_spread(
        family: str, variant: str, tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = tiny_checkpoints[(family, variant)]
    with transformers_warnings() as warned:
        config = AutoConfig.from_pretrained(d)
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(d)
    assert warned == []
    assert {k: v for k, v in info.items() if v} == {}
    assert config.model_type == family
    assert type(model).__name__ == json.loads((d / "config.json").read_text())["architectures"][0]
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Greedy choices must be robust to fp32 rounding: the top-1/top-2 gap never gets tiny, and the
    # model does not collapse into repeating one token.
    gaps: list[float] = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        for scores in out.scores:
            top = scores[0].topk(2).values
            gaps.append(float(top[0] - top[1]))
        assert len(set(out.sequences[0, ids.shape[1]:].tolist())) >= 4
    assert min(gaps) > 1e-4, min(gaps)


def test_llama3_rope_scaling_changes_the_output(tmp_path: Path,
                                                tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoints[("llama", "llama3")]
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_scaling"] = None
    (plain / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(5, 500, (1, 120), generator=torch.Generator().manual_seed(0))  # [1, 120]
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src)(ids).logits[0, -1]
        b = AutoModelForCausalLM.from_pretrained(plain)(ids).logits[0, -1]
    assert (a - b).abs().max() > 0.1


@pytest.mark.parametrize("style", ["llama", "mistral", "qwen"])
def test_tokenizer_roundtrip_bos_and_chat_template(style: str,
                                                   tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    from transformers import AutoTokenizer

    family = {"llama": "llama", "mistral": "mistral", "qwen": "qwen3"}[style]
    recipe = recipe_for(style, 512)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[(family, "default")])
    assert len(tok) == 512
    text = corpus_text()
    ids = tok(text).input_ids
    assert (ids[0] == recipe.token_id(recipe.bos)) == recipe.add_bos
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode()) / 2  # BPE really merged something
    odd = "naïve café — 12 € 🙂"
    assert tok.decode(tok(odd).input_ids, skip_special_tokens=True) == odd
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == recipe.eos and tok.pad_token == recipe.pad


def test_every_id_decodes_even_when_padded_to_32000(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    recipe = recipe_for("llama", 32000)
    write_tokenizer(recipe, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 32000
    texts = tok.batch_decode([[i] for i in range(32000)])
    assert len(texts) == 32000 and all(isinstance(t, str) for t in texts)
    assert texts[31999] == "<filler_31999>"


def test_tiny_vocab_decodes_every_id(tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[("qwen2", "default")])
    assert len(tok.batch_decode([[i] for i in range(512)])) == 512


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = tiny_checkpoint("qwen2", seed=3, cache_dir=tmp_path / "a")
    b = tiny_checkpoint("qwen2", seed=3, cache_dir=tmp_path / "b")
    c = tiny_checkpoint("qwen2", seed=4, cache_dir=tmp_path / "a")
    assert a.name == b.name and a != c
    assert _tree_digest(a) == _tree_digest(b)
    wa, wc = load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors"))
    assert wa.keys() == wc.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(wa[q], wc[q])


def test_sharded_matches_unsharded(tmp_path: Path) -> None:
    whole = tiny_checkpoint("llama", cache_dir=tmp_path)
    sharded = tiny_checkpoint("llama", sharded=True, cache_dir=tmp_path)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (sharded / "model.safetensors").exists()
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(str(sharded / shard))
        assert all(index["weight_map"][k] == shard for k in part)
        merged.update(part)
    expected = load_file(str(whole / "model.safetensors"))
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())


def test_cache_reuse_and_env_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHINFER_CACHE_DIR", str(tmp_path / "env"))
    first = tiny_checkpoint("mistral", seed=9)
    assert first.parent == tmp_path / "env" / "checkpoints"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = tiny_checkpoint("mistral", seed=9)
    assert again == first and time.perf_counter() - t0 < 0.5
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.slow
def test_concurrent_builders_see_a_whole_checkpoint(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = (
        "import sys, time, pathlib, torch\n"
        "from meshinfer.testing.checkpoints import tiny_checkpoint\n"
        "d = pathlib.Path(sys.argv[1]); (d / ('ready' + sys.argv[2])).touch()\n"
        "while not (d / 'go').exists(): time.sleep(0.01)\n"
        "print(tiny_checkpoint('qwen3', seed=5, cache_dir=d / 'cache'))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              text=True) for i in range(3)]
    try:
        deadline = time.monotonic() + 60
        while sum((tmp_path / f"ready{i}").exists() for i in range(3)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    built = Path(outs[0])
    assert _tree_digest(built) == _tree_digest(tiny_checkpoint("qwen3", seed=5, cache_dir=tmp_path / "ref"))
    assert [p.name for p in cache.iterdir()] == [built.name]


def test_bench_and_demo_shapes() -> None:
    cfg = bench_config()
    assert cfg["num_hidden_layers"] == 12 and cfg["hidden_size"] == 768 and cfg["vocab_size"] == 32000
    assert cfg["intermediate_size"] == 2048 and cfg["tie_word_embeddings"] is False
    assert 120e6 < parameter_count(cfg) < 150e6
    demo = json.loads((demo_checkpoint() / "config.json").read_text())
    assert demo["num_hidden_layers"] == 8 and demo["hidden_size"] == 128


def test_unknown_family_or_variant() -> None:
    with pytest.raises(ConfigError, match="qwen2"):
        tiny_checkpoint("gpt2")
    with pytest.raises(ConfigError, match="tied"):
        tiny_checkpoint("llama", variant="huge")
