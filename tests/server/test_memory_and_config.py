"""Pure server logic: KV memory admission, step checks and server config validation (no processes)."""

from __future__ import annotations

import pytest

from meshinfer.errors import ConfigError, UsageError
from meshinfer.server.config import ServerConfig
from meshinfer.server.memory import MemoryBudget, Overloaded
from meshinfer.server.session import Session, SessionError, StepKind, check_step
from meshinfer.types import BlockRange
from meshinfer.wire.messages import ErrorCode, Step
from meshinfer.wire.tensor import Tensor


def test_budget_reserves_and_releases() -> None:
    budget = MemoryBudget(cache_tokens=1000, max_sessions=3)
    budget.reserve("a", 400)
    budget.reserve("b", 500)
    assert (budget.tokens_left, budget.sessions) == (100, 2)
    with pytest.raises(Overloaded, match="asks for 200 tokens, 100 of 1000 left"):
        budget.reserve("c", 200)
    assert (budget.tokens_left, budget.sessions) == (100, 2)  # a refusal reserves nothing
    assert budget.release("a") == 400
    assert budget.release("a") == 0  # idempotent: close after disconnect is harmless
    budget.reserve("c", 200)
    budget.reserve("d", 10)
    with pytest.raises(Overloaded, match="limit of 3 open sessions"):
        budget.reserve("e", 1)
    for sid in ("b", "c", "d"):
        budget.release(sid)
    assert (budget.tokens_left, budget.sessions) == (1000, 0)


def test_budget_rejects_nonsense() -> None:
    budget = MemoryBudget(cache_tokens=10, max_sessions=1)
    with pytest.raises(ConfigError):
        budget.reserve("a", 0)
    budget.reserve("a", 5)
    with pytest.raises(UsageError, match="already"):
        budget.reserve("a", 1)
    with pytest.raises(ConfigError):
        MemoryBudget(cache_tokens=0, max_sessions=1)


class _NoOutbox:
    async def send(self, msg: object) -> None:
        raise AssertionError("not used")


def _session(**kw: object) -> Session:
    return Session("s1", BlockRange(0, 2), max_length=16, dtype="float32", outbox=_NoOutbox(), **kw)  # type: ignore[arg-type]


def _step(step_id: int = 0, position: int = 0, shape: tuple[int, ...] = (3, 8), dtype: str = "float32",
          session_id: str = "s1") -> Step:
    n = 1
    for d in shape:
        n *= d
    itemsize = 4 if dtype == "float32" else 2
    return Step(session_id=session_id, step_id=step_id, position=position,
                hidden=Tensor(dtype=dtype, shape=list(shape), data=bytes(n * itemsize)))


@pytest.mark.parametrize(("step", "code", "text"), [
    (_step(session_id="other"), ErrorCode.UNKNOWN_SESSION, "not other"),
    (_step(dtype="float16"), ErrorCode.BAD_REQUEST, "float16"),
    (_step(shape=(1, 3, 8)), ErrorCode.BAD_REQUEST, "shape [tokens, 8]"),
    (_step(shape=(3, 9)), ErrorCode.BAD_REQUEST, "hidden size 9"),
    (_step(shape=(0, 8)), ErrorCode.BAD_REQUEST, "at least one token"),
    (_step(shape=(5, 8)), ErrorCode.LIMIT_EXCEEDED, "limit of 4 per step"),
    (_step(position=14), ErrorCode.LIMIT_EXCEEDED, "max length 16"),
])
def test_check_step_refuses(step: Step, code: str, text: str) -> None:
    with pytest.raises(SessionError, match=text.replace("[", r"\[")) as info:
        check_step(_session(), step, hidden_size=8, max_step_tokens=4)
    assert info.value.code == code


def test_check_step_classifies_repeats() -> None:
    session = _session()
    assert check_step(session, _step(0), hidden_size=8, max_step_tokens=4) is StepKind.NEW
    session.queued_ids.add(0)
    assert check_step(session, _step(0), hidden_size=8, max_step_tokens=4) is StepKind.IN_FLIGHT
    session.queued_ids.clear()
    session.last_step_id, session.last_output = 5, _step().hidden
    assert check_step(session, _step(5, position=3), hidden_size=8, max_step_tokens=4) is StepKind.REPEAT
    assert check_step(session, _step(6, position=3), hidden_size=8, max_step_tokens=4) is StepKind.NEW
    with pytest.raises(SessionError, match="older than the last computed step 5"):
        check_step(session, _step(4), hidden_size=8, max_step_tokens=4)


def test_server_config_validation() -> None:
    cfg = ServerConfig(model="m", blocks="0:2", dtype="bf16")
    assert cfg.dtype == "bfloat16" and cfg.span == BlockRange(0, 2)
    for kwargs, text in [
        (dict(blocks="0:2"), "--model is required"),
        (dict(model="m", blocks="0:2", num_blocks=2), "exclude each other"),
        (dict(model="m", blocks="2:1"), "invalid block range"),
        (dict(model="m", blocks="x"), "expected START:END"),
        (dict(model="m", blocks="0:2", dtype="int8"), "unknown dtype"),
        (dict(model="m", blocks="0:2", cache_tokens=0), "--cache-tokens"),
        (dict(model="m", blocks="0:2", torch_threads=-1), "--torch-threads"),
        (dict(model="m", blocks="0:2", announce_ttl=5, announce_refresh=10), "shorter than"),
    ]:
        with pytest.raises(ConfigError, match=text):
            ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_budget_per_peer_limits_name_the_limit() -> None:
    from meshinfer.server.memory import PeerLimits

    budget = MemoryBudget(cache_tokens=1000, max_sessions=10, per_peer=PeerLimits(sessions=2, tokens=500))
    budget.reserve("a1", 200, "A")
    budget.reserve("a2", 200, "A")
    with pytest.raises(Overloaded, match=r"peer A has 2 open sessions here \(limit --max-sessions-per-peer 2\)"):
        budget.reserve("a3", 10, "A")
    budget.release("a2")
    with pytest.raises(Overloaded, match=r"holds 200 KV tokens .* 400 more \(limit --max-kv-tokens-per-peer 500"):
        budget.reserve("a3", 400, "A")
    budget.reserve("b1", 500, "B")  # another peer is not held back by A
    assert budget.peer_usage("A") == (1, 200) and budget.peer_usage("B") == (1, 500)
    for sid in ("a1", "b1", "a2"):
        budget.release(sid)
    assert budget.peer_usage("A") == (0, 0) and budget.tokens_left == 1000 and not budget._peer_tokens


def test_server_config_per_peer_defaults_and_checks() -> None:
    from meshinfer.server.device import open_device

    cfg, _ = open_device(ServerConfig(model="m", blocks="0:2", device="cpu"))  # the KV budget as a started server's
    assert (cfg.peer_sessions, cfg.peer_tokens, cfg.max_queued_steps_per_peer) == (16, 8192, 256)
    cfg = ServerConfig(model="m", blocks="0:2", max_sessions=1, cache_tokens=100, max_kv_tokens_per_peer=0.25)
    assert (cfg.peer_sessions, cfg.peer_tokens) == (1, 25)
    assert ServerConfig(model="m", max_kv_tokens_per_peer=3000, max_sessions_per_peer=3).peer_tokens == 3000
    for bad, flag in [(dict(max_kv_tokens_per_peer=0), "--max-kv-tokens-per-peer"),
                      (dict(max_kv_tokens_per_peer=1.5), "--max-kv-tokens-per-peer"),
                      (dict(max_kv_tokens_per_peer=float("nan")), "--max-kv-tokens-per-peer"),
                      (dict(max_sessions_per_peer=0), "--max-sessions-per-peer"),
                      (dict(max_queued_steps_per_peer=0), "--max-queued-steps-per-peer")]:
        with pytest.raises(ConfigError, match=flag):
            ServerConfig(model="m", **bad)  # type: ignore[arg-type]
