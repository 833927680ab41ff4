"""Distributed generation through real ``meshinfer serve`` processes equals local generation, per family.

One swarm (2-3 servers as separate processes, real libp2p transport on 127.0.0.1) per family and
variant, started once (module-scoped, parametrized, so only one runs at a time) and reused by every
test of that family.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from client_helpers import PROMPT, start_swarm, stop_swarm

from meshinfer.cli.chat import Conversation, reply, stop_ids
from meshinfer.client.config import ClientConfig
from meshinfer.client.model import DistributedModel
from meshinfer.client.session import InferenceSession
from meshinfer.config import SamplingConfig
from meshinfer.models.engine import LocalModel
from meshinfer.models.generator import GenerationParams
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 120
THREE = [(0, 1), (1, 3), (3, 4)]
TWO = [(0, 2), (2, 4)]
CASES = {
    "llama": ("llama", "default", TWO),
    "llama-tied": ("llama", "tied", THREE),
    "llama3": ("llama", "llama3", TWO),
    "mistral": ("mistral", "default", THREE),
    "qwen2": ("qwen2", "default", TWO),
    "qwen3": ("qwen3", "default", TWO),
}
LIBP2P_ONLY = {"qwen3"}
"""Cases whose servers run with ``--no-direct``: sessions and pushes then go over libp2p streams."""


class FamilySwarm:
    def __init__(self, name: str, model_dir: Path, swarm: LocalSwarm, local: LocalModel,
                 clients: list[DistributedModel]) -> None:
        self.name, self.model_dir, self.swarm, self.local = name, model_dir, swarm, local
        self.client, self.second = clients
        self.prompt_ids = [int(i) for i in local.tokenizer(PROMPT)["input_ids"]]


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def fam(request: pytest.FixtureRequest, bootstrap: list[str]) -> Iterator[FamilySwarm]:
    """The family's swarm, its local reference model and two independent clients (two peers)."""
    family, variant, spans = CASES[request.param]
    model_dir = tiny_checkpoint(family, variant=variant)
    swarm = start_swarm(model_dir, spans, bootstrap,
                        server_args=("--no-direct",) if request.param in LIBP2P_ONLY else ())
    try:
        local = LocalModel.from_pretrained(model_dir)
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(DistributedModel.from_pretrained(model_dir, swarm.initial_peers))
                       for _ in range(2)]
            yield FamilySwarm(request.param, model_dir, swarm, local, clients)
    finally:
        stop_swarm(swarm)


def test_greedy_tokens_equal_local(fam: FamilySwarm) -> None:
    got = fam.client.generate(fam.prompt_ids, 16, stop_token_ids=())
    assert got == fam.local.generate(fam.prompt_ids, 16, stop_token_ids=())
    # the route went through every server of the swarm, in block order
    assert [h.span for h in fam.client.last_route] == [s.span for s in fam.swarm.servers]
    assert [h.peer_id for h in fam.client.last_route] == [s.peer_id for s in fam.swarm.servers]
    # servers announce a direct-plane address unless started with --no-direct (then libp2p carries it all)
    direct = [bool(h.record.direct_addresses) for h in fam.client.last_route]
    assert direct == [fam.name not in LIBP2P_ONLY] * len(direct)


def test_two_clients_at_once(fam: FamilySwarm) -> None:
    prompts = [fam.prompt_ids, [int(i) for i in fam.local.tokenizer("A lantern in the rain")["input_ids"]]]
    want = [fam.local.generate(p, 8, stop_token_ids=()) for p in prompts]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int, client: DistributedModel) -> None:
        try:
            barrier.wait(30)
            got[i] = client.generate(prompts[i], 8, stop_token_ids=())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate([fam.client, fam.second])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == {0: want[0], 1: want[1]}


@pytest.mark.parametrize("fam", ["llama", "qwen3"], indirect=True)  # family-independent client code
def test_streaming_eos_and_seeded_sampling_equal_local(fam: FamilySwarm) -> None:
    want = fam.local.generate(fam.prompt_ids, 8, stop_token_ids=())
    stream = fam.client.stream(fam.prompt_ids, 8, stop_token_ids=())
    first = next(stream)  # lazy: the first token arrives before the rest are computed
    assert [first, *stream] == want
    # stop tokens end the generation right after the stop token, as locally
    stop = {want[3]}
    assert fam.client.generate(fam.prompt_ids, 8, stop_token_ids=stop) == want[: want.index(want[3]) + 1]
    sampling = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)
    assert (fam.client.generate(fam.prompt_ids, 8, sampling, stop_token_ids=())
            == fam.local.generate(fam.prompt_ids, 8, sampling, stop_token_ids=()))
    # an abandoned stream closes its sessions; the client keeps working
    abandoned = fam.client.stream(fam.prompt_ids, 8)
    next(abandoned)
    abandoned.close()
    assert fam.client.generate(fam.prompt_ids, 2, stop_token_ids=()) == want[:2]


@pytest.mark.parametrize("fam", ["llama", "mistral"], indirect=True)  # two and three hops
def test_scored_tokens_equal_local(fam: FamilySwarm) -> None:
    sampling = SamplingConfig(temperature=0.8, top_k=20, seed=3)

    async def collect() -> list:
        scored = fam.client.astream_scored(fam.prompt_ids, 8, sampling, stop_token_ids=(), top_logprobs=3)
        return [s async for s in scored]

    got = asyncio.run_coroutine_threadsafe(collect(), fam.client.loop).result(120)
    want = list(fam.local.stream_scored(fam.prompt_ids, 8, sampling, stop_token_ids=(), top_logprobs=3))
    assert [s.token for s in got] == [s.token for s in want]
    for a, b in zip(got, want, strict=True):  # the blocks ran on other peers: equal up to float rounding
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=1e-4)
    # a prompt's own tokens, scored in one pass through the swarm
    remote = asyncio.run_coroutine_threadsafe(fam.client.ascore_prompt(fam.prompt_ids, 2), fam.client.loop).result(60)
    local = fam.local.score_prompt(fam.prompt_ids, 2)
    assert [s.token for s in remote] == [s.token for s in local] == fam.prompt_ids[1:]
    assert [s.logprob for s in remote] == pytest.approx([s.logprob for s in local], abs=1e-4)


@pytest.mark.parametrize("fam", ["llama-tied", "mistral"], indirect=True)  # three hops
def test_session_history_is_each_spans_input(fam: FamilySwarm) -> None:
    """Every hop's recorded input equals the local hidden state entering its first block (push mode),
    and the client-driven mode (no push) returns the same final hidden states."""
    with torch.inference_mode():
        embeds = fam.local.head.embed(torch.tensor([fam.prompt_ids]))[0]  # [T, H]
    local_states = fam.local.hidden_states(fam.prompt_ids)  # n+1 entries [T, H]; [k] enters block k
    outs = []
    runner = fam.client._runner
    for push in (True, False):
        route = fam.client.plan()
        session = runner.run(InferenceSession.open(fam.client.view.node, route, model_id=fam.client.model_id,
                                                   max_length=64, config=ClientConfig(push=push)))
        try:
            outs.append(runner.run(session.forward(embeds)))
            for i, hop in enumerate(route):
                torch.testing.assert_close(session.span_inputs(i), local_states[hop.span.start],
                                           rtol=1e-5, atol=1e-5)
        finally:
            runner.run(session.close())
    assert torch.equal(outs[0], outs[1])


# ---- the CLI through the swarm -------------------------------------------------------------------


def meshinfer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshinfer_argv(*args), input=stdin, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          check=False)


@pytest.mark.parametrize("fam", ["llama"], indirect=True)  # CLI code is family-independent
def test_cli_generate_json_through_swarm_equals_local(fam: FamilySwarm) -> None:
    proc = meshinfer("generate", "--model", str(fam.model_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                     "--json", "--max-download", "50", "--initial-peers", *fam.swarm.initial_peers)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["prompt_token_ids"] == fam.prompt_ids
    assert doc["generated_token_ids"] == fam.local.generate(fam.prompt_ids, 12)
    assert doc["text"] == fam.local.tokenizer.decode(doc["generated_token_ids"], skip_special_tokens=True)
    assert [hop["blocks"] for hop in doc["route"]] == ["0:2", "2:4"]


@pytest.mark.parametrize("fam", ["llama"], indirect=True)  # CLI code is family-independent
def test_cli_chat_through_swarm_non_interactive(fam: FamilySwarm) -> None:
    lines = ["Hello there, keeper.", "What do you see from the tower?"]
    proc = meshinfer("chat", "--model", str(fam.model_dir), "--max-new-tokens", "6", "--json", "--max-download", "50",
                     "--initial-peers", *fam.swarm.initial_peers, stdin="\n".join([*lines, "/exit", "ignored"]) + "\n")
    assert proc.returncode == 0, proc.stderr
    turns = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # the same conversation run locally: the chat template, history and stop tokens give the same replies
    tok = fam.local.tokenizer
    conversation = Conversation(tok, fam.local.spec.max_position_embeddings, 6)
    stops = stop_ids(tok, fam.local.spec)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    params = GenerationParams(6, SamplingConfig(), stops)
    want = [reply(fam.local, conversation, line, params, out=None) for line in lines]
    assert [(t["user"], t["reply"], t["reply_token_ids"]) for t in turns] == [
        (line, text, ids) for line, (text, ids) in zip(lines, want, strict=True)]
    assert len(conversation.turns) == 4  # two user messages and two replies, in order
    assert [t["role"] for t in conversation.turns] == ["user", "assistant", "user", "assistant"]
