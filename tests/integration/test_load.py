"""Many sessions at once through a real 3-server swarm, and ``meshinfer bench load``.

The swarm (a ``meshinfer dht`` bootstrap and three ``meshinfer -v serve`` processes on the tiny llama
checkpoint, started here and stopped here by PID) logs every step-loop turn at debug level
("turn N: P piece(s), T token(s)"), which is how these tests see from the servers' side that steps of
different sessions really ran together. One ``DistributedModel`` runs 8 ``astream`` generations of
different prompt lengths concurrently on its loop; each must give the greedy tokens ``LocalModel``
gives for that prompt alone. While such a load holds 8 sessions open on every server, a NEW client
must still join, open a session and generate, and the DHT must show the servers' load (KV tokens
reserved). The pure helpers of ``meshinfer.bench.load`` are tested table-driven; the CLI once,
small. No timing is asserted anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from meshinfer.bench.load import (
    Trace,
    parse_sessions,
    ratios,
    run_round,
    session_prompts,
    summarise_level,
)
from meshinfer.bench.swarm import even_spans
from meshinfer.client.model import DistributedModel
from meshinfer.errors import ConfigError
from meshinfer.loopthread import run_on
from meshinfer.models.engine import LocalModel
from meshinfer.readyline import parse_ready_line
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, command_line, meshinfer_argv, pid_alive, start_dht, wait_gone
from meshinfer.testing.swarm import ServerProcess
from meshinfer.testing.tokenizer import corpus_text

pytestmark = pytest.mark.slow

T = TypeVar("T")

PROMPT_LENGTHS = [3, 6, 9, 12, 15, 18, 21, 24]
NEW_TOKENS = 16
HOLD = 4
"""Tokens each load session generates before it waits for the new client to get its first token."""
TIMEOUT = 120.0
TURN = re.compile(r"meshinfer\.server\.runtime: turn (\d+): (\d+) piece\(s\), (\d+) token\(s\)")
OPENED = re.compile(r"meshinfer\.server\.handler: session \S+ opened .*; (\d+) open, (\d+) tokens left")


# ---------------------------------------------------------------------------------------------------
# The swarm: three verbose servers (their debug log shows every turn of the step loop)


@dataclass
class Swarm:
    model_dir: Path
    dht: ManagedProcess
    bootstrap: list[str]
    servers: list[ServerProcess]


def _launch(model_dir: Path, span: Any, peers: list[str]) -> ServerProcess:
    argv = meshinfer_argv("-v", "serve", "--model", str(model_dir), "--blocks", str(span), "--host", "127.0.0.1",
                          "--torch-threads", "1", "--stop-on-stdin-eof", "--initial-peers", *peers)
    return ServerProcess(ManagedProcess(argv, name=f"meshinfer -v serve {span}"), span)


def _wait_ready(server: ServerProcess, deadline: float) -> None:
    while True:
        line = server.proc.read_line(max(0.1, deadline - time.monotonic()))
        info = parse_ready_line(line)
        if info is not None:
            server.info, server.maddrs = info, list(info.get("maddrs", []))
            return


def _stop_and_check(procs: list[ManagedProcess]) -> None:
    """SIGTERM all (by PID), wait, SIGKILL leftovers; nothing they started (p2pd) may survive."""
    tree = [pid for p in procs for pid in p.descendants()]
    for p in procs:
        p.kill(signal.SIGTERM)
    for p in procs:
        p.stop(timeout=15)
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """This process computes with one thread, as the servers do (2 shared cores; same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(meshinfer_cache_dir: Path) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def swarm(model_dir: Path) -> Iterator[Swarm]:
    dht, bootstrap = start_dht(timeout=90)
    servers: list[ServerProcess] = []
    try:
        servers = [_launch(model_dir, span, bootstrap) for span in even_spans(4, 3)]
        deadline = time.monotonic() + TIMEOUT
        for server in servers:
            _wait_ready(server, deadline)
        yield Swarm(model_dir, dht, bootstrap, servers)
    finally:
        _stop_and_check([s.proc for s in servers] + [dht])


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalModel:
    return LocalModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(local: LocalModel) -> list[list[int]]:
    """8 prompts of different lengths and contents (slices of the shipped corpus)."""
    ids = [int(i) for i in local.tokenizer(corpus_text())["input_ids"]]
    return [ids[5 * i:5 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def reference(local: LocalModel, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt generated alone, one at a time, by the local engine."""
    return [local.generate(p, NEW_TOKENS, stop_token_ids=()) for p in prompts]


@pytest.fixture(scope="module")
def client(swarm: Swarm) -> Iterator[DistributedModel]:
    # one token per step: the batching checks count every token each server computed (drafts would add theirs)
    with DistributedModel.from_pretrained(swarm.model_dir, swarm.bootstrap, speculate=False) as model:
        yield model


def _log(server: ServerProcess) -> list[str]:
    return server.proc.stderr_tail(200).splitlines()


def _turns(server: ServerProcess, after: int = 0) -> list[tuple[int, int, int]]:
    """(turn, pieces, tokens) of the server's logged step-loop turns numbered above ``after``."""
    found = [tuple(int(g) for g in m.groups()) for line in _log(server) if (m := TURN.search(line))]
    return [t for t in found if t[0] > after]  # type: ignore[misc]


def _last_turn(server: ServerProcess) -> int:
    return max((t for t, _, _ in _turns(server)), default=0)


def _wait_until(fn: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------
# Concurrency through the swarm


def test_eight_concurrent_generations_equal_local_and_are_batched(
        swarm: Swarm, client: DistributedModel, prompts: list[list[int]], reference: list[list[int]]) -> None:
    before = {s.pid: _last_turn(s) for s in swarm.servers}
    _, traces = run_round(client, prompts, NEW_TOKENS)  # 8 astreams gathered on the client's loop

    assert [t.tokens for t in traces] == reference  # greedy tokens equal in fp32, batching or not
    assert len({tuple(r) for r in reference}) > 1  # the prompts really lead to different generations
    # all 8 were in flight at once: every session had its first token before any session finished
    assert max(t.stamps[0] for t in traces) < min(t.stamps[-1] for t in traces)

    steps = len(prompts) * NEW_TOKENS  # one prefill + NEW_TOKENS - 1 decode steps per session
    tokens = sum(PROMPT_LENGTHS) + len(prompts) * (NEW_TOKENS - 1)
    for server in swarm.servers:
        turns = _turns(server, before[server.pid])
        # the server's log accounts for every token of every session on its span...
        assert sum(t for _, _, t in turns) == tokens, (server.span, turns)
        # ...in fewer turns than steps: steps of different sessions ran through the span together
        assert len(turns) < steps and max(p for _, p, _ in turns) >= 2, (server.span, turns)


def _dht_cache_left(model: DistributedModel) -> dict[str, int]:
    """Each server's ``cache_tokens_left`` as ``model``'s peer reads it from the DHT now."""
    read = model.view.coverage(model.ref, refresh=True)
    cov = run_on(model.loop, read, 30)
    return {peer: rec.cache_tokens_left for peer, rec in cov.servers.items()}


def _opened_since(server: ServerProcess, since: datetime.datetime) -> list[int]:
    """For each session the server opened at or after ``since``: how many it had open right after."""
    counts = []
    for line in _log(server):
        m = OPENED.search(line)
        if m and datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") >= since:
            counts.append(int(m.group(1)))
    return counts


def test_a_new_client_is_served_under_load_and_the_dht_shows_the_load(
        swarm: Swarm, client: DistributedModel, local: LocalModel, prompts: list[list[int]],
        reference: list[list[int]]) -> None:
    full = {s.peer_id: s.info["cache_tokens"] for s in swarm.servers}
    assert _wait_until(lambda: _dht_cache_left(client) == full, 15), _dht_cache_left(client)  # idle to begin
    held = threading.Semaphore(0)
    gate = asyncio.Event()

    async def one(prompt: list[int]) -> list[int]:
        out: list[int] = []
        async for token in client.astream(prompt, NEW_TOKENS, stop_token_ids=()):
            out.append(token)
            if len(out) == HOLD:  # hold the session open, mid-generation, until the newcomer is served
                held.release()
                await gate.wait()
        return out

    async def load() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    reserved = sum(len(p) + NEW_TOKENS for p in prompts)  # each session reserves prompt + new tokens
    loaded = {peer: tokens - reserved for peer, tokens in full.items()}
    newcomer_prompt = [int(i) for i in local.tokenizer("The keeper climbed the tower")["input_ids"]]
    want = local.generate(newcomer_prompt, NEW_TOKENS, stop_token_ids=())
    now = datetime.datetime.now()
    since = now.replace(microsecond=now.microsecond // 1000 * 1000)  # log lines carry milliseconds
    future = asyncio.run_coroutine_threadsafe(load(), client.loop)
    newcomer: DistributedModel | None = None
    try:
        for _ in prompts:  # wait until all 8 sessions are open and mid-generation on every server
            while not held.acquire(timeout=0.5):
                if future.done():
                    future.result()  # a load session failed: raise its error
        newcomer = DistributedModel.from_pretrained(swarm.model_dir, swarm.bootstrap)  # a new peer joins
        seen = newcomer
        assert _wait_until(lambda: _dht_cache_left(seen) == loaded, 15), _dht_cache_left(seen)

        got: list[int] = []
        for token in newcomer.stream(newcomer_prompt, NEW_TOKENS, stop_token_ids=()):
            if not got:  # the newcomer has its session on every hop: let the load run alongside it
                client.loop.call_soon_threadsafe(gate.set)
            got.append(token)
        assert got == want
        assert future.result(TIMEOUT) == reference

        for server in swarm.servers:  # each server opened the newcomer's session with the 8 others open
            assert _opened_since(server, since) == list(range(1, len(prompts) + 2)), server.span
        assert _wait_until(lambda: _dht_cache_left(seen) == full, 15), _dht_cache_left(seen)  # load gone
    finally:
        client.loop.call_soon_threadsafe(gate.set)
        if not future.done():
            future.cancel()
        with contextlib.suppress(BaseException):
            future.result(30)
        if newcomer is not None:
            newcomer.close()


# ---------------------------------------------------------------------------------------------------
# ``meshinfer bench load``: pure helpers, then the command once


@pytest.mark.parametrize(("text", "expected"), [
    ("1,4,16", [1, 4, 16]),
    ("16, 4 ,1", [1, 4, 16]),
    ("2,2,1", [1, 2]),
    ("8", [8]),
])
def test_parse_sessions(text: str, expected: list[int]) -> None:
    assert parse_sessions(text) == expected


@pytest.mark.parametrize("text", ["", "1,,4", "0", "-1", "a,b", "1.5", "5000"])
def test_parse_sessions_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--sessions"):
        parse_sessions(text)


def test_session_prompts() -> None:
    ids = list(range(100))
    assert session_prompts(ids, 3, 4, stride=7) == [[0, 1, 2, 3], [7, 8, 9, 10], [14, 15, 16, 17]]
    with pytest.raises(ConfigError, match="corpus tokens"):
        session_prompts(list(range(10)), 3, 4, stride=7)


def test_summarise_level_from_stamps() -> None:
    # session a: first token at 1.0 s, then every 0.1 s; session b: first at 1.2 s, then every 0.2 s
    a = Trace([1.0, 1.1, 1.2, 1.3], [1, 2, 3, 4])
    b = Trace([1.2, 1.4, 1.6], [5, 6, 7])
    got = summarise_level(0.0, [a, b])
    assert got["sessions"] == 2 and got["tokens"] == 7
    assert got["wall_s"] == pytest.approx(1.6) and got["decode_wall_s"] == pytest.approx(0.6)
    assert got["aggregate_decode_tokens_per_s"] == pytest.approx(5 / 0.6)  # 3 + 2 decode tokens
    assert got["per_session_decode_tokens_per_s_median"] == pytest.approx((10 + 5) / 2)
    assert got["decode_latency_ms"]["median"] == pytest.approx(100.0)  # gaps 100, 100, 100, 200, 200 ms
    assert got["decode_latency_ms"]["p95"] == pytest.approx(200.0)
    assert got["time_to_first_token_ms"]["median"] == pytest.approx(1100.0)
    assert got["time_to_first_token_ms"]["p95"] == pytest.approx(1000 + 200 * 0.95)
    with pytest.raises(ConfigError, match="two tokens"):
        summarise_level(0.0, [a, Trace([1.0], [1])])


@pytest.mark.parametrize(("agg", "lat", "speedup", "latency", "met"), [
    ((100.0, 600.0), (10.0, 25.0), 6.0, 2.5, (True, True)),
    ((100.0, 400.0), (10.0, 35.0), 4.0, 3.5, (False, False)),
    ((100.0, 500.0), (10.0, 30.0), 5.0, 3.0, (True, True)),
])
def test_ratios(agg: tuple[float, float], lat: tuple[float, float], speedup: float, latency: float,
                met: tuple[bool, bool]) -> None:
    levels = {
        1: {"aggregate_decode_tokens_per_s": agg[0], "decode_latency_ms": {"median": lat[0], "p95": 99.0}},
        4: {"aggregate_decode_tokens_per_s": 1.0, "decode_latency_ms": {"median": 1.0, "p95": 1.0}},
        16: {"aggregate_decode_tokens_per_s": agg[1], "decode_latency_ms": {"median": 1.0, "p95": lat[1]}},
    }
    got = ratios(levels)
    assert (got["baseline_sessions"], got["max_sessions"]) == (1, 16)
    assert got["aggregate_tokens_per_s_max_over_baseline"] == pytest.approx(speedup)
    assert got["p95_latency_max_over_baseline_median"] == pytest.approx(latency)
    assert (got["meets_speedup_target"], got["meets_latency_target"]) == met
    assert (got["target_aggregate_speedup"], got["target_latency_ratio"]) == (5.0, 3.0)


def _processes_using(path: Path) -> list[int]:
    """PIDs of live processes whose command line mentions ``path`` (read from /proc; nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and str(path) in command_line(int(entry.name)) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_bench_load_cli(model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"  # a private copy: any process left using it would be this command's
    shutil.copytree(model_dir, model)
    out = tmp_path / "load.json"
    argv = meshinfer_argv("bench", "load", "--model", str(model), "--servers", "2", "--sessions", "2,1",
                          "--prompt-tokens", "5", "--new-tokens", "4", "--out", str(out))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not wait_gone(_processes_using(model), timeout=10), "bench load left processes running"

    doc = json.loads(out.read_text())
    assert doc["bench"] == "load"
    res = doc["results"]
    assert res["sessions"] == [1, 2] and set(res["levels"]) == {"1", "2"} and len(res["route"]) == 2
    for key, level in res["levels"].items():
        assert level["sessions"] == int(key) and level["tokens"] == 4 * int(key)
        assert level["outputs_identical_to_local"] == int(key)
        assert level["aggregate_decode_tokens_per_s"] > 0
        for figure in ("decode_latency_ms", "time_to_first_token_ms"):
            assert 0 < level[figure]["median"] <= level[figure]["p95"]
    assert res["greedy"] == {"outputs_checked": 3, "outputs_identical": 3, "all_identical": True}
    assert set(res["ratios"]) >= {"aggregate_tokens_per_s_max_over_baseline", "p95_latency_max_over_baseline_median",
                                  "target_aggregate_speedup", "target_latency_ratio"}
    assert res["ratios"]["baseline_sessions"] == 1 and res["ratios"]["max_sessions"] == 2
    assert len(res["server_info"]) == 2
