"""Speculative decoding through real server processes (``client.speculative``): the same greedy tokens with
speculation on and off, audited or not, with a server SIGKILLed mid-generation, concurrent sessions through one
``DistributedModel`` (batched LM head), a seeded sampled generation, and penalties / logit_bias (issue 24). One
swarm for the module: two servers for every span (a failover and an audit shadow each have somewhere to go)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.config import SamplingConfig
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

SPANS = [(0, 2), (0, 2), (2, 4), (2, 4)]
PROMPT = [5, 17, 42, 7, 99, 3, 11, 23] * 3  # repetition: drafts from the prompt
NEW_TOKENS = 48
SEED = 1  # this tiny model's greedy output repeats a token: drafts get accepted


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_checkpoint("llama", seed=SEED)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[int]:
    return LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW_TOKENS, stop_token_ids=())


@pytest.fixture(scope="module")
def swarm(model_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = start_swarm(model_dir, SPANS, bootstrap)
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


def test_greedy_tokens_equal_with_speculation_on_and_off_audited_or_not(
        swarm: LocalSwarm, model_dir: Path, reference: list[int]) -> None:
    for audit in (False, True):
        with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=audit) as client:
            assert client.config.speculate  # the default
            assert client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == reference
            stats = client.speculation
            assert stats.accepted > 0 and stats.trips < NEW_TOKENS - 1, stats
            assert stats.tokens == NEW_TOKENS - 1
            if audit:
                audits = client.audits
                assert audits.detections == 0 and sum(p.passed for p in audits.peers.values()) > 0
        with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=audit,
                                              speculate=False) as plain:
            assert plain.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == reference
            assert plain.speculation.trips == 0


def test_speculation_survives_a_sigkilled_server_unchanged(swarm: LocalSwarm, model_dir: Path,
                                                           reference: list[int]) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False) as client:
        tokens: list[int] = []
        for token in client.stream(PROMPT, NEW_TOKENS, stop_token_ids=()):
            tokens.append(token)
            if len(tokens) == 6:
                session = client.last_session
                assert session is not None
                victim = session.route[1].peer_id  # the last hop (its twin takes over)
                next(s for s in swarm.servers if s.peer_id == victim).proc.kill(signal.SIGKILL)
        assert tokens == reference
        assert client.speculation.accepted > 0
        assert client.last_session is not None and client.last_session.failovers


def test_concurrent_sessions_and_a_seeded_sampled_generation(swarm: LocalSwarm, model_dir: Path,
                                                             reference: list[int]) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False) as client:
        async def one() -> list[int]:
            return [t async for t in client.astream(PROMPT, NEW_TOKENS, stop_token_ids=())]

        async def many() -> list[list[int]]:
            return list(await asyncio.gather(*(one() for _ in range(3))))

        outs = asyncio.run_coroutine_threadsafe(many(), client.loop).result(timeout=300)
        assert outs == [reference] * 3
        sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=11)
        first = client.generate(PROMPT, NEW_TOKENS, sampling=sampling, stop_token_ids=())
        again = client.generate(PROMPT, NEW_TOKENS, sampling=sampling, stop_token_ids=())
        assert len(first) == NEW_TOKENS and first == again  # seeded: the same draws
        local = LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW_TOKENS, sampling, stop_token_ids=())
        assert first == local  # one draw per token, in order: what plain decoding draws
        assert client.speculation.verify_steps > 0


def test_busy_client_drafts_only_from_long_repeats_same_tokens(swarm: LocalSwarm, model_dir: Path,
                                                               reference: list[int]) -> None:
    """More generations at once than ``speculate_busy_sessions``: drafts only from 3-token repeats. This model's
    greedy output repeats one token, so busy generations still draft (and the tokens are unchanged)."""
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                          speculate_busy_sessions=1) as client:
        async def one() -> list[int]:
            return [t async for t in client.astream(PROMPT, NEW_TOKENS, stop_token_ids=())]

        async def many() -> list[list[int]]:
            return list(await asyncio.gather(*(one() for _ in range(3))))

        assert asyncio.run_coroutine_threadsafe(many(), client.loop).result(timeout=300) == [reference] * 3
        assert client.speculation.accepted > 0, client.speculation



def test_penalties_and_logit_bias_with_speculation_give_plain_decodings_tokens(swarm: LocalSwarm,
                                                                               model_dir: Path) -> None:
    # issue 24: presence/frequency penalties count each row's own generated tokens, so accepting drafts changes
    # nothing: greedy and seeded sampling through the speculating swarm equal the local engine's plain decoding
    local = LocalModel.from_pretrained(model_dir)
    configs = [SamplingConfig(presence_penalty=0.3, frequency_penalty=0.2, logit_bias=((PROMPT[1], 1.5),)),
               SamplingConfig(temperature=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.2, seed=7)]
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False) as client:
        for sampling in configs:
            before = client.speculation.accepted
            got = client.generate(PROMPT, NEW_TOKENS, sampling=sampling, stop_token_ids=())
            assert got == local.generate(PROMPT, NEW_TOKENS, sampling, stop_token_ids=()), sampling
            assert client.speculation.accepted > before, sampling  # drafts were accepted under the penalties
