"""Registering a subcommand, and the flags several subcommands share.

Contract: ``add_command`` adds a runnable (sub)command's parser and sets the ``func(args) -> int`` that
``cli.main`` dispatches to, as ``main``'s contract requires of every ``register``. The shared flags keep
one spelling and one help text everywhere they appear. argparse only: no model, network or torch imports.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], *,
                help: str, description: str | None = None) -> argparse.ArgumentParser:
    """Add subcommand ``name`` (``help`` in the command list, ``description`` atop its ``--help``) run by
    ``func``; returns its parser for the caller's flags."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser


def add_stop_on_stdin_eof(parser: argparse.ArgumentParser) -> None:
    """``--stop-on-stdin-eof``: a process a launcher owns stops when its stdin closes (no orphans)."""
    parser.add_argument("--stop-on-stdin-eof", action="store_true",
                        help="also stop when stdin closes (for launchers that own this process)")
