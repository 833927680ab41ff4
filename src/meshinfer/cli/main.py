"""The ``meshinfer`` command: parse flags, dispatch to a subcommand, turn errors into one line.

Contract: each subcommand lives in its own module under ``meshinfer.cli`` exposing
``register(subparsers)``; it adds its parser and sets ``func(args) -> int``. Modules must not import
torch or the network at import time (``meshinfer --help`` stays instant); they do so inside ``func``.
A ``MeshinferError`` becomes ``error: <message>`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from meshinfer import __version__
from meshinfer.errors import MeshinferError

# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "meshinfer.cli.demo",
    "meshinfer.cli.serve",
    "meshinfer.cli.generate",
    "meshinfer.cli.chat",
    "meshinfer.cli.api",
    "meshinfer.cli.dht",
    "meshinfer.cli.swarmkey",
    "meshinfer.cli.swarm",
    "meshinfer.cli.credits",
    "meshinfer.cli.doctor",
    "meshinfer.cli.dashboard",
    "meshinfer.cli.models",
    "meshinfer.cli.manifest",
    "meshinfer.cli.seed",
    "meshinfer.cli.fetch",
    "meshinfer.cli.convert",
    "meshinfer.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshinfer",
        description="Peer-to-peer LLM inference: serve and run open models across a swarm of machines.",
    )
    parser.add_argument("--version", action="version", version=f"meshinfer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from meshinfer.cli.common import setup_logging

    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except MeshinferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
