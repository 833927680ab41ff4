"""The ``ready`` line: how a meshinfer process tells whoever started it that it now serves.

Contract: once it serves, a process (``meshinfer serve``, ``meshinfer api``, ``meshinfer dashboard``)
prints ``ready {json}`` as one line on stdout (``ready_line``), the JSON an object of what its launcher
needs (peer id, addresses, URLs...); ``parse_ready_line`` reads one back: None for any other line, or for
a ``ready`` line whose JSON is not an object. A leaf: the stdlib only.
"""

from __future__ import annotations

import json
from typing import Any

READY_PREFIX = "ready "


def ready_line(info: dict[str, Any]) -> str:
    """``info`` as a ready line, newline included."""
    return READY_PREFIX + json.dumps(info) + "\n"


def parse_ready_line(line: str) -> dict[str, Any] | None:
    """The JSON object of a ready line, or None for any other line."""
    if not line.startswith(READY_PREFIX):
        return None
    try:
        info = json.loads(line[len(READY_PREFIX):])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None
