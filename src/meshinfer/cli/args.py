"""Registering a subcommand, and the flags several subcommands share.

Contract: ``add_command`` adds a runnable (sub)command's parser and sets the ``func(args) -> int`` that
``cli.main`` dispatches to, as ``main``'s contract requires of every ``register``. The shared flags keep
one spelling and one help text everywhere they appear; ``require_initial_peers`` one message for a missing
``--initial-peers``. argparse only: no model, network or torch imports.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from meshinfer.cli.common import require


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


def require_initial_peers(peers: Sequence[str]) -> None:
    """One-line ``ConfigError`` unless at least one ``--initial-peers`` multiaddr is given."""
    require(bool(peers), "--initial-peers is required: the multiaddr of any peer of the swarm")
