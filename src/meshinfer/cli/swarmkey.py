"""``meshinfer swarm-key``: make the key of a private swarm, sign an allow-list, show a key file's public id.

Contract: ``swarm-key new`` prints one line ``meshinfer-swarm-key/1 <base64 of 32 random bytes>`` (the format of
``meshinfer.p2p.membership``) on stdout, or with ``--out FILE`` writes it to a new file of mode 0600 (never
overwriting one). ``swarm-key allow --identity OWNER PEER_ID... --out FILE`` writes an allow-list signed by the
owner's identity (``meshinfer.p2p.allowlist``; for ``--swarm-allow FILE``). ``swarm-key id FILE`` checks a key file
and prints its public id (safe to share: the id every member's hellos and LAN adverts carry). Every command of that
swarm then takes ``--swarm-key FILE`` (or ``--swarm-allow FILE``). No network, no torch.
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
    allow = add_command(actions, "allow", run_allow,
                        help="sign an allow-list of peer ids with the owner's identity (for --swarm-allow FILE)")
    allow.add_argument("peers", nargs="+", metavar="PEER_ID", help="peer ids to admit (the owner always is)")
    allow.add_argument("--identity", required=True, metavar="PATH",
                       help="the owner's private key file (a peer identity, e.g. of its dht or server)")
    allow.add_argument("--out", required=True, metavar="FILE", help="where to write the allow-list")


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


def run_allow(args: argparse.Namespace) -> int:
    from meshinfer.p2p.allowlist import make_allow_line
    from meshinfer.p2p.identity import load_or_create_identity

    if not os.path.exists(args.identity):
        raise ConfigError(f"--identity {args.identity}: no such file (the owner's existing key)")
    owner = load_or_create_identity(args.identity)
    line = make_allow_line(owner, list(args.peers)) + "\n"
    with open(args.out, "w", encoding="ascii") as f:  # not secret: peers check it, nobody learns a key from it
        f.write(line)
    print(f"wrote an allow-list of {len(set(args.peers))} peers owned by {owner.peer_id} to {args.out}; give "
          f"--swarm-allow {args.out} to every command of the swarm", file=sys.stderr)
    return 0


def run_id(args: argparse.Namespace) -> int:
    from meshinfer.p2p.membership import load_swarm_key

    print(load_swarm_key(args.file).label)
    return 0
