"""Sealed requests to a full node (issue 22 part 2) with real processes: a bootstrap peer, a full node started with
``--sealed`` and a second server that relays (recording what it forwards with ``--sealed-relay-capture``).

Shown here: a sealed greedy (and seeded sampled) generation gives the local engine's tokens (which the unsealed
swarm gives too: ``tests/client/test_distributed.py``); so does one through the relaying peer, whose capture holds
neither the prompt's ids (as the wire would pack them: u32 or msgpack) nor its text nor the answer's; so does one
through the OpenAI gateway (official ``openai`` client) and ``meshinfer generate --sealed --sealed-relay auto``; a
tampered request is refused with a typed answer and the server keeps serving; a frame altered by a hostile relay
fails the client with ``SealingError``; a replayed request, and one with a stale timestamp, are refused.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from meshinfer.config import SamplingConfig
from meshinfer.loopthread import run_on

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower and looked at the sea"
MODEL_NAME = "tiny-llama3"


@dataclass
class Sealed:
    model_dir: Path
    swarm: object
    full_peer: str
    relay_peer: str
    capture: Path
    local: object
    sealed: object
    """A ``DistributedModel`` with ``sealed=True`` (straight to the full node)."""


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sealed]:
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.checkpoints import tiny_checkpoint
    from meshinfer.testing.procs import wait_gone
    from meshinfer.testing.swarm import LocalSwarm

    model_dir = tiny_checkpoint("llama", variant="llama3")
    capture = tmp_path_factory.mktemp("relay") / "relayed.bin"
    swarm = LocalSwarm(model_dir, [(0, 4)], server_args=("--sealed",), startup_timeout=180)
    tree: list[int] = []
    try:
        swarm.start()
        relay = swarm.add_server((0, 2), extra_args=("--sealed-relay-capture", str(capture)))
        full = swarm.servers[0]
        tree = [pid for s in swarm.servers for pid in s.proc.descendants()]
        assert full.info["sealed"] is True and relay.info["sealed"] is False and relay.info["sealed_relay"] is True
        with contextlib.ExitStack() as stack:
            sealed_model = stack.enter_context(DistributedModel.from_pretrained(model_dir, swarm.initial_peers,
                                                                                sealed=True))
            yield Sealed(model_dir, swarm, full.peer_id, relay.peer_id, capture, LocalModel.from_pretrained(model_dir),
                         sealed_model)
    finally:
        swarm.stop()
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


def _ids(s: Sealed) -> list[int]:
    return [int(i) for i in s.local.tokenizer(PROMPT)["input_ids"]]  # type: ignore[attr-defined]


def test_sealed_tokens_equal_local(sealed: Sealed) -> None:
    ids = _ids(sealed)
    want = sealed.local.generate(ids, 16)  # type: ignore[attr-defined]  # = the unsealed swarm's (test_distributed)
    assert sealed.sealed.generate(ids, 16) == want  # type: ignore[attr-defined]
    assert sealed.sealed.last_route == []  # no split route was planned or opened
    sampling = SamplingConfig(temperature=0.9, top_p=0.9, seed=1234)
    want = sealed.local.generate(ids, 12, sampling)  # type: ignore[attr-defined]
    assert sealed.sealed.generate(ids, 12, sampling) == want  # type: ignore[attr-defined]
    # issue 24's sampling settings travel sealed too; an empty stop set (ignore_eos) runs to the last token
    sampling = SamplingConfig(temperature=0.8, min_p=0.05, presence_penalty=0.6, frequency_penalty=0.4, seed=5,
                              logit_bias=((want[0], -100.0), (7, 3.0)))
    want = sealed.local.generate(ids, 12, sampling, stop_token_ids=())  # type: ignore[attr-defined]
    assert sealed.sealed.generate(ids, 12, sampling, stop_token_ids=()) == want  # type: ignore[attr-defined]
    assert len(want) == 12
    from meshinfer.errors import ConfigError
    from meshinfer.models.generator import GenerationParams

    with pytest.raises(ConfigError, match="top_logprobs"):
        list(sealed.sealed.generation(ids, GenerationParams.of(4, None, None, 2)))  # type: ignore[attr-defined]
    grammar = GenerationParams(4, constraint=lambda: None)  # type: ignore[arg-type,return-value]  # never called
    with pytest.raises(ConfigError, match="structured output and tool calls are not available with --sealed"):
        list(sealed.sealed.generation(ids, grammar))  # type: ignore[attr-defined]


@contextlib.contextmanager
def _relayed(model: object, relay: str) -> Iterator[object]:
    """``model`` (a sealed ``DistributedModel``) going through ``relay`` for a while (its config is read per call)."""
    import dataclasses

    before = model.config  # type: ignore[attr-defined]
    model.config = dataclasses.replace(before, sealed_relay=relay)  # type: ignore[attr-defined]
    try:
        yield model
    finally:
        model.config = before  # type: ignore[attr-defined]


def _captured(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    out, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from(">I", data, at)
        out.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return out


def test_through_a_relay_the_relay_sees_no_plaintext(sealed: Sealed) -> None:
    from meshinfer.wire.sealed import RelayOpen, SealedFrame, decode_sealed, pack_ids

    ids = _ids(sealed)
    want = sealed.local.generate(ids, 16)  # type: ignore[attr-defined]
    with _relayed(sealed.sealed, sealed.relay_peer) as via:
        assert via.generate(ids, 16) == want  # type: ignore[attr-defined]
    payloads = _captured(sealed.capture)
    kinds = [type(decode_sealed(p)).__name__ for p in payloads]
    assert kinds[0] == RelayOpen.__name__ and kinds.count(SealedFrame.__name__) >= 2, kinds
    seen = b"".join(payloads)
    tok = sealed.local.tokenizer  # type: ignore[attr-defined]
    answer = tok.decode(want, skip_special_tokens=True)
    forbidden = {
        "prompt ids (u32)": pack_ids(ids), "prompt ids (msgpack)": msgspec.msgpack.encode(ids),
        "prompt ids minus BOS (u32)": pack_ids(ids[1:]), "answer ids (u32)": pack_ids(want),
        "answer ids (msgpack)": msgspec.msgpack.encode(want)[1:],
        "prompt text": PROMPT.encode(), "prompt words": b"keeper climbed",
    }
    if len(answer.strip().encode()) >= 8:
        forbidden["answer text"] = answer.strip().encode()
    for what, needle in forbidden.items():
        assert len(needle) >= 8, what  # long enough that a chance match in ciphertext is out of the question
        assert needle not in seen, f"the relay saw the {what}"


def test_openai_gateway_sends_generations_sealed(sealed: Sealed) -> None:
    import openai

    from meshinfer.cli.generate import run_generation
    from meshinfer.gateway.app import create_app
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.models.generator import GenerationParams

    want = run_generation(sealed.local, PROMPT, GenerationParams(12, SamplingConfig()), out=None)  # type: ignore[arg-type]
    app = create_app(SwarmGenerator(sealed.sealed), MODEL_NAME)  # type: ignore[arg-type]
    with ApiServer(app) as server, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                                 timeout=120) as client:
        got = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=12)
        assert got.choices[0].text == want.text
        streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=12,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == want.text


async def _send(node: object, peer: str, addresses: list[str], first: bytes) -> list[object]:
    """Send one raw sealed-protocol message to ``peer`` and read its answers until the stream ends."""
    from meshinfer.errors import TransportError
    from meshinfer.wire.sealed import SEALED_PROTOCOL, SealedFrame, SealedRefusal, decode_sealed
    from meshinfer.wire.sealing import LAST

    stream = await node.open_stream(peer, SEALED_PROTOCOL, maddrs=addresses, timeout=15.0)  # type: ignore[attr-defined]
    got: list[object] = []
    async with stream:
        await stream.send_bytes(first)
        while True:
            try:
                msg = decode_sealed(await stream.recv_bytes(timeout=60.0))
            except TransportError:
                return got
            got.append(msg)
            if isinstance(msg, SealedRefusal) or (isinstance(msg, SealedFrame) and msg.data[0] == LAST):
                return got


def _request(sealed: Sealed, *, timestamp: float | None = None) -> tuple[bytes, object]:
    """A valid sealed request to the full node (encoded ``SealedOpen``) and the full node's record."""
    from meshinfer.client.sealed import full_nodes, request_body
    from meshinfer.models.generator import GenerationParams
    from meshinfer.wire.sealed import SealedOpen, encode_body, encode_sealed
    from meshinfer.wire.sealing import seal_request, transcript

    model = sealed.sealed
    cov = run_on(model.loop, model.view.coverage(model.ref, refresh=True), timeout=30)  # type: ignore[attr-defined]
    [record] = full_nodes(cov.servers.values(), model.model_id, 4)  # type: ignore[attr-defined]
    body = request_body(_ids(sealed), GenerationParams(4), model.model_id)  # type: ignore[attr-defined]
    if timestamp is not None:
        body = msgspec.structs.replace(body, timestamp=timestamp)
    key = bytes.fromhex(record.sealing_key)
    context = transcript(record.peer_id, model.model_id, key)  # type: ignore[attr-defined]
    blob, _secret = seal_request(encode_body(body), key, context)
    return encode_sealed(SealedOpen(model_id=model.model_id, server_key=key, blob=blob)), record  # type: ignore[attr-defined]


def _ask(sealed: Sealed, first: bytes, record: object) -> list[object]:
    model = sealed.sealed
    return run_on(model.loop, _send(model.view.node, record.peer_id, record.addresses, first), timeout=90)  # type: ignore[attr-defined]


def test_tampered_request_is_refused_and_the_server_stays_up(sealed: Sealed) -> None:
    from meshinfer.wire.sealed import SealedFrame, SealedOpen, SealedRefusal, decode_sealed, encode_sealed

    first, record = _request(sealed)
    opened = decode_sealed(first)
    assert isinstance(opened, SealedOpen)
    blob = bytearray(opened.blob)
    blob[len(blob) // 2] ^= 0x20
    tampered = encode_sealed(msgspec.structs.replace(opened, blob=bytes(blob)))
    [refusal] = _ask(sealed, tampered, record)
    assert isinstance(refusal, SealedRefusal) and refusal.code == "cannot_open", refusal
    answers = _ask(sealed, first, record)  # the untampered request: served
    assert all(isinstance(a, SealedFrame) for a in answers) and len(answers) >= 2
    ids = _ids(sealed)
    assert sealed.sealed.generate(ids, 8) == sealed.local.generate(ids, 8)  # type: ignore[attr-defined]


def test_replayed_and_stale_requests_are_refused(sealed: Sealed) -> None:
    import time

    from meshinfer.wire.sealed import SealedFrame, SealedRefusal

    first, record = _request(sealed)
    answers = _ask(sealed, first, record)
    assert answers and all(isinstance(a, SealedFrame) for a in answers)
    [again] = _ask(sealed, first, record)  # the same bytes, replayed
    assert isinstance(again, SealedRefusal) and again.code == "replayed" and "replay" in again.message, again
    stale, record = _request(sealed, timestamp=time.time() - 3600)
    [refusal] = _ask(sealed, stale, record)
    assert isinstance(refusal, SealedRefusal) and refusal.code == "replayed" and "timestamp" in refusal.message



def test_cli_generate_sealed_through_auto_relay(sealed: Sealed) -> None:
    """``meshinfer generate --sealed --sealed-relay auto`` as a real process: the local engine's tokens."""
    import json
    import subprocess

    from meshinfer.testing.procs import meshinfer_argv

    argv = meshinfer_argv("generate", "--model", str(sealed.model_dir), "--prompt", PROMPT, "--max-new-tokens", "10",
                          "--json", "--no-mdns", "--sealed", "--sealed-relay", "auto", "--initial-peers",
                          *sealed.swarm.initial_peers)  # type: ignore[attr-defined]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["generated_token_ids"] == sealed.local.generate(_ids(sealed), 10)  # type: ignore[attr-defined]


async def _tampering_relay(node: object, stream: object) -> None:
    """A relay that flips one bit of the second frame it forwards (a hostile peer between client and full node)."""
    from meshinfer.errors import TransportError
    from meshinfer.wire.sealed import SEALED_PROTOCOL, RelayOpen, SealedFrame, decode_sealed, encode_sealed

    msg = decode_sealed(await stream.recv_bytes())  # type: ignore[attr-defined]
    assert isinstance(msg, RelayOpen)
    upstream = await node.open_stream(msg.target, SEALED_PROTOCOL, maddrs=msg.maddrs, timeout=15.0)  # type: ignore[attr-defined]
    async with upstream:
        await upstream.send_bytes(encode_sealed(msg.open))
        for n in range(1000):
            try:
                payload = await upstream.recv_bytes(timeout=60.0)
            except TransportError:
                return
            frame = decode_sealed(payload)
            if n == 1 and isinstance(frame, SealedFrame):
                data = bytearray(frame.data)
                data[-1] ^= 0x01
                payload = encode_sealed(SealedFrame(data=bytes(data)))
            await stream.send_bytes(payload)  # type: ignore[attr-defined]


def test_a_tampered_frame_fails_the_client_with_a_typed_error(sealed: Sealed) -> None:
    from meshinfer.config import P2PConfig
    from meshinfer.loopthread import LoopThread
    from meshinfer.p2p.node import PeerNode
    from meshinfer.wire.sealed import SEALED_RELAY_PROTOCOL
    from meshinfer.wire.sealing import SealingError

    ids = _ids(sealed)
    with LoopThread("tampering-relay") as runner:
        config = P2PConfig(host="127.0.0.1", initial_peers=tuple(sealed.swarm.initial_peers), mdns=False)  # type: ignore[attr-defined]
        node = runner.run(PeerNode.start(config), timeout=60)
        try:
            runner.run(node.handle(SEALED_RELAY_PROTOCOL, lambda s: _tampering_relay(node, s)), timeout=10)
            with _relayed(sealed.sealed, node.maddrs[0]) as via:
                got: list[int] = []
                with pytest.raises(SealingError, match="frame 1 failed authentication"):
                    for token in via.stream(ids, 8):  # type: ignore[attr-defined]
                        got.append(token)
                assert got == sealed.local.generate(ids, 1)  # type: ignore[attr-defined]  # frame 0 was genuine
        finally:
            runner.run(node.close(), timeout=30)
    assert sealed.sealed.generate(ids, 8) == sealed.local.generate(ids, 8)  # type: ignore[attr-defined]
