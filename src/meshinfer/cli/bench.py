"""``meshinfer bench KIND``: benchmarks that print a table and write JSON figures.

Contract: each kind is a module ``meshinfer.bench.<kind>`` exposing ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> dict`` (the figures). Those modules import torch or the
network only inside ``run``. This module prints and writes the result via ``meshinfer.bench.report``.
"""

from __future__ import annotations

import argparse
import importlib

from meshinfer.cli.args import add_command

BENCH_KINDS: tuple[str, ...] = ("local", "transport", "swarm", "load", "chaos", "api", "fetch", "quant", "soak",
                               "gpu", "trust", "wan", "credits")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark; prints a table and writes JSON")
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND")
    kinds.required = True
    for kind in BENCH_KINDS:
        module = importlib.import_module(f"meshinfer.bench.{kind}")
        p = add_command(kinds, kind, _runner(kind), help=module.DESCRIPTION, description=module.DESCRIPTION)
        p.add_argument("--out", default=None, help="JSON output path (default: bench-results/<kind>.json)")
        module.add_arguments(p)


def _runner(kind: str):
    def run(args: argparse.Namespace) -> int:
        from meshinfer.bench.report import emit

        module = importlib.import_module(f"meshinfer.bench.{kind}")
        emit(kind, module.run(args), args.out)
        return 0

    return run
