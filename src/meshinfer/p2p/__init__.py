"""The P2P layer: identity, libp2p transport, owner-signed DHT records and session streams.

Contract: the only package that imports the substrate (hivemind: its go ``p2pd`` and Kademlia DHT),
kept behind meshinfer's own interface so it can be replaced. Public API:

- ``PeerNode`` (``node``): start/join a swarm, serve and open ``MessageStream``s, put/get records;
- ``MessageStream``, ``StreamSettings``, ``StreamClosed`` (``stream``): typed messages over a stream;
- ``announce_server``/``Announcer``/``read_coverage``/``list_models``/``read_swarm`` (``announce``);
- ``Identity``/``load_or_create_identity`` (``identity``);
- ``echo_handler``/``ECHO_PROTOCOL`` (``echo``): a minimal real peer for tests and benchmarks.

The package itself imports nothing heavy: its public names load their submodule on first use; submodules that
import hivemind import ``_hivemind_logging`` first. Sync code
drives a ``PeerNode`` through ``meshinfer.loopthread.LoopThread`` (the loop the node is started and used on).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshinfer.p2p.announce import (
        Announcer,
        Coverage,
        ModelEntry,
        SwarmSnapshot,
        announce_server,
        announcement,
        list_models,
        read_coverage,
        read_swarm,
    )
    from meshinfer.p2p.echo import ECHO_PROTOCOL, echo_handler
    from meshinfer.p2p.identity import Identity, load_or_create_identity
    from meshinfer.p2p.node import FoundRecord, NodeSettings, PeerNode, Put
    from meshinfer.p2p.stream import MessageStream, StreamClosed, StreamHandler, StreamSettings

_LAZY = {
    **dict.fromkeys(("Announcer", "Coverage", "ModelEntry", "SwarmSnapshot", "announce_server", "announcement",
                     "list_models", "read_coverage", "read_swarm"), "announce"),
    **dict.fromkeys(("ECHO_PROTOCOL", "echo_handler"), "echo"),
    **dict.fromkeys(("Identity", "load_or_create_identity"), "identity"),
    **dict.fromkeys(("FoundRecord", "NodeSettings", "PeerNode", "Put"), "node"),
    **dict.fromkeys(("MessageStream", "StreamClosed", "StreamHandler", "StreamSettings"), "stream"),
}


def __getattr__(name: str) -> Any:
    """The public names load their submodule (and hivemind) on first use, so that importing a light submodule
    (``lanpeers``, ``discovery``, ``commit``) or ``SESSION_PROTOCOL`` does not start hivemind's import."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshinfer.p2p' has no attribute {name!r}")
    return getattr(importlib.import_module(f"meshinfer.p2p.{module}"), name)


SESSION_PROTOCOL = "/meshinfer/session/1"
"""The protocol id block servers serve inference sessions on."""

__all__ = [
    "ECHO_PROTOCOL", "SESSION_PROTOCOL", "Announcer", "Coverage", "FoundRecord", "Identity", "MessageStream",
    "ModelEntry", "NodeSettings", "PeerNode", "Put", "StreamClosed", "StreamHandler", "StreamSettings",
    "SwarmSnapshot", "announce_server", "announcement", "echo_handler", "list_models",
    "load_or_create_identity", "read_coverage", "read_swarm",
]
