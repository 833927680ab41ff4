"""``meshinfer bench transport``: placeholder until its issue lands."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = "(not built yet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {}
