"""Grammar-constrained decoding: compiles a ``GrammarSpec`` (JSON object, JSON schema, Lark) into a
``ConstraintFactory`` whose constraints (``models.constraint.TokenConstraint``) allow only the tokens that keep
the output inside the grammar.

Contract: one ``GrammarCompiler`` per model (tokenizer). It adapts the model's Hugging Face fast tokenizer (a
checkpoint directory's, or the one ``models.gguf_tokenizer`` rebuilds from a GGUF: both expose the Rust
``backend_tokenizer``) to llguidance (``LLTokenizer``, built on first compile: ~0.3 s for a 49k vocabulary) and
compiles specs with it into ``LLMatcher``s, kept in a bounded LRU cache (``cache_size`` specs; a compiled grammar
is immutable: each generation gets a ``deep_copy`` of it). A grammar or schema llguidance rejects is a one-line
``ConfigError`` naming ``spec.name``.

Each constraint belongs to one generation and follows ``generated`` (the tokens produced so far): it extends
the matcher by the new tokens, and when ``generated`` is shorter or differs in its tail (rejected drafts, audit
rollback, failover replay) it rolls the matcher back to the common prefix (or rebuilds and replays when
llguidance cannot roll back that far). The mask is bool [vocab_size] over the logits' width: ids the tokenizer
does not know (padding rows past its size) are never allowed; once the grammar is complete only the eos token(s)
are, so the generation ends there. The mask costs tens of microseconds for JSON (llguidance releases the GIL),
far below a forward trip, so it is computed when asked, with no look-ahead thread.

JSON whitespace, compact-ish: between tokens at most one space, or one newline and up to ``_WS_INDENT`` spaces or
tabs of indentation (pretty-printed JSON fits; llguidance's default, any run of whitespace, lets a weak model
pad with whitespace until ``max_tokens``: a random-weight tiny model then never closes its object).

Knows llguidance, numpy and torch (the mask's type), imported when a grammar is compiled or used, so that
``GrammarSpec`` is cheap to import (``gateway.structured``); no network, no HTTP, no gateway types.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from copy import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from meshinfer.errors import ConfigError, UsageError
from meshinfer.models.constraint import ConstraintFactory

if TYPE_CHECKING:
    import torch

__all__ = ["JSON_OBJECT_SCHEMA", "GrammarCompiler", "GrammarConstraint", "GrammarSpec"]

_WS_INDENT = 24
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
"""What ``kind="json_object"`` compiles: any JSON object."""
_JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": r"\x20|\n[\x20\t]{0," + f"{_WS_INDENT}" + "}"}


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. ``source``: "" for json_object, the schema as JSON text for json_schema, an
    llguidance Lark grammar for lark (which may embed schemas with ``%json{...}``)."""

    kind: Literal["json_object", "json_schema", "lark"]
    source: str = ""
    name: str = ""
    """Who asked, for error messages ("response_format", "tool_choice", ...)."""


def _ll_tokenizer(tokenizer: Any, eos_token_ids: Collection[int]) -> Any:
    """An ``llguidance.LLTokenizer`` over a transformers fast tokenizer (its Rust backend serialised)."""
    import llguidance

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"structured output needs a fast (tokenizers-backed) tokenizer, "
                          f"not {type(tokenizer).__name__}")
    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    eos = [int(t) for t in eos_token_ids]
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = [int(tokenizer.eos_token_id)]
    if not eos:
        raise ConfigError("structured output needs the model's eos token id (the tokenizer has none)")
    return llguidance.LLTokenizer(backend.to_str(), eos_token=eos)


def _grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar (JSON text) for ``spec``; ConfigError for a schema that is not JSON."""
    from llguidance import LLMatcher

    label = spec.name or "grammar"
    if spec.kind == "lark":
        if not spec.source.strip():
            raise ConfigError(f"{label}: the Lark grammar is empty")
        return LLMatcher.grammar_from_lark(spec.source)
    if spec.kind == "json_object":
        schema: Any = JSON_OBJECT_SCHEMA
    elif spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except ValueError as err:
            raise ConfigError(f"{label}: the schema is not valid JSON ({err})") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError(f"{label}: a JSON schema is an object (or true/false), got {type(schema).__name__}")
    else:
        raise UsageError(f"unknown grammar kind {spec.kind!r}")
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)  # pyright: ignore[reportArgumentType]
    except ValueError as err:
        raise ConfigError(f"{label}: {_one_line(str(err))}") from None


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class GrammarConstraint:
    """One generation's grammar state (a ``TokenConstraint``): follows ``generated``, answers the next mask."""

    def __init__(self, template: Any, vocab_size: int, eos: torch.Tensor, label: str) -> None:
        self._template = template
        self._matcher: Any = template.deep_copy()
        self._consumed: list[int] = []
        self._vocab_size = vocab_size
        self._eos = eos  # bool [vocab_size]: only the eos token(s)
        self._label = label

    def _sync(self, generated: Sequence[int]) -> None:
        consumed = self._consumed
        common = len(consumed)
        if len(generated) < common or list(generated[:common]) != consumed:  # the usual case compares in C
            common, limit = 0, min(len(consumed), len(generated))
            while common < limit and consumed[common] == generated[common]:
                common += 1
        if common < len(consumed):
            back = len(consumed) - common
            if self._matcher.is_error() or not self._matcher.rollback(back):
                self._matcher = self._template.deep_copy()  # cannot roll back: rebuild and replay
                common = 0
            del consumed[common:]
        new = [int(t) for t in generated[common:]]
        if new:
            if not self._matcher.consume_tokens(new):
                err = _one_line(self._matcher.get_error())
                self._matcher = self._template.deep_copy()  # leave a usable state behind
                self._consumed = []
                raise ConfigError(f"{self._label}: the grammar rejects the generated tokens ({err})")
            consumed.extend(new)

    def allowed(self, generated: Sequence[int]) -> torch.Tensor:
        """A bool mask [vocab_size] of the tokens the grammar allows after ``generated``."""
        import numpy as np
        import torch

        self._sync(generated)
        matcher = self._matcher
        if matcher.is_stopped():
            return self._eos.clone()
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)  # [ceil(n / 32) * 4]
        if matcher.is_error():
            raise ConfigError(f"{self._label}: {_one_line(matcher.get_error())}")
        flags = np.unpackbits(bits, bitorder="little")  # [ceil(n / 32) * 32], 1: allowed
        mask = torch.zeros(self._vocab_size, dtype=torch.bool)  # padding rows stay False
        n = min(self._vocab_size, flags.shape[0])
        mask[:n] = torch.from_numpy(flags[:n].astype(np.bool_))
        return mask


class _Factory:
    """An immutable compiled grammar; each call makes one generation's ``GrammarConstraint``."""

    def __init__(self, template: Any, vocab_size: int, eos: torch.Tensor, label: str) -> None:
        self._template = template
        self._vocab_size = vocab_size
        self._eos = eos
        self._label = label

    def __call__(self) -> GrammarConstraint:
        return GrammarConstraint(self._template, self._vocab_size, self._eos, self._label)


class GrammarCompiler:
    """One per model (tokenizer): compiles ``GrammarSpec``s into ``ConstraintFactory``s, cached (LRU, bounded).
    Thread-safe: the gateway compiles on worker threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Collection[int], *,
                 cache_size: int = 64) -> None:
        if vocab_size <= 0:
            raise UsageError(f"vocab_size must be positive, got {vocab_size}")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = [int(t) for t in eos_token_ids]
        self._cache_size = max(1, cache_size)
        self._cache: OrderedDict[tuple[str, str], _Factory] = OrderedDict()
        self._lock = threading.Lock()
        self._ll: Any = None

    def ll_tokenizer(self) -> Any:
        """The llguidance tokenizer (built on first use)."""
        with self._lock:
            if self._ll is None:
                self._ll = _ll_tokenizer(self._tokenizer, self._eos_ids)
            return self._ll

    def _eos_mask(self, ll: Any) -> torch.Tensor:
        import torch

        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # [vocab_size]
        for tok in ll.eos_tokens:
            if 0 <= tok < self.vocab_size:
                mask[tok] = True
        return mask

    def compile(self, spec: GrammarSpec) -> ConstraintFactory:
        """The factory for ``spec`` (cached); ConfigError (one line) for a grammar or schema llguidance rejects."""
        key = (spec.kind, spec.source)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return _Factory(hit._template, hit._vocab_size, hit._eos, spec.name or "grammar")
        from llguidance import LLMatcher

        ll = self.ll_tokenizer()
        label = spec.name or "grammar"
        grammar = _grammar_text(spec)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error:
            raise ConfigError(f"{label}: {_one_line(messages[0] if messages else 'invalid grammar')}")
        template = LLMatcher(ll, grammar, log_level=0)
        if template.is_error():
            raise ConfigError(f"{label}: {_one_line(template.get_error())}")
        factory = _Factory(template, self.vocab_size, self._eos_mask(ll), label)
        with self._lock:
            self._cache[key] = factory
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return factory
