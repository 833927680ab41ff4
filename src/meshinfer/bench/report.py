"""Print benchmark figures as a table and write them as JSON.

Contract: presentation only. A result is a flat-ish dict of JSON-serialisable figures; nested dicts
are flattened with dots for the table. The JSON file also records the machine and software versions.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshinfer import __version__


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def emit(kind: str, figures: dict[str, Any], out: str | None) -> Path:
    """Print ``figures`` as a table and write them (plus environment facts) to JSON; return the path."""
    flat: dict[str, Any] = {}
    _flatten("", figures, flat)
    table = Table(title=f"meshinfer bench {kind}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in flat.items():
        table.add_row(escape(k), escape(_fmt(v)))
    Console().print(table)

    path = Path(out) if out else Path("bench-results") / f"{kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": kind,
        "meshinfer_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "results": figures,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path
