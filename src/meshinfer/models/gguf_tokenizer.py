"""A Hugging Face fast tokenizer rebuilt from GGUF metadata, tokenizing exactly as llama.cpp does.

Contract: ``build_tokenizer(metadata)`` takes a GGUF's key/values (``tokenizer.ggml.*``, ``tokenizer.chat_template``;
as ``GgufFile.metadata`` or ``gguf-metadata.json`` hold them) and builds, with the ``tokenizers`` library, a
``transformers.PreTrainedTokenizerFast`` whose ids equal llama.cpp's (``llama-vocab.cpp``) for the same file:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE over the file's tokens and merges (``ignore_merges`` where
  llama.cpp sets it), split first by the regexes llama.cpp uses for ``tokenizer.ggml.pre`` (``PRE_TOKENIZERS``:
  default, gpt-2 and its aliases, smollm/starcoder, llama-bpe/llama3, qwen2, dbrx...; others are an
  ``UnsupportedModelError`` naming the supported ones), each a ``Split(..., "isolated")`` as llama.cpp keeps
  the unmatched text between matches as pieces of its own;
* ``"llama"`` (SentencePiece BPE, Llama-2/Mistral files): merges ordered by the scores of the merged tokens,
  byte fallback to ``<0xXX>`` tokens, a space prefixed to every text piece (``add_space_prefix``) and spaces
  written as U+2581, as llama.cpp's SPM tokenizer does;
* tokens of type control (3) and unknown (2) are special added tokens, user-defined (4) plain added tokens,
  matched whole in the raw text; tokens llama.cpp promotes to control by their text (``<|im_end|>``...)
  are promoted here too;
* bos/eos/unk/pad from their ids, BOS/EOS added as llama.cpp adds them (``tokenizer.ggml.add_bos_token``, with
  llama.cpp's defaults), the chat template from ``tokenizer.chat_template``.

``write_tokenizer_files(metadata, outdir)`` writes tokenizer.json, tokenizer_config.json and
special_tokens_map.json, deterministically, loadable by ``AutoTokenizer``. Malformed vocabularies are
``CheckpointError``s. Imports ``tokenizers`` and ``transformers`` (for the tokenizer class only); no files
besides ``outdir``, no torch, no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshinfer.errors import CheckpointError, MeshinferError, UnsupportedModelError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


def _group(names: str, regexes: tuple[str, ...], ignore_merges: bool = False,
           add_bos: bool = False) -> dict[str, tuple[tuple[str, ...], bool, bool]]:
    return {name: (regexes, ignore_merges, add_bos) for name in names.split()}


PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    # tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges, add_bos default), as llama-vocab.cpp has them
    **_group("default", _DEFAULT),
    **_group("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en "
             "jina-v2-code roberta-bpe mpt olmo trillion granite-docling exaone4", (_GPT2,)),
    **_group("smollm starcoder refact command-r codeshell exaone minerva-7b mellum2", (r"\p{N}", _GPT2)),
    **_group("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", (_LLAMA3,),
             ignore_merges=True, add_bos=True),
    **_group("dbrx smaug-bpe", (_LLAMA3,)),
    **_group("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", (_QWEN2,)),
}
"""The ``tokenizer.ggml.pre`` values supported for ``gpt2`` vocabularies."""

_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
# llama.cpp promotes these to control tokens by their text (end-of-generation markers), whatever their type...
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})
# ...and these when the file names no token for their role (tokenizer.ggml.<role>_token_id)...
_ROLE_TEXTS: dict[str, frozenset[str]] = {
    "eot": frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                      "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"}),
    "eom": frozenset({"<|eom_id|>"}),
    "fim_pre": frozenset({"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                          "<|code_prefix|>", "<|prefix|>"}),
    "fim_suf": frozenset({"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                          "<|code_suffix|>", "<|suffix|>"}),
    "fim_mid": frozenset({"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                          "<|code_middle|>", "<|middle|>"}),
    "fim_pad": frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}),
    "fim_rep": frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}),
    "fim_sep": frozenset({"<|file_sep|>"}),
}
# ...and demotes these to user-defined.
_USER_TEXTS = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})


def _get(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    return metadata.get(f"tokenizer.ggml.{key}", default)


def _token_types(metadata: dict[str, Any], tokens: list[str]) -> list[int]:
    """Each token's type after llama.cpp's promotions by text."""
    types = list(_get(metadata, "token_type") or [1] * len(tokens))
    if len(types) < len(tokens):
        raise CheckpointError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    promote = set(_EOG_TEXTS)
    for role, texts in _ROLE_TEXTS.items():
        if _get(metadata, f"{role}_token_id") is None:
            promote |= texts
    for i, text in enumerate(tokens):
        if text in _USER_TEXTS:
            types[i] = _USER_DEFINED
        elif text in promote and types[i] not in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            types[i] = _CONTROL
    return types[: len(tokens)]


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if not isinstance(text, str):
            raise CheckpointError("tokenizer.ggml.tokens must be a list of strings")
        if text in vocab:
            raise CheckpointError(f"tokenizer.ggml.tokens holds {text[:40]!r} twice (ids {vocab[text]} and {i})")
        vocab[text] = i
    return vocab


def _bpe_model(metadata: dict[str, Any], vocab: dict[str, int]) -> tuple[Any, Any, Any, Any, bool]:
    """(model, normalizer, pre_tokenizer, decoder, add_bos default) of a byte-level BPE vocabulary."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    pre = _get(metadata, "pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer '{pre}'; supported: "
                                    f"{', '.join(sorted(PRE_TOKENIZERS))}")
    regexes, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    merges = []
    for line in _get(metadata, "merges") or []:
        pos = line.find(" ", 1)  # as llama.cpp splits them: a merge's first part may itself start with a space
        if pos < 0:
            raise CheckpointError(f"tokenizer.ggml.merges holds {line[:40]!r}, which is not 'left right'")
        merges.append((line[:pos], line[pos + 1 :]))
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, byte_fallback=False)
    pre_tok = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    return model, None, pre_tok, decoders.ByteLevel(), add_bos


def _spm_model(metadata: dict[str, Any], vocab: dict[str, int], tokens: list[str],
               types: list[int]) -> tuple[Any, Any, Any, Any, bool]:
    """(model, normalizer, pre_tokenizer, decoder, add_bos default) of a SentencePiece-style vocabulary."""
    from tokenizers import decoders, models, normalizers

    if _get(metadata, "remove_extra_whitespaces", False):
        raise UnsupportedModelError("GGUF tokenizer option remove_extra_whitespaces is not supported")
    scores = list(_get(metadata, "scores") or [0.0] * len(tokens))
    if len(scores) < len(tokens):
        raise CheckpointError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    # llama.cpp merges the adjacent pair whose concatenation is the best-scored token (leftmost on ties):
    # as BPE merges, every split of every mergeable token, ordered by that token's score.
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for text, i in vocab.items():
        if len(text) < 2:  # llama.cpp merges into any token, whatever its type
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, cut, (left, right)))
    ranked.sort()
    unk = _get(metadata, "unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=[m for *_, m in ranked], unk_token=unk_token, fuse_unk=True,
                       byte_fallback=any(t == _BYTE for t in types))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    if _get(metadata, "add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                + ([decoders.Strip(" ", 1, 0)] if _get(metadata, "add_space_prefix", True) else []))
    return model, normalizers.Sequence(steps), None, decoder, True


def _backend(metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` and the tokenizer_config.json fields (library errors become one line)."""
    try:
        return _build(metadata)
    except MeshinferError:
        raise
    except Exception as err:  # the tokenizers library raises plain Exceptions on inconsistent vocabularies
        brief = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"cannot build the tokenizer from the GGUF metadata: {brief}") from None


def _build(metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken, Tokenizer, processors

    kind = _get(metadata, "model")
    tokens = _get(metadata, "tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError("the GGUF has no tokenizer (tokenizer.ggml.tokens)")
    vocab = _vocab(tokens)
    types = _token_types(metadata, tokens)
    if kind == "gpt2":
        model, normalizer, pre_tok, decoder, add_bos = _bpe_model(metadata, vocab)
    elif kind == "llama":
        model, normalizer, pre_tok, decoder, add_bos = _spm_model(metadata, vocab, tokens, types)
    else:
        raise UnsupportedModelError(f"unsupported GGUF tokenizer model '{kind}'; supported: gpt2 (byte-level BPE), "
                                    f"llama (SentencePiece BPE)")
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tok is not None:
        tok.pre_tokenizer = pre_tok
    tok.decoder = decoder
    tok.add_tokens([AddedToken(tokens[i], special=t != _USER_DEFINED, normalized=False)
                    for i, t in enumerate(types) if t in (_UNKNOWN, _CONTROL, _USER_DEFINED)])
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = _get(metadata, key)
        if isinstance(i, int) and 0 <= i < len(tokens):
            special[name] = tokens[i]
    add_bos = bool(_get(metadata, "add_bos_token", add_bos))
    add_eos = bool(_get(metadata, "add_eos_token", False))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and name not in special:
            raise CheckpointError(f"the GGUF tokenizer adds a {name} but names none")
    if add_bos or add_eos:
        bos = [special["bos_token"]] if add_bos else []
        eos = [special["eos_token"]] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]), pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)])
    added = {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t != _USER_DEFINED}
             for i, t in enumerate(types) if t in (_UNKNOWN, _CONTROL, _USER_DEFINED)}
    config: dict[str, Any] = {
        "added_tokens_decoder": added, "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata.get(f"{metadata.get('general.architecture')}.context_length", 1_000_000_000),
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
    }
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, config


def build_tokenizer(metadata: dict[str, Any]) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` equivalent to llama.cpp's tokenizer for this metadata."""
    from transformers import PreTrainedTokenizerFast

    tok, config = _backend(metadata)
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template")
    kwargs = {k: config[k] for k in names if k in config}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


def write_tokenizer_files(metadata: dict[str, Any], outdir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for this metadata into ``outdir``."""
    tok, config = _backend(metadata)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    doc = json.loads(tok.to_str())
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
