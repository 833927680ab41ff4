"""A scriptable test peer: a real ``PeerNode`` process driven by JSON lines on stdin.

Run as ``python tests/p2p/peer_proc.py [--initial-peers M...] [--identity PATH]``. It prints one JSON
line ``{"peer_id", "maddrs", "pid", "daemon_pid"}`` when ready, serves the echo protocol, then answers
one JSON line per command line (``{"cmd": ...}``). It exits when stdin closes (its test died) or on
``{"cmd": "exit"}``. Commands announce fake-but-schema-valid records, read them back, and play an
attacker (``forge``) that writes records it must not be able to: under another peer's subkey, with a
tampered signature, with a garbled payload, as a plain value, or straight into its own storage.
The ``forge`` modes reach into hivemind internals on purpose: an attacker runs modified code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

from hivemind.dht.routing import DHTID

from meshinfer.config import P2PConfig
from meshinfer.errors import MeshinferError
from meshinfer.loopthread import LoopThread
from meshinfer.p2p import ECHO_PROTOCOL, PeerNode, echo_handler
from meshinfer.p2p.announce import Announcer, list_models, read_coverage
from meshinfer.p2p.signing import SignedRecordValidator, make_envelope
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Ping, Pong
from meshinfer.wire.records import ModelCard, ServerRecord, block_key, encode_record


def card_for(model_id: str, num_blocks: int) -> ModelCard:
    return ModelCard(model_id=model_id, name=f"test/{model_id}", family="llama", num_blocks=num_blocks,
                     hidden_size=64, dtype="float32")


def record_for(peer_id: str, model_id: str, span: list[int], **extra: Any) -> ServerRecord:
    fields: dict[str, Any] = dict(state="online", throughput=100.0, cache_tokens_left=4096, addresses=[],
                                  software_version="0.1.0", public_name=None)
    fields.update(extra)
    return ServerRecord(peer_id=peer_id, model_id=model_id, span=BlockRange(*span), **fields)


class TamperingValidator(SignedRecordValidator):
    """Signs like the real one, then flips one bit of the signature."""

    def sign_value(self, record):
        from meshinfer.p2p.signing import Envelope, _encoder, _envelope_decoder

        env = _envelope_decoder.decode(super().sign_value(record))
        sig = bytearray(env.signature)
        sig[len(sig) // 2] ^= 0x01
        return _encoder.encode(Envelope(env.payload, env.public_key, bytes(sig)))


class Peer:
    def __init__(self, node: PeerNode) -> None:
        self.node = node
        self.announcers: dict[str, Announcer] = {}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd["cmd"]
        node = self.node
        if kind == "announce":  # keep records alive with a refresher
            card = card_for(cmd["model_id"], cmd["num_blocks"])
            rec = record_for(node.peer_id, cmd["model_id"], cmd["span"], addresses=node.maddrs,
                             public_name=cmd.get("name"))
            ann = Announcer(node, card, rec, ttl=cmd.get("ttl", 30.0), refresh=cmd.get("refresh", 10.0))
            ok = await ann.start()
            self.announcers[cmd["model_id"]] = ann
            return {"ok": ok}
        if kind == "put_once":  # one write, no refresh: it expires after ttl
            card = card_for(cmd["model_id"], cmd["num_blocks"])
            rec = record_for(node.peer_id, cmd["model_id"], cmd["span"])
            ann = Announcer(node, card, rec, ttl=cmd["ttl"], refresh=cmd["ttl"] / 2)
            return {"ok": await ann.publish()}
        if kind == "stop_announce":
            ann = self.announcers.pop(cmd["model_id"])
            await ann.stop()
            return {"ok": True}
        if kind == "coverage":
            cov = await read_coverage(node, cmd["model_id"], cmd["num_blocks"], timeout=cmd.get("timeout", 5.0))
            return {"blocks": cov.blocks, "complete": cov.complete,
                    "servers": {p: {"span": [r.span.start, r.span.end], "public_name": r.public_name}
                                for p, r in cov.servers.items()}}
        if kind == "models":
            return {"models": [[m.card.model_id, m.announced_by] for m in await list_models(node)]}
        if kind == "forge":
            return {"stored": await self.forge(cmd)}
        if kind == "ping":
            stream = await node.open_stream(cmd["peer_id"], ECHO_PROTOCOL, maddrs=cmd.get("maddrs", []))
            async with stream:
                reply = await stream.request(Ping(seq=7, payload=b"x" * 100), timeout=10)
            return {"ok": isinstance(reply, Pong) and reply.seq == 7}
        raise ValueError(f"unknown command {kind!r}")

    async def forge(self, cmd: dict[str, Any]) -> bool:
        dht = self.node._dht
        mode, model_id, victim = cmd["mode"], cmd["model_id"], cmd.get("victim")
        key = block_key(model_id, 0)
        exp = time.time() + cmd.get("ttl", 30.0)
        if mode == "other_subkey":  # a record claiming to be the victim's, signed with our own key
            value = encode_record(record_for(victim, model_id, [0, 1], public_name="forged"))
            return bool(await dht.store(key, value, exp, subkey=victim))
        if mode == "bad_signature":
            value = encode_record(record_for(self.node.peer_id, model_id, [0, 1], public_name="forged"))
            real = dht.protocol.record_validator
            dht.protocol.record_validator = TamperingValidator(self.node.identity)
            try:
                return bool(await dht.store(key, value, exp, subkey=self.node.peer_id))
            finally:
                dht.protocol.record_validator = real
        if mode == "bad_payload":  # correctly signed, but not a meshinfer record
            return bool(await dht.store(key, b"\x93not-a-record", exp, subkey=self.node.peer_id))
        if mode == "plain_value":  # no subkey: would replace the whole dictionary of records
            value = encode_record(record_for(self.node.peer_id, model_id, [0, 1], public_name="forged"))
            return bool(await dht.store(key, value, exp))
        if mode == "inject_local":  # skip validation: put a forged record into our own storage
            from hivemind.dht.validation import DHTRecord

            ser = dht.protocol.serializer
            key_id = DHTID.generate(source=key)
            subkey_bytes = ser.dumps(victim)
            payload = ser.dumps(encode_record(record_for(victim, model_id, [0, 1], public_name="forged")))
            env = make_envelope(self.node.identity, DHTRecord(key_id.to_bytes(), subkey_bytes, payload, exp))
            return bool(dht.protocol.storage.store_subkey(key_id, victim, env, exp))
        raise ValueError(f"unknown forge mode {mode!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--identity", default=None)
    args = parser.parse_args()
    runner = LoopThread().start()
    try:
        node = runner.run(PeerNode.start(P2PConfig(identity=args.identity,
                                                   initial_peers=tuple(args.initial_peers))), 60)
    except MeshinferError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        runner.stop()
        return 2
    runner.run(node.handle(ECHO_PROTOCOL, echo_handler), 10)
    peer = Peer(node)
    print(json.dumps({"peer_id": node.peer_id, "maddrs": node.maddrs, "pid": os.getpid(),
                      "daemon_pid": node.daemon_pid}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        try:
            reply = runner.run(peer.handle(cmd), 60)
        except Exception as err:  # report to the test, keep serving
            reply = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        print(json.dumps(reply), flush=True)
    for ann in peer.announcers.values():
        runner.run(ann.stop(), 10)
    runner.run(node.close(), 20)
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
