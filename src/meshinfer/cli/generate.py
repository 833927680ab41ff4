"""``meshinfer generate``: placeholder until its issue lands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("generate", help="(not built yet)").set_defaults(func=lambda args: 1)
