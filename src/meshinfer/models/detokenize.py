"""Tokenizer-side text logic shared by every front end: incremental detokenisation and end-of-turn ids.

Contract: pure functions and classes over a tokenizer object (anything with ``decode``, ``get_vocab`` and
``eos_token_id`` like a ``transformers`` tokenizer) or over a plain ``decode(ids) -> str`` callable. Imports
neither torch nor any network code, so the CLI (``generate``, ``chat``) and the OpenAI-compatible gateway
stream text the same way and their tests run in milliseconds. ``IncrementalDetokenizer`` never emits half
a character and its deltas concatenate to ``decode(all ids)``; ``text_decoder`` decodes with special tokens
skipped (but those in ``keep``: a tool-call parser's markers, by id) and no space clean-up; ``special_token_ids``
says which of some token texts are special tokens (it reads the whole vocabulary: once per model, not per
request); ``chat_stop_ids`` is what ends a chat reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|endoftext|>",
)
"""Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma...)."""


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without ever emitting half a character.

    Decodes a small window (``prefix_offset:``) against its already-printed part
    (``prefix_offset:read_offset``) so that tokenizers which drop a leading space when decoding a
    suffix still print it, and holds text back while it ends in U+FFFD (an incomplete UTF-8 byte
    sequence, typical of byte-level BPE). The deltas concatenate to ``decode(all ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of a generation (invalid bytes become U+FFFD)."""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(prefix):]


def special_token_ids(tokenizer: Any, tokens: Iterable[str]) -> dict[int, str]:
    """Id -> text of those of ``tokens`` that ``tokenizer`` has as special tokens (skipped when decoding)."""
    vocab = tokenizer.get_vocab()
    out: dict[int, str] = {}
    for token in tokens:
        tid = vocab.get(token)
        if tid is not None and str(tokenizer.decode([tid], skip_special_tokens=True)) == "":
            out[int(tid)] = token
    return out


def text_decoder(tokenizer: Any, keep: Mapping[int, str] | None = None) -> Callable[[list[int]], str]:
    """``ids -> text`` with special tokens skipped and no space clean-up (exact concatenation); the special tokens
    in ``keep`` (id -> text, from ``special_token_ids``) are spelled out (Mistral's ``[TOOL_CALLS]`` / ``[ARGS]``,
    Llama's ``<|python_tag|>``: the tool-call parser needs them, as vLLM's parsers have ``skip_special_tokens``
    off). Text between them is decoded on its own, so a kept token never merges with its neighbours."""
    kept = dict(keep or {})

    def plain(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    if not kept:
        return plain

    def decode(ids: list[int]) -> str:
        if kept.keys().isdisjoint(ids):
            return plain(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in kept:
                parts += [plain(run), kept[i]]
                run = []
            else:
                run.append(i)
        return "".join([*parts, plain(run)])

    return decode


def chat_stop_ids(tokenizer: Any, eos_token_ids: Iterable[int] = ()) -> frozenset[int]:
    """The ids that end a chat reply: ``eos_token_ids`` (the model's), the tokenizer's eos and the known
    end-of-turn tokens of its vocabulary (``END_OF_TURN_TOKENS``)."""
    ids = {int(i) for i in eos_token_ids}
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)
