"""``meshinfer dht``: placeholder until its issue lands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("dht", help="(not built yet)").set_defaults(func=lambda args: 1)
