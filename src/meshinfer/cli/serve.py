"""``meshinfer serve``: run a block server for one span of one model.

Contract: parses ``ServerConfig`` and ``P2PConfig`` flags (bad values, e.g. ``--blocks`` together
with ``--num-blocks``: one-line ``ConfigError``, exit 2, before any network or torch import), resolves
``--model demo`` to the built-in demo checkpoint, then runs ``server.run.serve_until_signal``.
Without ``--blocks`` the server places itself where the swarm is weakest and moves when that helps;
the ready line's ``blocks`` is where it started. Once the server is announced online it
prints, in one flushed write on stdout, its multiaddrs one per line and then the ready line::

    ready {"peer_id": ..., "maddrs": [...], "model_id": ..., "blocks": "0:4", "throughput": ..., ...}

(``meshinfer.readyline.parse_ready_line`` reads it back), so launchers and tests can wait for it. Logs go to stderr.
SIGINT/SIGTERM stop it cleanly after draining (exit 0; exit 1 if it could no longer serve);
``--stop-on-stdin-eof`` also stops it when its parent closes its stdin (for launchers: no orphaned
servers). Once stopped it exits without the slow interpreter teardown when nothing it started is
left (``_exit_now_if_clean``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from meshinfer.cli.announce import announce_ready
from meshinfer.cli.args import add_command, add_stop_on_stdin_eof
from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.config import P2PConfig


def register(sub: argparse._SubParsersAction) -> None:
    from meshinfer.server.config import ServerConfig

    parser = add_command(
        sub, "serve", run, help="serve a span of a model's blocks to the swarm",
        description="Serve blocks START:END of a model to the swarm: join through --initial-peers, announce "
                    "the span in the DHT, and run inference sessions for clients. --blocks 0:N is a full node; "
                    "without --blocks the server chooses its blocks (--num-blocks of them, or as many as memory "
                    "allows) where the swarm is weakest, and moves when that speeds the swarm up. "
                    "Stop it with Ctrl-C: it drains open sessions for up to --drain-timeout seconds (Ctrl-C "
                    "again to end them now).",
    )
    add_config_flags(parser, ServerConfig)
    add_config_flags(parser, P2PConfig)
    add_stop_on_stdin_eof(parser)


def _print_ready(server: Any) -> None:
    info = server.info()
    announce_ready(info, f"serving {info['model_name']} blocks {info['blocks']} as {info['peer_id']}; "
                         f"join clients with --initial-peers {info['maddrs'][0] if info['maddrs'] else '?'}",
                   prefix="".join(f"{m}\n" for m in info["maddrs"]))


def run(args: argparse.Namespace) -> int:
    from meshinfer.cli.generate import resolve_model_dir
    from meshinfer.server.config import ServerConfig

    config = config_from_args(ServerConfig, args)
    p2p = config_from_args(P2PConfig, args)
    assert config.model is not None  # ServerConfig refuses a config without one
    model_dir = resolve_model_dir(config.model)
    from meshinfer.server.run import serve_until_signal

    code = asyncio.run(serve_until_signal(config, p2p, model_dir=model_dir, on_ready=_print_ready,
                                          stop_on_stdin_eof=args.stop_on_stdin_eof))
    _exit_now_if_clean(code)
    return code


def _exit_now_if_clean(code: int) -> None:
    """Exit at once once the server has stopped everything it started: interpreter teardown with torch
    loaded takes about a second (more on a busy machine), which launchers stopping several servers feel.
    Only when no child process and no other non-daemon thread is left; otherwise return normally."""
    import logging
    import multiprocessing
    import os
    import threading

    if multiprocessing.active_children():
        return
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
