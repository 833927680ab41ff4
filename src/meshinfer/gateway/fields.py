"""Readers of single fields of an OpenAI request body: type, range and size checked, a 400 naming the field else.

Contract: each reader takes the decoded body (a dict of plain JSON values) and a field name where it varies, and
returns the field's value in the engine's terms, its default when absent (``None`` counts as absent), or raises
``gateway.apierror.bad`` (400, ``param`` the field): ``number`` (a bounded float, bools refused), ``integer``,
``seed`` (int64), ``stop`` (at most ``MAX_STOP_STRINGS`` non-empty strings, deduplicated), ``logit_bias`` (token-id
strings to numbers in [-100, 100], at most ``config.MAX_LOGIT_BIAS``), ``stop_token_ids`` (at most
``MAX_STOP_TOKEN_IDS`` ids >= 0), ``flag`` (a boolean), ``logprob_count`` (0..``MAX_LOGPROBS``); ``text`` refuses a
string that is not valid Unicode (a lone surrogate). Pure: knows nothing of which endpoint asks, of requests as a
whole, of tokenizers or models (``gateway.requests`` composes these).
"""

from __future__ import annotations

from typing import Any

from meshinfer.config import MAX_LOGIT_BIAS
from meshinfer.gateway.apierror import bad

MAX_STOP_STRINGS = 4
"""The OpenAI API accepts up to 4 stop sequences."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""Accepted ``seed`` values (int64, as the OpenAI API documents; choice i samples with ``seed + i``)."""
MAX_STOP_TOKEN_IDS = 128
"""The most ``stop_token_ids`` one request may give (with the model's own, within ``wire.sealed.MAX_STOP_IDS``)."""
MAX_LOGPROBS = 20
"""The most alternatives per token a request may ask for (``models.sampling.MAX_TOP_LOGPROBS``)."""


def text(value: str, param: str) -> str:
    """``value``, or a 400 when it is not valid Unicode text (a lone surrogate from a ``\\ud800`` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad(f"{param} is not valid Unicode text: {err.reason} at character {err.start}", param=param) from None
    return value


def number(body: dict[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{name} must be a number, got {value!r}", param=name)
    if not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"{name} must be in {interval}, got {value!r}", param=name)
    return float(value)


def integer(body: dict[str, Any], name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise bad(f"{name} must be >= {low}, got {value}", param=name)
    return value


def seed(body: dict[str, Any]) -> int | None:
    seed = integer(body, "seed")
    low, high = SEED_RANGE
    if seed is not None and not low <= seed <= high:
        raise bad(f"seed must be a 64-bit signed integer (in {low}..{high}), got {seed}", param="seed")
    return seed


def stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} sequences, got {len(items)}", param="stop")
    if any(s == "" for s in items):
        raise bad("stop sequences must not be empty", param="stop")
    for s in items:
        text(s, "stop")
    return tuple(dict.fromkeys(items))


def logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object of token ids (as strings) to biases in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids (strings) to numbers", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(value)}", param="logit_bias")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        token = key.strip()
        if not (token.isascii() and token.isdigit()) or len(token) > 10:
            raise bad(f"logit_bias keys must be token ids (non-negative integers as strings), got {key[:32]!r}",
                      param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise bad(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}", param="logit_bias")
        pairs[int(token)] = float(bias)  # "7" and "07" name one token: the last one given wins
    return tuple(pairs.items())


def stop_token_ids(body: dict[str, Any]) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad("stop_token_ids must be a list of token ids (integers)", param="stop_token_ids")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise bad(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}", param="stop_token_ids")
    if any(t < 0 for t in value):
        raise bad(f"token ids must be >= 0, got {min(value)}", param="stop_token_ids")
    return tuple(dict.fromkeys(value))


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def logprob_count(body: dict[str, Any], name: str) -> int | None:
    count = integer(body, name, low=0)
    if count is not None and count > MAX_LOGPROBS:
        raise bad(f"{name} must be in 0..{MAX_LOGPROBS}, got {count}", param=name)
    return count
