"""Dishonest servers (``meshinfer.testing.dishonest``) lie as specified, through the real serve path.

A 2-server swarm of the tiny llama: an honest server of blocks 0:2 (module-scoped) and, per mode, a dishonest
server of 2:4 started through ``LocalSwarm.add_server(dishonest=...)``. A client session runs random hidden
states through the route; what hop 1 claimed (the session's output) is compared, position by position, with a
local ``BlockSpan`` of 2:4 run on hop 1's inputs (``span_inputs(1)``). Hop 0 (honest) is the control.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.client.session import InferenceSession
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.dishonest import DishonestConfig
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm, ServerProcess
from meshinfer.types import BlockRange

pytestmark = pytest.mark.slow

HONEST_TOL = 1e-4
"""Max per-position rel_err of an honest fp32 server against a local fp32 span (chunking changes rounding only)."""


class Liars:
    def __init__(self, model_dir: Path, swarm: LocalSwarm) -> None:
        self.model_dir, self.swarm = model_dir, swarm
        ckpt = Checkpoint(model_dir)
        self.hidden_size = ckpt.spec.hidden_size
        self.first = ckpt.load_span(BlockRange(0, 2))
        self.second = ckpt.load_span(BlockRange(2, 4))

    def start(self, config: DishonestConfig) -> ServerProcess:
        return self.swarm.add_server((2, 4), dishonest=config)


@pytest.fixture(scope="module")
def liars(bootstrap: list[str]) -> Iterator[Liars]:
    model_dir = tiny_checkpoint("llama")
    swarm = start_swarm(model_dir, [(0, 2)], bootstrap)
    try:
        yield Liars(model_dir, swarm)
    finally:
        stop_swarm(swarm)


def rel_err(claimed: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:  # [P, H] x2 -> [P]
    c, r = claimed.float(), ref.float()
    return (c - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)


def scale(claimed: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:  # [P, H] x2 -> [P]
    c, r = claimed.float(), ref.float()
    return (c * r).sum(-1) / (r * r).sum(-1).clamp_min(1e-12)


def local(span: BlockSpan, inputs: torch.Tensor) -> torch.Tensor:  # [P, H] -> [P, H], one prefill
    return span(inputs[None].float(), span.new_cache(inputs.shape[0]))[0]


def run_session(liars: Liars, server: ServerProcess, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(hop 1's inputs [P, H], hop 1's claimed outputs [P, H], the positions where each step started) for a
    prefill of 8 then 8 one-token steps through the route honest 0:2 -> ``server`` (2:4)."""
    gen = torch.Generator().manual_seed(seed)
    with DistributedModel.from_pretrained(liars.model_dir, liars.swarm.initial_peers, route_wait=1.0) as model:
        with model.open_session(64) as session:
            assert [h.peer_id for h in session.route] == [liars.swarm.servers[0].peer_id, server.peer_id]
            outs, starts = [], []
            for t in [8] + [1] * 8:
                starts.append(sum(o.shape[0] for o in outs))
                outs.append(session.step(torch.randn(t, liars.hidden_size, generator=gen)))
            inputs = session.span_inputs(1)
    claimed = torch.cat(outs)
    hop0 = local(liars.first, session_first_inputs(inputs, liars, seed))
    assert rel_err(inputs, hop0).max() < HONEST_TOL  # the honest hop is honest: the control
    return inputs, claimed, starts


def session_first_inputs(inputs: torch.Tensor, liars: Liars, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)  # the same draws run_session sent to hop 0
    return torch.cat([torch.randn(t, liars.hidden_size, generator=gen) for t in [8] + [1] * 8])


def with_liar(liars: Liars, config: DishonestConfig) -> tuple[ServerProcess, torch.Tensor, torch.Tensor, list[int]]:
    server = liars.start(config)
    try:
        assert "DISHONEST server" in server.proc.stderr_tail(200)
        inputs, claimed, starts = run_session(liars, server)
    finally:
        liars.swarm.stop_server(server)
        liars.swarm.servers.remove(server)
    return server, inputs, claimed, starts


def test_noise_lies_on_a_fraction_of_steps(liars: Liars) -> None:
    _, inputs, claimed, starts = with_liar(liars, DishonestConfig("noise", rate=0.5, sigma=0.05, seed=3))
    err = rel_err(claimed, local(liars.second, inputs))
    per_step = [float(err[a:b].max()) for a, b in zip(starts, [*starts[1:], err.shape[0]], strict=True)]
    noisy = [e for e in per_step if e > 0.01]
    clean = [e for e in per_step if e < HONEST_TOL]
    assert noisy and clean and len(noisy) + len(clean) == len(per_step), per_step
    assert all(0.02 < e < 0.15 for e in noisy), per_step  # rel_err ~ sigma (H = 64: +-20%)


def test_scale_multiplies_outputs(liars: Liars) -> None:
    _, inputs, claimed, _ = with_liar(liars, DishonestConfig("scale", scale=0.01))
    ref = local(liars.second, inputs)
    assert torch.allclose(scale(claimed, ref), torch.full((ref.shape[0],), 1.01), atol=1e-4)
    assert torch.allclose(rel_err(claimed, ref), torch.full((ref.shape[0],), 0.01), atol=1e-4)


def test_skip_block_computes_the_identity(liars: Liars) -> None:
    _, inputs, claimed, _ = with_liar(liars, DishonestConfig("skip-block", skip_block=3))
    assert rel_err(claimed, local(liars.second.sub(BlockRange(2, 3)), inputs)).max() < HONEST_TOL  # block 3 = id
    assert rel_err(claimed, local(liars.second, inputs)).min() > 0.01


def test_wrong_outputs_are_noise_of_the_right_rms(liars: Liars) -> None:
    _, inputs, claimed, _ = with_liar(liars, DishonestConfig("wrong", seed=1))
    ref = local(liars.second, inputs)
    assert rel_err(claimed, ref).min() > 0.5
    rms_ratio = claimed.float().pow(2).mean(-1).sqrt() / ref.float().pow(2).mean(-1).sqrt()
    assert ((rms_ratio > 0.6) & (rms_ratio < 1.4)).all(), rms_ratio  # chi distribution with H = 64 dims


def test_load_lies_only_on_batched_turns(liars: Liars) -> None:
    config = DishonestConfig("load", sigma=0.05)
    server = liars.start(config)
    try:
        inputs, claimed, _ = run_session(liars, server)  # one session alone: always honest
        assert rel_err(claimed, local(liars.second, inputs)).max() < HONEST_TOL
        errors = concurrent_sessions(liars, sessions=4, steps=12)
    finally:
        liars.swarm.stop_server(server)
        liars.swarm.servers.remove(server)
    assert max(errors) > 0.01, errors  # some turns batched several sessions: those outputs lie


def concurrent_sessions(liars: Liars, *, sessions: int, steps: int) -> list[float]:
    """Per-position rel_err of hop 1's claims for ``sessions`` sessions stepping at once (one-token steps)."""
    with DistributedModel.from_pretrained(liars.model_dir, liars.swarm.initial_peers, route_wait=1.0) as model:
        async def run() -> list[tuple[torch.Tensor, torch.Tensor]]:
            opened: list[InferenceSession] = [await model.aopen_session(64) for _ in range(sessions)]
            gen = torch.Generator().manual_seed(7)
            outs: list[list[torch.Tensor]] = [[] for _ in opened]
            try:
                for _ in range(steps):
                    xs = [torch.randn(1, liars.hidden_size, generator=gen) for _ in opened]
                    for out, y in zip(outs, await asyncio.gather(*(s.step(x) for s, x in zip(opened, xs, strict=True))),
                                      strict=True):
                        out.append(y)
                return [(s.span_inputs(1), torch.cat(o)) for s, o in zip(opened, outs, strict=True)]
            finally:
                for s in opened:
                    await s.close()

        results = asyncio.run_coroutine_threadsafe(run(), model.loop).result(timeout=120)
    return [float(e) for inputs, claimed in results for e in rel_err(claimed, local(liars.second, inputs))]


def test_serve_help_has_no_trace_of_dishonesty() -> None:
    for args in (["serve", "--help"], ["--help"]):
        out = subprocess.run(meshinfer_argv(*args), capture_output=True, text=True, timeout=60, check=True).stdout
        for word in (r"dishonest", r"--mode\b", r"skip-block", r"--sigma\b", r"\blie\b", r"\bliar"):
            assert not re.search(word, out.lower()), (args, word)
    src = Path(__file__).resolve().parents[2] / "src" / "meshinfer"
    # nothing outside meshinfer.testing can reach it, bar `meshinfer bench trust`, which starts liars on purpose
    # (through meshinfer.testing) to measure how fast audits catch them
    allowed = ("bench/trust.py", "bench/trust_runs.py")
    mentions = [p for p in src.rglob("*.py") if "dishonest" in p.read_text().lower()
                and p.parent.name != "testing" and p.relative_to(src).as_posix() not in allowed]
    assert mentions == [], mentions


def test_first_span_liar_rate_is_per_step_and_replays_lie_the_same(liars: Liars) -> None:
    """A liar of the FIRST span fed the same input row at every step (a greedy loop repeating a token) still
    lies on some steps only (seeded by session, position and input, not by the input alone), and a second
    session asking the same lies the same way."""
    from meshinfer.bench.trust_runs import steer
    from meshinfer.client.config import ClientConfig

    honest_first = liars.swarm.servers[0]
    second = liars.swarm.add_server((2, 4))
    liar = liars.swarm.add_server((0, 2), dishonest=DishonestConfig("noise", rate=0.5, sigma=0.05, seed=5))
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randn(8, liars.hidden_size, generator=gen)
    row = torch.randn(1, liars.hidden_size, generator=gen)
    inputs = torch.cat([prompt, *[row] * 16])  # [24, H]: the same row at positions 8..23
    claims: list[torch.Tensor] = []
    try:
        with DistributedModel.from_pretrained(liars.model_dir, liars.swarm.initial_peers, route_wait=1.0,
                                              config=ClientConfig(audit=False)) as model:
            steer(model, frozenset({honest_first.peer_id}))
            for _ in range(2):
                with model.open_session(64) as session:
                    assert [h.peer_id for h in session.route] == [liar.peer_id, second.peer_id]
                    session.step(prompt)
                    for _ in range(16):
                        session.step(row)
                    claims.append(session.span_inputs(1))  # what hop 0 (the liar) claimed [24, H]
    finally:
        for server in (liar, second):
            liars.swarm.stop_server(server)
            liars.swarm.servers.remove(server)
    err = rel_err(claims[0], local(liars.first, inputs))
    decode = err[8:]
    noisy, clean = int((decode > 0.01).sum()), int((decode < HONEST_TOL).sum())
    assert noisy > 0 and clean > 0 and noisy + clean == 16, decode  # per step, not per distinct input
    assert torch.equal(claims[0], claims[1])  # the same questions, the same lies
