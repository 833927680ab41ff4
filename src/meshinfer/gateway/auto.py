# pyright: strict
"""``meshinfer api --model auto``: which of the models a swarm announces a gateway opens, and under which names.

Contract: pure decisions (no I/O, no clock, no torch, no network). ``Announced`` is one model of the swarm's
directory (its id and the name on its card). ``served_name`` picks the name clients use: the card's name when it is
readable (a short printable word that is not itself a model id), else the model id's first ``ID_PREFIX`` hex
characters; made unique against the names taken (the readable name, then ``name-<id prefix>``, then the id prefix,
then the whole id). ``plan_auto`` splits a listing into the models to open now (not loaded yet, in a stable order:
by served name, then id) and those beyond the bound ``max_models`` (listed as not loaded; their turn comes when
room frees up, which it never does: models stay once opened). ``check_auto_flags`` validates the two flags. The
loader (``gateway.autoload``) does the I/O: reading the directory, opening models, adding them to the table.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from meshinfer.errors import ConfigError

AUTO = "auto"
"""The ``--model`` value that serves every model the swarm announces."""
ID_PREFIX = 12
"""Hex characters of a model id that name a model whose card has no readable name."""
MAX_NAME_CHARS = 64
"""The longest card name used as is."""
DEFAULT_AUTO_MAX_MODELS = 8
DEFAULT_AUTO_REFRESH_S = 60.0

_MODEL_ID = re.compile(r"[0-9a-f]{32,}")
_READABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")


@dataclass(frozen=True)
class Announced:
    """One model of the swarm's directory."""

    model_id: str
    name: str = ""
    """The name on its card ("" when none)."""


@dataclass(frozen=True)
class AutoPlan:
    """What one reading of the directory leads to."""

    open: list[Announced] = field(default_factory=lambda: [])
    """Models to open now, in this order."""
    over: list[Announced] = field(default_factory=lambda: [])
    """Models not loaded because of the bound."""


def readable_name(name: str, model_id: str) -> str:
    """``name`` when it reads as a name (see the module docstring), else ""."""
    text = name.strip()
    if len(text) > MAX_NAME_CHARS or not _READABLE.fullmatch(text) or _MODEL_ID.fullmatch(text.lower()):
        return ""
    return "" if text == model_id else text


def served_name(model: Announced, taken: Collection[str]) -> str:
    """The name clients use for ``model``, not in ``taken`` (see the module docstring)."""
    short = model.model_id[:ID_PREFIX]
    readable = readable_name(model.name, model.model_id)
    candidates = [readable, f"{readable}-{short}"] if readable else []
    for candidate in (*candidates, short, model.model_id):
        if candidate not in taken:
            return candidate
    n = 2
    while f"{model.model_id}-{n}" in taken:
        n += 1
    return f"{model.model_id}-{n}"


def plan_auto(listing: Sequence[Announced], loaded: Collection[str], opened: int, max_models: int) -> AutoPlan:
    """The models of ``listing`` to open (not in ``loaded``, at most ``max_models - opened`` of them) and those
    over the bound; a model id listed twice counts once (its first entry)."""
    seen: set[str] = set(loaded)
    new: list[Announced] = []
    for model in listing:
        if model.model_id not in seen:
            seen.add(model.model_id)
            new.append(model)
    new.sort(key=lambda m: (readable_name(m.name, m.model_id) or m.model_id[:ID_PREFIX], m.model_id))
    room = max(0, max_models - opened)
    return AutoPlan(new[:room], new[room:])


def check_auto_flags(max_models: int, refresh_s: float) -> None:
    """ConfigError naming the flag for a bad ``--auto-max-models`` or ``--auto-refresh-s``."""
    if max_models < 1:
        raise ConfigError(f"--auto-max-models must be >= 1, got {max_models}")
    if not refresh_s > 0:
        raise ConfigError(f"--auto-refresh-s must be > 0 seconds, got {refresh_s:g}")
