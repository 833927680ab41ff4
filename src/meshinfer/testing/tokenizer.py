"""Byte-level BPE tokenizers for the test checkpoints, trained locally on the shipped corpus.

Contract: given a ``TokenizerRecipe`` (vocabulary size and special-token style of a model family),
``write_tokenizer(recipe, directory)`` trains a deterministic byte-level BPE with the ``tokenizers``
library on ``testing/data/corpus.txt`` and writes the files ``save_pretrained`` would write for a
``PreTrainedTokenizerFast``: ``tokenizer.json``, ``tokenizer_config.json`` (with a ChatML chat
template) and ``special_tokens_map.json``. When the corpus cannot fill the vocabulary, the BPE vocab
is padded with filler tokens made of printable ASCII so that every id in ``[0, vocab_size)`` decodes.
It knows nothing about model weights and never touches the network or ``transformers``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerRecipe:
    """What a family's tokenizer looks like: its special tokens, which of them play which role."""

    vocab_size: int
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    add_bos: bool
    chat_end: str = "<|im_end|>"

    def token_id(self, token: str | None) -> int | None:
        """Ids of special tokens are their positions in ``special_tokens`` (trained first)."""
        return None if token is None else self.special_tokens.index(token)

    def as_dict(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size, "special_tokens": list(self.special_tokens), "bos": self.bos,
            "eos": self.eos, "pad": self.pad, "add_bos": self.add_bos, "chat_end": self.chat_end,
        }


_LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def recipe_for(style: str, vocab_size: int) -> TokenizerRecipe:
    """The tokenizer recipe of a family style: "llama", "mistral" or "qwen"."""
    if style == "llama":
        return TokenizerRecipe(vocab_size, _LLAMA_SPECIALS, "<|begin_of_text|>", "<|end_of_text|>",
                               "<|pad|>", add_bos=True)
    if style == "mistral":
        return TokenizerRecipe(vocab_size, _MISTRAL_SPECIALS, "<s>", "</s>", "<pad>", add_bos=True)
    if style == "qwen":
        return TokenizerRecipe(vocab_size, _QWEN_SPECIALS, None, "<|endoftext|>", "<|endoftext|>",
                               add_bos=False)
    raise ValueError(f"unknown tokenizer style {style!r}")


def corpus_text() -> str:
    """The plain-English training text shipped with the package."""
    return resources.files("meshinfer.testing").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def corpus_sha256() -> str:
    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()


def _train(recipe: TokenizerRecipe) -> dict[str, Any]:
    """Train the BPE and return the tokenizer's JSON document (padded to ``vocab_size``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=2,
        special_tokens=list(recipe.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One "sentence" per line: the trainer's pair counts then do not depend on chunking.
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    if recipe.add_bos:
        assert recipe.bos is not None
        bos_id = recipe.token_id(recipe.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{recipe.bos} $A", pair=f"{recipe.bos} $A {recipe.bos} $B:1",
            special_tokens=[(recipe.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    doc: dict[str, Any] = json.loads(tok.to_str())
    vocab: dict[str, int] = doc["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in doc["added_tokens"]}
    if max(used) >= recipe.vocab_size:
        raise ValueError(f"trained vocabulary exceeds {recipe.vocab_size}")
    # Fill the holes with byte-level-safe filler tokens: never produced by encoding, decodable.
    for i in range(recipe.vocab_size):
        if i not in used:
            vocab[f"<filler_{i}>"] = i
    return doc


def unprintable_token_ids(doc: dict[str, Any]) -> list[int]:
    """Ids of the tokens (in tokenizer JSON ``doc``) that decode, alone, to a control character other
    than newline or tab, or to U+FFFD (a piece of a multi-byte character): checkpoints make them
    unlikely so that text generated by random weights stays printable."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(doc))
    bad = ({chr(c) for c in (*range(32), 127)} - {"\n", "\t"}) | {"\ufffd"}
    return [i for i in range(tok.get_vocab_size()) if bad & set(tok.decode([i], skip_special_tokens=False))]


def write_tokenizer(recipe: TokenizerRecipe, directory: Path) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``directory``;
    return the tokenizer JSON document."""
    doc = _train(recipe)
    (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n",
                                              encoding="utf-8")
    added = {
        str(recipe.token_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in recipe.special_tokens
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": recipe.bos,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": recipe.eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1_000_000,
        "pad_token": recipe.pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special_map: dict[str, str] = {"eos_token": recipe.eos, "pad_token": recipe.pad}
    if recipe.bos is not None:
        special_map["bos_token"] = recipe.bos
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n",
                                                       encoding="utf-8")
    return doc
