"""A client process that opens a session, runs one step, then waits to be killed mid-session.

Run as ``python tests/server/vanishing_client.py JSON`` where JSON holds ``initial_peers``,
``peer_id``, ``maddrs``, ``model_id``, ``blocks`` and ``max_length``. It prints one JSON line
``{"session_id", "pid"}`` once its first step came back, then sleeps until killed (the test SIGKILLs
it, so the server sees the client vanish without a ``Close``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import torch

from meshinfer.config import P2PConfig
from meshinfer.p2p import SESSION_PROTOCOL, PeerNode
from meshinfer.p2p.node import NodeSettings
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Open, Opened, Step, StepResult
from meshinfer.wire.tensor import encode_tensor


async def main(spec: dict) -> None:
    node = await PeerNode.start(P2PConfig(initial_peers=tuple(spec["initial_peers"])), NodeSettings(client_mode=True))
    stream = await node.open_stream(spec["peer_id"], SESSION_PROTOCOL, maddrs=spec["maddrs"])
    sid = uuid.uuid4().hex
    reply = await stream.request(Open(session_id=sid, model=spec["model_id"], span=BlockRange.parse(spec["blocks"]),
                                      max_length=spec["max_length"], dtype="float32"))
    assert isinstance(reply, Opened), reply
    hidden = torch.randn(4, spec.get("hidden_size", 64))
    reply = await stream.request(Step(session_id=sid, step_id=0, position=0, hidden=encode_tensor(hidden)))
    assert isinstance(reply, StepResult), reply
    print(json.dumps({"session_id": sid, "pid": os.getpid()}), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
