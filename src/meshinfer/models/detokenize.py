"""Tokenizer-side text logic shared by every front end: incremental detokenisation and end-of-turn ids.

Contract: pure functions and classes over a tokenizer object (anything with ``decode``, ``get_vocab`` and
``eos_token_id`` like a ``transformers`` tokenizer) or over a plain ``decode(ids) -> str`` callable. Imports
neither torch nor any network code, so the CLI (``generate``, ``chat``) and the OpenAI-compatible gateway
stream text the same way and their tests run in milliseconds. ``IncrementalDetokenizer`` never emits half
a character and its deltas concatenate to ``decode(all ids)``; ``text_decoder`` decodes with special tokens
skipped and no space clean-up; ``chat_stop_ids`` is what ends a chat reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` with special tokens skipped and no space clean-up (exact concatenation)."""
    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

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
