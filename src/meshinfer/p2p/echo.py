"""An echo peer: the smallest real server of the session protocol, for benchmarks and tests.

Contract: ``echo_handler`` answers ``Ping`` with ``Pong`` (same payload), ``Open`` with ``Opened``,
``Step`` with ``StepResult`` carrying the same hidden state (decoded and re-encoded, so the tensor
codec and its limits run for real) and ends the stream on ``Close``. ``python -m meshinfer.p2p.echo``
runs it as a process: it prints one JSON line ``{"peer_id", "maddrs", "pid", "daemon_pid"}`` on
stdout, then serves until SIGTERM/SIGINT or until its stdin closes (so it never outlives a parent
that holds the pipe). Not a model server: no model, no KV cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from meshinfer.config import P2PConfig
from meshinfer.errors import MeshinferError
from meshinfer.p2p.node import NodeSettings, PeerNode
from meshinfer.p2p.runner import wait_for_exit_signal
from meshinfer.p2p.stream import MessageStream, StreamSettings
from meshinfer.wire.messages import Close, Open, Opened, Ping, Pong, Step, StepResult
from meshinfer.wire.tensor import decode_tensor, encode_tensor

ECHO_PROTOCOL = "/meshinfer/echo/1"


async def echo_handler(stream: MessageStream) -> None:
    async for msg in stream:
        if isinstance(msg, Ping):
            await stream.send(Pong(seq=msg.seq, payload=msg.payload))
        elif isinstance(msg, Open):
            await stream.send(Opened(session_id=msg.session_id, span=msg.span, max_length=msg.max_length))
        elif isinstance(msg, Step):
            hidden = decode_tensor(msg.hidden, stream.settings.limits)
            await stream.send(StepResult(session_id=msg.session_id, step_id=msg.step_id,
                                         hidden=encode_tensor(hidden)))
        elif isinstance(msg, Close):
            return


async def _main(args: argparse.Namespace) -> None:
    config = P2PConfig(host=args.host, port=args.port, identity=args.identity,
                       initial_peers=tuple(args.initial_peers))
    settings = NodeSettings(stream=StreamSettings(read_timeout=args.read_timeout, idle_timeout=args.idle_timeout))
    node = await PeerNode.start(config, settings)
    try:
        await node.handle(ECHO_PROTOCOL, echo_handler)
        print(json.dumps({"peer_id": node.peer_id, "maddrs": node.maddrs,
                          "direct_addresses": node.direct_addresses, "pid": os.getpid(),
                          "daemon_pid": node.daemon_pid}), flush=True)
        await wait_for_exit_signal()
    finally:
        await node.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshinfer.p2p.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--identity", default=None)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds to wait for the rest of a message once it started")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="seconds a stream may stay silent between messages")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except MeshinferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
