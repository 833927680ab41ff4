"""The tokenizer rebuilt from GGUF metadata (``models.gguf_tokenizer``) against llama.cpp, the outside reference.

``data/smollm2_llamacpp_token_ids.json`` holds the ids llama.cpp's ``llama-tokenize`` gave for 32 texts (English,
unicode, emoji, CJK, accents, code with tabs and newlines, runs of spaces and digits, special tokens inside text,
leading spaces...) on SmolLM2-135M-Instruct.Q4_1.gguf (byte-level BPE, pre-tokenizer ``smollm``), on the same
vocabulary with four other pre-tokenizers (``llama-bpe``, ``qwen2``, ``default``, ``gpt-2``), and on a small
SentencePiece-style vocabulary (``tokenizer.ggml.model = llama``, byte fallback). Every id must match.

transformers' own GGUF tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, 5.x) does NOT always
match llama.cpp on SmolLM2: it has no split for the ``smollm`` pre-tokenizer and falls back to GPT-2's regex,
without llama.cpp's (and SmolLM2's original tokenizer.json's) "every digit alone" split, so a run of spaces
before a number (``"user  12345"``: llama.cpp ``"  " "1" "2"...``, transformers ``" " " 1"...``) and numeric
characters after a space (``" ½"``, ``" Ⅻ"``) come out differently. ``KNOWN_TRANSFORMERS_DIFFERENCES`` lists
the texts where it differs; ours matches llama.cpp on all of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from meshinfer.errors import CheckpointError, UnsupportedModelError
from meshinfer.models.gguf_file import GgufFile
from meshinfer.models.gguf_tokenizer import build_tokenizer, write_tokenizer_files

DATA: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "smollm2_llamacpp_token_ids.json")
                                  .read_text(encoding="utf-8"))
TEXTS: list[str] = DATA["texts"]
KNOWN_TRANSFORMERS_DIFFERENCES = {
    "costs  100 dollars,   2024 was   7   years after  2017",
    "<|im_start|>user  12345\t\tx",
    "ﬁ ligature, ½ fraction, ² superscript, Ⅻ roman numeral, ٣ arabic digit",
}


def mismatches(tok: Any, expected: list[list[int]], texts: list[str] = TEXTS) -> list[tuple[str, list[int]]]:
    return [(t, tok.encode(t, add_special_tokens=False)) for t, ids in zip(texts, expected, strict=True)
            if tok.encode(t, add_special_tokens=False) != ids]


@pytest.fixture(scope="module")
def metadata(smollm2_gguf: Path) -> dict[str, Any]:
    return GgufFile(smollm2_gguf).metadata


@pytest.fixture(scope="module")
def smollm2_tok(metadata: dict[str, Any]) -> Any:
    return build_tokenizer(metadata)


@pytest.mark.slow
def test_the_reference_ids_were_made_from_this_very_file(smollm2_gguf: Path) -> None:
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert digest == DATA["gguf"]["sha256"]
    assert len(TEXTS) >= 25 and "commit" in DATA["llama_cpp"]["version"]


def test_smollm2_ids_equal_llama_cpp(smollm2_tok: Any) -> None:
    assert mismatches(smollm2_tok, DATA["smollm2"]) == []
    assert smollm2_tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1  # one control token
    assert smollm2_tok.encode("Hi", add_special_tokens=True) == smollm2_tok.encode("Hi", add_special_tokens=False)


def test_smollm2_decodes_back_to_the_text(smollm2_tok: Any) -> None:
    for text, ids in zip(TEXTS, DATA["smollm2"], strict=True):
        assert smollm2_tok.decode(ids) == text
    assert smollm2_tok.decode([1, 4093, 2]) == "<|im_start|>user<|im_end|>"
    assert smollm2_tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


@pytest.mark.parametrize("pre", sorted(DATA["pre_variants"]))
def test_other_pre_tokenizers_equal_llama_cpp(metadata: dict[str, Any], pre: str) -> None:
    tok = build_tokenizer({**metadata, "tokenizer.ggml.pre": pre})
    assert mismatches(tok, DATA["pre_variants"][pre]) == []


def _spm_metadata() -> dict[str, Any]:
    vocab = DATA["spm_vocab"]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": vocab["tokens"],
            "tokenizer.ggml.scores": vocab["scores"], "tokenizer.ggml.token_type": vocab["token_type"],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_vocabularies_equal_llama_cpp(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer(_spm_metadata())
    assert mismatches(tok, DATA["spm"]) == []
    write_tokenizer_files(_spm_metadata(), tmp_path)
    assert mismatches(AutoTokenizer.from_pretrained(str(tmp_path)), DATA["spm"]) == []
    for text, ids in zip(TEXTS, DATA["spm_with_bos"], strict=False):  # llama.cpp adds BOS to SPM vocabularies
        assert tok.encode(text) == ids
    assert tok.decode(tok.encode("Hello world, café 日本", add_special_tokens=False)) == "Hello world, café 日本"


@pytest.mark.slow
def test_transformers_differs_from_llama_cpp_only_where_documented(smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    differing = {t for t, _ in mismatches(theirs, DATA["smollm2"])}
    assert differing <= KNOWN_TRANSFORMERS_DIFFERENCES, differing - KNOWN_TRANSFORMERS_DIFFERENCES


def test_written_files_load_with_auto_tokenizer(metadata: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_tokenizer_files(metadata, tmp_path / "tok")
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    write_tokenizer_files(metadata, tmp_path / "again")
    for name in names:  # deterministic
        assert (tmp_path / "tok" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert mismatches(tok, DATA["smollm2"]) == []
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.chat_template == metadata["tokenizer.chat_template"]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_gguf_tokenizers_equal_their_source_tokenizers() -> None:
    """The tiny GGUFs carry the tiny checkpoints' byte-level BPEs: rebuilt, they give the source's ids
    (BOS included for the llama style, whose tokenizer adds one)."""
    from transformers import AutoTokenizer

    from meshinfer.testing.checkpoints import tiny_checkpoint
    from meshinfer.testing.gguf_files import tiny_gguf

    for family in ("llama", "qwen2"):
        ours = build_tokenizer(GgufFile(tiny_gguf(family)).metadata)
        source = AutoTokenizer.from_pretrained(str(tiny_checkpoint(family)))
        for text in TEXTS:
            assert ours.encode(text) == source.encode(text), (family, text)


def test_unsupported_or_broken_vocabularies_are_one_line_errors(metadata: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match=r"pre-tokenizer 'tekken'; supported: .*smollm"):
        build_tokenizer({**metadata, "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'bert'"):
        build_tokenizer({**metadata, "tokenizer.ggml.model": "bert"})
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[5] = tokens[6]
    with pytest.raises(CheckpointError, match="twice"):
        build_tokenizer({**metadata, "tokenizer.ggml.tokens": tokens})
    with pytest.raises(CheckpointError, match="no tokenizer"):
        build_tokenizer({"general.architecture": "llama"})
    with pytest.raises(CheckpointError, match="Token `c` out of vocabulary"):
        build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                         "tokenizer.ggml.merges": ["a c"]})
