"""``meshinfer swarm-key``: make the key of a private swarm, and show a key file's public id.

Contract: ``swarm-key new`` prints one line ``meshinfer-swarm-key/1 <base64 of 32 random bytes>`` (the format of
``meshinfer.p2p.membership``) on stdout, or with ``--out FILE`` writes it to a new file of mode 0600 (never
overwriting one). ``swarm-key id FILE`` checks a key file and prints its public id (safe to share: the id every
member's hellos and LAN adverts carry). Every command of that swarm then takes ``--swarm-key FILE``. No network,
no torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from meshinfer.cli.args import add_command
from meshinfer.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "swarm-key", help="make the key of a private swarm (pass it to every command with --swarm-key FILE)",
        description="A private swarm admits only peers holding its key file: give `--swarm-key FILE` to every "
                    "command of the swarm (dht, serve, generate, chat, api, swarm, fetch, seed, dashboard).",
    )
    actions = parser.add_subparsers(dest="swarm_key_action", metavar="ACTION")
    actions.required = True
    new = add_command(actions, "new", run_new, help="print a new swarm key (or write it with --out FILE)")
    new.add_argument("--out", default=None, metavar="FILE",
                     help="write the key to FILE, created with mode 0600 (refuses an existing file); default: stdout")
    show = add_command(actions, "id", run_id, help="check a key file and print its public id")
    show.add_argument("file", metavar="FILE", help="the swarm key file")


def run_new(args: argparse.Namespace) -> int:
    from meshinfer.p2p.membership import new_key_line

    line = new_key_line() + "\n"
    if args.out is None:
        sys.stdout.write(line)
        sys.stdout.flush()
        if sys.stdout.isatty():
            print("note: save it in a file only you can read (chmod 600) and pass --swarm-key FILE",
                  file=sys.stderr)
        return 0
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"--out {args.out}: the file exists (a swarm key is never overwritten; remove it "
                          "first)") from None
    except OSError as err:
        raise ConfigError(f"--out {args.out}: cannot create it ({err.strerror})") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(line)
    print(f"wrote a new swarm key to {args.out} (mode 0600); give --swarm-key {args.out} to every command of "
          "the swarm", file=sys.stderr)
    return 0


def run_id(args: argparse.Namespace) -> int:
    from meshinfer.p2p.membership import load_swarm_key

    print(load_swarm_key(args.file).label)
    return 0
