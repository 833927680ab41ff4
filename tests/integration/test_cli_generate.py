"""``meshinfer generate`` and ``meshinfer bench local`` run as real subprocesses, plus the incremental detokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fuzzing import budget
from meshinfer.cli.generate import IncrementalDetokenizer, text_decoder
from meshinfer.testing.checkpoints import tiny_checkpoint

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower"
TIMEOUT = 120


def meshinfer(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("meshinfer")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "meshinfer.cli.main"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)


def generate_json(model: Path | str, *flags: str, prompt: str = PROMPT) -> dict:
    proc = meshinfer("generate", "--model", str(model), "--prompt", prompt, "--json", *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def llama() -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture
def llama_copy(tmp_path: Path, llama: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(llama, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# Happy paths


@pytest.fixture(scope="module")
def local_llama(llama: Path):
    from meshinfer.models.engine import LocalModel

    return LocalModel.from_pretrained(llama)


def test_json_greedy_equals_local_model(llama: Path, local_llama) -> None:
    doc = generate_json(llama, "--max-new-tokens", "24")
    prompt_ids = local_llama.tokenizer(PROMPT)["input_ids"]
    assert doc["prompt"] == PROMPT and doc["prompt_token_ids"] == prompt_ids
    assert doc["generated_token_ids"] == local_llama.generate(prompt_ids, 24)
    assert len(doc["generated_token_ids"]) == 24
    assert doc["text"] == local_llama.tokenizer.decode(doc["generated_token_ids"], skip_special_tokens=True)
    assert doc["timings"]["total_s"] > 0 and doc["timings"]["decode_tokens_per_s"] > 0


def test_streamed_text_equals_the_whole_decode(llama: Path, local_llama) -> None:
    prompt_ids = local_llama.tokenizer(PROMPT)["input_ids"]
    want = local_llama.tokenizer.decode(local_llama.generate(prompt_ids, 20), skip_special_tokens=True)
    proc = meshinfer("generate", "--model", str(llama), "--prompt", PROMPT, "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"
    assert "20 new tokens" in proc.stderr  # the timing summary goes to stderr


def test_seeded_sampling_is_reproducible(llama: Path, local_llama) -> None:
    from meshinfer.config import SamplingConfig

    flags = ("--max-new-tokens", "24", "--temperature", "0.8", "--top-p", "0.95", "--seed", "7")
    a = generate_json(llama, *flags)["generated_token_ids"]
    b = generate_json(llama, *flags)["generated_token_ids"]
    assert a == b
    # The command samples exactly as the Python API does; another seed gives other tokens.
    prompt_ids = local_llama.tokenizer(PROMPT)["input_ids"]
    same = local_llama.generate(prompt_ids, 24, SamplingConfig(temperature=0.8, top_p=0.95, seed=7))
    other = local_llama.generate(prompt_ids, 24, SamplingConfig(temperature=0.8, top_p=0.95, seed=8))
    assert a == same
    assert a != other


def test_ignore_eos_logit_bias_and_penalties(llama: Path, local_llama) -> None:
    from meshinfer.config import SamplingConfig

    eos = min(local_llama.spec.eos_token_ids)
    flags = ("--max-new-tokens", "8", "--ignore-eos", "--logit-bias", f"{eos}=100", "3=-100",
             "--frequency-penalty", "0.5", "--presence-penalty", "0.25")
    doc = generate_json(llama, *flags)
    assert doc["generated_token_ids"] == [eos] * 8  # forced eos 8 times: --ignore-eos did not stop at it
    assert doc["sampling"]["logit_bias"] == [[eos, 100.0], [3, -100.0]]
    prompt_ids = local_llama.tokenizer(PROMPT)["input_ids"]
    sampling = SamplingConfig(logit_bias=((eos, 100.0), (3, -100.0)), frequency_penalty=0.5, presence_penalty=0.25)
    assert local_llama.generate(prompt_ids, 8, sampling) == [eos]  # the default stop set ends at once


def test_demo_model_sharded_checkpoint_and_bf16() -> None:
    from meshinfer.models.engine import LocalModel

    doc = generate_json("demo", "--max-new-tokens", "8")
    assert "demo-llama" in doc["model"] and len(doc["generated_token_ids"]) == 8
    sharded = tiny_checkpoint("qwen3", sharded=True)
    whole = LocalModel.from_pretrained(tiny_checkpoint("qwen3"))
    low = generate_json(sharded, "--max-new-tokens", "6", "--dtype", "bf16")
    assert low["dtype"] == "bfloat16" and len(low["generated_token_ids"]) == 6
    assert low["prompt_token_ids"] == whole.tokenizer(PROMPT)["input_ids"]
    # bf16 greedy tokens may drift from fp32 eventually, but not on the very first token.
    assert low["generated_token_ids"][0] == whole.generate(low["prompt_token_ids"], 1)[0]


def test_bench_local_on_a_tiny_model(tmp_path: Path, llama: Path) -> None:
    out = tmp_path / "local.json"
    proc = meshinfer("bench", "local", "--model", str(llama), "--runs", "1", "--new-tokens", "6",
                     "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())["results"]
    assert res["prompt_tokens"] == 16 and res["new_tokens"] == 6 and res["torch_threads"] == 1
    for engine in ("meshinfer", "transformers"):
        assert res[engine]["decode_tokens_per_s"] > 0 and res[engine]["prefill_tokens_per_s"] > 0
    assert res["ratio_ours_over_hf"]["decode"] > 0
    assert res["greedy_tokens_identical"] is True and res["greedy_tokens_matching_prefix"] == 6
    assert "ratio_ours_over_hf.decode" in proc.stdout  # the table


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--max-new-tokens", "-1"), "--max-new-tokens"),
        (("--top-p", "0"), "--top-p"),
        (("--top-p", "1.5"), "--top-p"),
        (("--temperature", "-0.5"), "--temperature"),
        (("--top-k", "-3"), "--top-k"),
        (("--repetition-penalty", "0"), "--repetition-penalty"),
        (("--presence-penalty", "2.5"), "--presence-penalty"),
        (("--frequency-penalty", "-3"), "--frequency-penalty"),
        (("--min-p", "1.5"), "--min-p"),
        (("--logit-bias", "42"), "--logit-bias takes ID=BIAS"),
        (("--logit-bias", "42=200"), "--logit-bias"),
        (("--dtype", "int8"), "dtype"),
        (("--max-download", "0"), "--max-download must be > 0 MB/s"),
        (("--max-download", "nan"), "--max-download must be > 0 MB/s"),
    ],
)
def test_bad_flag_values(flags: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(meshinfer("generate", "--model", "demo", "--prompt", "x", *flags), needle)


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    assert_one_line_error(meshinfer("generate", "--model", str(missing), "--prompt", "x"), str(missing),
                          "does not exist")


def test_unsupported_architecture_names_supported_ones(llama_copy: Path) -> None:
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    line = assert_one_line_error(meshinfer("generate", "--model", str(llama_copy), "--prompt", "x"))
    assert "gpt2" in line.lower() or "GPT2LMHeadModel" in line
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert family in line.lower()


def test_missing_tensors_are_named(llama_copy: Path) -> None:
    path = llama_copy / "model.safetensors"
    tensors = load_file(str(path))
    gone = ["model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    for name in gone:
        del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})
    proc = meshinfer("generate", "--model", str(llama_copy), "--prompt", "x")
    line = assert_one_line_error(proc)
    assert any(name in line for name in gone), line


@pytest.mark.parametrize("damage", ["truncate", "corrupt-header"])
def test_truncated_or_corrupt_safetensors(llama_copy: Path, damage: str) -> None:
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:8] + b"{not json at all" + data[24:])
    line = assert_one_line_error(meshinfer("generate", "--model", str(llama_copy), "--prompt", "x"))
    assert "model.safetensors" in line


def test_prompt_longer_than_context(llama: Path) -> None:
    limit = json.loads((llama / "config.json").read_text())["max_position_embeddings"]
    prompt = " ".join(["keeper"] * (limit + 10))
    line = assert_one_line_error(meshinfer("generate", "--model", str(llama), "--prompt", prompt))
    assert str(limit) in line


# ---------------------------------------------------------------------------------------------------
# Incremental detokenisation (in-process)


@pytest.fixture(scope="module")
def byte_tokenizer(llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama)


def test_multibyte_characters_never_split(byte_tokenizer) -> None:
    text = " naïve café — 12 € 🙂 Grüße"
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = text_decoder(byte_tokenizer)
    # The byte-level vocabulary really splits some characters across tokens.
    assert any("\ufffd" in decode([i]) for i in ids)
    detok = IncrementalDetokenizer(decode)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@budget(150)
@given(st.lists(st.integers(min_value=0, max_value=511), max_size=40))
def test_deltas_concatenate_to_full_decode(byte_tokenizer, ids: list[int]) -> None:
    decode = text_decoder(byte_tokenizer)
    detok = IncrementalDetokenizer(decode)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == decode(ids)


def test_leading_space_of_a_suffix_is_kept() -> None:
    # Pure logic: a SentencePiece-like decoder drops the leading space of whatever it decodes first.
    vocab = {0: "▁Hello", 1: "▁world", 2: "!"}

    def decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    detok = IncrementalDetokenizer(decode)
    assert [detok.push(i) for i in (0, 1, 2)] == ["Hello", " world", "!"]


# ---------------------------------------------------------------------------------------------------
# Real models: a GGUF file and the catalogue by name, quantized


def test_generate_from_a_gguf_file_with_int4_weights_equals_the_local_engine(smollm2_gguf: Path) -> None:
    from meshinfer.models.engine import LocalModel

    doc = generate_json(smollm2_gguf, "--max-new-tokens", "12", "--quant", "int4", prompt="The capital of France is")
    local = LocalModel.from_pretrained(smollm2_gguf, quant="int4")  # int8 head: the local default when quantized
    assert doc["generated_token_ids"] == local.generate(doc["prompt_token_ids"], 12)
    assert "Paris" in doc["text"]


def test_chat_with_the_catalogue_model_by_name(smollm2_gguf: Path) -> None:
    exe = Path(sys.executable).with_name("meshinfer")
    proc = subprocess.run([str(exe), "chat", "--model", "smollm2", "--json", "--max-new-tokens", "16"],
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in reply["reply"] and "<|im_end|>" not in reply["reply"]


@pytest.mark.parametrize(("flags", "needle"), [
    (("--quant", "int3"), "unknown quant mode 'int3'; choose one of none, int8, int4"),
    (("--head-quant", "fp8"), "unknown quant mode 'fp8'"),
])
def test_bad_quant_flags(flags: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(meshinfer("generate", "--model", "tiny", "--prompt", "x", *flags), needle)


def test_bench_quant_on_a_tiny_model(tmp_path: Path, llama: Path) -> None:
    out = tmp_path / "quant.json"
    proc = meshinfer("bench", "quant", "--model", str(llama), "--variants", "int8,int4", "--runs", "1",
                     "--new-tokens", "4", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())["results"]
    assert list(res["variants"]) == ["none", "int8", "int4"] and res["int4_blocks_from"] == "the float weights"
    none, int8, int4 = (res["variants"][v] for v in ("none", "int8", "int4"))
    assert none["perplexity_over_none"] == 1.0 and none["agreement_with_none"]["teacher_forced_agreement"] == 1.0
    assert none["memory"]["blocks_over_bf16"] == 2.0  # fp32
    assert int4["memory"]["blocks_bytes"] < int8["memory"]["blocks_bytes"] < none["memory"]["blocks_bytes"]
    assert all(v["perplexity"] > 1 and v["decode_tokens_per_s"] > 0 for v in res["variants"].values())
