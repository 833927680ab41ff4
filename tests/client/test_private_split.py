"""A private split (``--private-blocks 1``) through real ``meshinfer serve`` processes, for every tiny family.

One set of servers for the whole module, started at once on the shared bootstrap: one server holding all 4 blocks
of each tiny checkpoint (seed 22: model ids of this module's own, so no other module's stopped servers are in their
records), and for the tiny llama two more: one that always lies (the audit test routes through it: caught, rolled
back, exact) and one the failover test kills. Each private client keeps
blocks 0 and 3 and routes only [1, 3) (a sub-range of what the server holds); its greedy tokens equal
``LocalModel``'s, and a plain split of the same client's peer over [0, 4) ends on the same hidden states.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from client_helpers import stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.client.private_split import THREAD_MIN_TOKENS, PrivateSplitSession
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.client.swarm import ModelRef
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import list_tiny_checkpoints, tiny_checkpoint
from meshinfer.testing.dishonest import DishonestConfig
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.types import BlockRange

pytestmark = pytest.mark.slow

T = TypeVar("T")
PROMPT = [5, 17, 42, 7, 99, 3, 17, 42]
NEW_TOKENS = 8
CASES = sorted({(family, "default") for family, _ in list_tiny_checkpoints()})
"""Every family once (its default variant: the others differ in the head or the rope, which the plain split's
tests cover; one server process each is what this module's time goes to)."""
IDS = [f"{f}-{v}" for f, v in CASES]
FAILOVER = ("llama", "default")
SEED = 22
LIAR = DishonestConfig("wrong", seed=1)
FETCHED = ("qwen2", "default")
"""The case whose private client names the model by its id: its blocks 0 and 3 come by the swarm's piece fetch."""


@pytest.fixture(scope="module")
def checkpoints() -> dict[tuple[str, str], Path]:
    return {case: tiny_checkpoint(case[0], variant=case[1], seed=SEED) for case in CASES}


@pytest.fixture(scope="module")
def swarms(bootstrap: list[str],
           checkpoints: dict[tuple[str, str], Path]) -> Iterator[dict[tuple[str, str], LocalSwarm]]:
    made: dict[tuple[str, str], LocalSwarm] = {}

    def start(case: tuple[str, str]) -> None:
        spans = [(0, 4), (0, 4), (0, 4)] if case == FAILOVER else [(0, 4)]
        made[case] = LocalSwarm(checkpoints[case], spans, initial_peers=bootstrap, startup_timeout=180,
                                torch_threads=1, server_args=("--drain-timeout", "0.2"),
                                dishonest={2: LIAR} if case == FAILOVER else None)
        made[case].start()

    try:
        with ThreadPoolExecutor(len(CASES)) as pool:
            for future in [pool.submit(start, case) for case in CASES]:
                future.result()
        yield made
    finally:
        for swarm in made.values():
            stop_swarm(swarm)


def _avoid_liar(client: DistributedModel, swarm: LocalSwarm) -> None:
    """Ban the tiny llama's liar in ``client``'s view (its unaudited passes and plain sessions must be honest)."""
    for server in swarm.servers:
        if server.dishonest is not None:
            client.view.bans.ban(server.peer_id, time.monotonic())


def _run(client: DistributedModel, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, client.loop).result(timeout=120)


async def _plain_greedy(client: DistributedModel, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of a PLAIN split over all blocks, through the private client's own peer, and the last block's
    outputs [len(ids) + n - 1, H]."""
    route = await client.view.plan(client.ref, blocks=BlockRange(0, client.spec.num_blocks), wait=10.0)
    session = await InferenceSession.open(client.view.node, route, model_id=client.model_id,
                                          max_length=len(ids) + n, config=client.config)
    try:
        outs = [await session.forward(client.head.embed(torch.tensor([ids]))[0])]
        tokens = [int(client.head.logits(outs[-1][-1]).argmax())]
        while len(tokens) < n:
            outs.append(await session.forward(client.head.embed(torch.tensor([[tokens[-1]]]))[0]))
            tokens.append(int(client.head.logits(outs[-1][-1]).argmax()))
        return tokens, torch.cat(outs)
    finally:
        await session.close()


async def _private_hidden(client: DistributedModel, ids: list[int]) -> torch.Tensor:
    session = await client.aopen_session(len(ids))
    assert isinstance(session, PrivateSplitSession)
    try:
        return await session.forward(client.head.embed(torch.tensor([ids]))[0])
    finally:
        await session.close()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_private_split_equals_local_and_plain_split(case: tuple[str, str], swarms: dict[tuple[str, str], LocalSwarm],
                                                    checkpoints: dict[tuple[str, str], Path]) -> None:
    path = checkpoints[case]
    swarm = swarms[case]
    local = LocalModel.from_pretrained(path)
    reference = local.generate(PROMPT, NEW_TOKENS, stop_token_ids=())
    ref = swarm.model_id if case == FETCHED else path
    with DistributedModel.from_pretrained(ref, swarm.initial_peers, private_blocks=1) as client:
        assert client.private is not None and client.private.middle == BlockRange(1, 3)
        _avoid_liar(client, swarm)
        tokens = client.generate(PROMPT, NEW_TOKENS, stop_token_ids=())
        assert tokens == reference
        assert [hop.span for hop in client.last_route] == [BlockRange(1, 3)]  # servers run only the middle
        assert [hop.span for hop in client.plan()] == [BlockRange(1, 3)]
        plain, plain_hidden = _run(client, _plain_greedy(client, PROMPT, NEW_TOKENS))
        assert plain == reference
        private_hidden = _run(client, _private_hidden(client, PROMPT + tokens[:-1]))
        torch.testing.assert_close(private_hidden, plain_hidden.to(private_hidden.dtype), rtol=1e-4, atol=1e-4)
        scored = _run(client, client.ascore_prompt(PROMPT, top_logprobs=2))
        expected = local.score_prompt(PROMPT, top_logprobs=2)
        assert [s.token for s in scored] == [s.token for s in expected]
        assert [s.logprob for s in scored] == pytest.approx([s.logprob for s in expected], abs=1e-4)
        if case == FETCHED:  # fetched by id: the client part and blocks 0 and 3, not the middle
            assert client.path is not None and client.path != path
            held = Checkpoint(client.path)
            for block, present in ((0, True), (1, False), (2, False), (3, True)):
                assert (not held.missing(client.spec.block_tensors(block))) == present, block


def test_multi_token_steps_and_rewind_match_a_straight_run(swarms: dict[tuple[str, str], LocalSwarm],
                                                           checkpoints: dict[tuple[str, str], Path]) -> None:
    """What speculation does through the wrapper: a multi-token step, a rewind into it, a different continuation;
    the outputs equal a session that ran the kept tokens straight. The prompt is long enough for the local blocks
    to run on a worker thread (``THREAD_MIN_TOKENS``)."""
    prompt = (PROMPT * 6)[:THREAD_MIN_TOKENS + 4]
    case = ("qwen3", "default")
    with DistributedModel.from_pretrained(checkpoints[case], swarms[case].initial_peers,
                                          private_blocks=1) as client:
        def embed(ids: list[int]) -> torch.Tensor:
            return client.head.embed(torch.tensor([ids]))[0]

        async def rewound() -> torch.Tensor:
            session = await client.aopen_session(64)
            try:
                await session.forward(embed(prompt))
                await session.forward(embed([11, 12, 13]))  # a draft of 3
                await session.rewind(len(prompt) + 1)  # only the first was accepted
                assert session.position == len(prompt) + 1
                return await session.forward(embed([21, 22]))
            finally:
                await session.close()

        async def straight() -> torch.Tensor:
            session = await client.aopen_session(64)
            try:
                return (await session.forward(embed([*prompt, 11, 21, 22])))[-2:]
            finally:
                await session.close()

        torch.testing.assert_close(_run(client, rewound()), _run(client, straight()), rtol=1e-4, atol=1e-4)


def test_cli_generate_with_private_blocks_equals_local(swarms: dict[tuple[str, str], LocalSwarm],
                                                      checkpoints: dict[tuple[str, str], Path]) -> None:
    case = ("qwen3", "default")
    local = LocalModel.from_pretrained(checkpoints[case])
    proc = subprocess.run(meshinfer_argv("generate", "--model", str(checkpoints[case]), "--prompt", "The keeper",
                                         "--max-new-tokens", "8", "--json", "--private-blocks", "1",
                                         "--initial-peers", *swarms[case].initial_peers),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["generated_token_ids"] == local.generate(doc["prompt_token_ids"], 8)
    assert [hop["blocks"] for hop in doc["route"]] == ["1:3"]


def test_concurrent_private_generations_keep_their_own_caches(swarms: dict[tuple[str, str], LocalSwarm],
                                                             checkpoints: dict[tuple[str, str], Path]) -> None:
    """Three generations at once through one client (their LM-head rows batched): each its own local caches."""
    case = ("mistral", "default")
    local = LocalModel.from_pretrained(checkpoints[case])
    prompts = [PROMPT, PROMPT[::-1], [9, *PROMPT[2:]]]
    want = [local.generate(p, NEW_TOKENS, stop_token_ids=()) for p in prompts]
    with DistributedModel.from_pretrained(checkpoints[case], swarms[case].initial_peers,
                                          private_blocks=1) as client:
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: client.generate(p, NEW_TOKENS, stop_token_ids=()), prompts))
    assert got == want


def test_a_lying_middle_server_is_caught_and_rolled_back_exactly(swarms: dict[tuple[str, str], LocalSwarm],
                                                                 checkpoints: dict[tuple[str, str], Path]) -> None:
    """The route's first plan goes through the liar: its audit catches it, the generation rolls back (the REMOTE
    session rewinds: the wrapper's caches follow) and goes on elsewhere; the tokens are the local engine's."""
    swarm = swarms[FAILOVER]
    liar = next(s.peer_id for s in swarm.servers if s.dishonest is not None)
    honest = {s.peer_id for s in swarm.servers if s.dishonest is None}
    path = checkpoints[FAILOVER]
    reference = LocalModel.from_pretrained(path).generate(PROMPT, 2 * NEW_TOKENS, stop_token_ids=())
    with DistributedModel.from_pretrained(path, swarm.initial_peers, private_blocks=1) as client:
        plan = client.view.plan
        first = [True]

        async def through_liar(ref: ModelRef, *, exclude: Iterable[str] = (), **kw: Any) -> list[RouteHop]:
            if first.pop() if first else False:  # the session's route; shadows and replacements are left alone
                exclude = {*exclude, *honest}
            return await plan(ref, exclude=exclude, **kw)

        client.view.plan = through_liar  # type: ignore[method-assign]
        tokens = client.generate(PROMPT, 2 * NEW_TOKENS, stop_token_ids=())
        session = client.last_session
        assert session is not None
        assert tokens == reference
        assert client.audits.detections >= 1, client.audits
        assert any(f.peer_id == liar for f in session.failovers)
        assert all(hop.span == BlockRange(1, 3) and hop.peer_id in honest for hop in session.route)


def test_private_split_survives_a_killed_server(swarms: dict[tuple[str, str], LocalSwarm],
                                                checkpoints: dict[tuple[str, str], Path]) -> None:
    """SIGKILL the server of the route mid-generation: the other one takes the middle over (its history replayed);
    the tokens are still the local engine's. Runs last: it leaves the llama with one server."""
    swarm = swarms[FAILOVER]
    path = checkpoints[FAILOVER]
    n = 40
    reference = LocalModel.from_pretrained(path).generate(PROMPT, n, stop_token_ids=())
    tokens: list[int] = []
    with DistributedModel.from_pretrained(path, swarm.initial_peers, private_blocks=1) as client:
        _avoid_liar(client, swarm)
        for token in client.stream(PROMPT, n, stop_token_ids=()):
            tokens.append(token)
            if len(tokens) == 4:
                assert client.last_session is not None
                victim = client.last_session.route[0].peer_id
                next(s for s in swarm.servers if s.peer_id == victim).proc.kill(signal.SIGKILL)
        assert tokens == reference
        assert client.last_session is not None and client.last_session.failovers
        assert all(hop.span == BlockRange(1, 3) and hop.peer_id != victim for hop in client.last_session.route)
