"""Regenerate tests/models/data/smollm2_llamacpp_token_ids.json: the token ids llama.cpp gives for a fixed set of
texts, the outside reference our GGUF tokenizer (meshinfer.models.gguf_tokenizer) must equal.

Dev tool, not run by the tests. Needs a llama.cpp build (`llama-tokenize`; e.g. from the vendored llama.cpp of the
llama-cpp-python sdist: `cmake -B build && cmake --build build --target llama-tokenize`) and the SmolLM2 GGUF
(`meshinfer models pull smollm2`). Usage:

    python scripts/llamacpp_token_ids.py LLAMA_TOKENIZE_BINARY SMOLLM2.gguf [OUT.json]

It writes, for every text: SmolLM2's ids (pre-tokenizer smollm); the ids of vocab-only GGUFs with SmolLM2's metadata
and only tokenizer.ggml.pre replaced (llama-bpe, qwen2, default, gpt-2); and of a small SentencePiece-style
vocabulary (tokenizer.ggml.model 'llama', trained here on the test corpus, stored in the JSON).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    " leading space",
    "   three leading spaces and trailing   ",
    "\n\nnewlines first\n",
    "Numbers: 1234567890, 3.14159, -42 and 1,000,000.",
    "runs of digits 00000000000000000 and 12 345 6789",
    "tabs\tand\t\tdouble tabs\t",
    "def add(a, b):\n\treturn a + b  # sum\n\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) {\n    x[i] = y[i] * 2;\n}",
    "Accents: café, naïve, résumé, Ångström, Straße, Zürich.",
    "Émile Zola écrivit «J'accuse…!» en 1898.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👍🏽 and 🇫🇷 flags, ❤️ hearts.",
    "Mixed: Привет мир! Γειά σου κόσμε! مرحبا بالعالم",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>tokens",
    "fake special <|im_start and <im_end|> and <|unknown|>",
    "I'm sure they'll say it's fine, we've done what we'd planned.",
    "UPPER CASE 'S 'LL 'VE shouting",
    "a  b   c    d     e      f",
    "costs  100 dollars,   2024 was   7   years after  2017",
    "<|im_start|>user  12345\t\tx",
    "line one\r\nline two\r\n\r\nline four",
    "   \n   \t  \n",
    "URL: https://example.com/path?q=1&r=two#frag and e-mail: a.b@c.de",
    "$100 + 20% = <b>~120</b> | ^caret^ `backticks`",
    "ends with spaces and newline  \n",
    "",
    "x",
    "ﬁ ligature, ½ fraction, ² superscript, Ⅻ roman numeral, ٣ arabic digit",
    "zero\u200bwidth, nbsp\u00a0here, em\u2003space, \u3000ideographic space",
]


def llama_ids(binary: str, model: str, text: str, bos: bool = False) -> list[int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
    cmd = [binary, "-m", model, "--ids", "--log-disable", "--no-escape", "-f", f.name] + ([] if bos else ["--no-bos"])
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())


def pre_variant(src: str, dst: str, pre: str) -> None:
    """A vocab-only GGUF copying ``src``'s metadata with tokenizer.ggml.pre replaced."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = pre if key == "tokenizer.ggml.pre" else field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, field.types[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def spm_vocab(dst: str) -> dict[str, list]:
    """A small SentencePiece-style BPE vocabulary (byte fallback) trained on the test corpus, as a vocab-only GGUF."""
    from gguf import GGUFWriter
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from meshinfer.testing.tokenizer import corpus_text

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False, special_tokens=[],
                                  limit_alphabet=120)
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    doc = json.loads(tok.to_str())
    vocab, merges = doc["model"]["vocab"], doc["model"]["merges"]
    merged: dict[str, int] = {}
    for rank, m in enumerate(merges):
        a, b = m if isinstance(m, list) else m.split(" ")
        merged.setdefault(a + b, rank)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for t in sorted(vocab, key=lambda t: vocab[t]):
        if t in tokens:
            continue
        tokens.append(t)
        types.append(1)
        scores.append(-float(merged[t]) if t in merged else -1000.0 - vocab[t])
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [4, 4]
    scores += [0.0, 0.0]
    w = GGUFWriter(dst, arch="llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tokens": tokens, "scores": scores, "token_type": types}


def main() -> None:
    binary, smol = sys.argv[1], sys.argv[2]
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("tests/models/data/smollm2_llamacpp_token_ids.json")
    work = Path(tempfile.mkdtemp(prefix="tokref-"))
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stderr.strip().splitlines()
    about = json.loads(out.read_text(encoding="utf-8"))["about"] if out.exists() else "scripts/llamacpp_token_ids.py"
    doc: dict[str, object] = {
        "about": about,
        "llama_cpp": {"version": " ".join(version)},
        "gguf": {"file": Path(smol).name, "sha256": hashlib.sha256(Path(smol).read_bytes()).hexdigest()},
        "texts": TEXTS,
        "smollm2": [llama_ids(binary, smol, t) for t in TEXTS],
        "pre_variants": {},
    }
    for pre in ("llama-bpe", "qwen2", "default", "gpt-2"):
        path = str(work / f"vocab-{pre}.gguf")
        pre_variant(smol, path, pre)
        doc["pre_variants"][pre] = [llama_ids(binary, path, t) for t in TEXTS]  # type: ignore[index]
    spm = str(work / "vocab-spm.gguf")
    doc["spm_vocab"] = spm_vocab(spm)
    doc["spm"] = [llama_ids(binary, spm, t) for t in TEXTS]
    doc["spm_with_bos"] = [llama_ids(binary, spm, t, bos=True) for t in TEXTS[:4]]
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
