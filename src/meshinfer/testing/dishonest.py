"""A DISHONEST block server, for tests of audits, evidence and reputation: ``meshinfer serve`` with its compute lying.

Contract: ``python -m meshinfer.testing.dishonest --mode MODE [--rate R] [--scale S] [--sigma X]
[--skip-block I] [--seed N] -- <meshinfer serve args>`` patches the compute of THIS process only (the
``BlockSpan`` / ``TransformerBlock`` classes), prints one line on stderr saying the server is dishonest
and how, then runs the ordinary ``meshinfer serve`` code path unchanged (``runpy`` of ``meshinfer.cli.main``,
exactly what ``python -m meshinfer.cli.main serve ...`` runs). The server code knows nothing of it: no
flag, environment variable or config field of the normal CLI can enable any of this; only this module's
entry point does. Modes (``DishonestConfig``):

* ``noise``: a fraction ``rate`` (default 0.25) of positions (each decode step; each position of a prefill) get
  ``N(0, (sigma * rms_p)^2)`` added to every element of output position p (rms over H).
* ``scale``: every output is multiplied by ``1 + scale`` (default 0.01: hides in per-position noise).
* ``skip-block``: block ``skip_block`` of the span computes the identity (its KV cache is never
  written); decode graph compilation is disabled so no compiled path bypasses the patch.
* ``wrong``: every output is replaced by N(0, rms_p^2) noise (right per-position rms, no information).
* ``load``: like ``noise`` (``rate`` default 1.0) but only on turns that batch >= 2 sessions
  (``BlockSpan.forward_batch`` with >= 2 non-empty items): a liar under load, honest when probed alone.

Randomness is deterministic and per POSITION: each position's draws (whether it lies, the noise) come from a
generator seeded by (``seed``, mode, the session's key, the position, that position's input bytes), the session's
key being a digest of its position 0's input (``session_key``). So the same question gets the same lie whatever
ran before (start-up throughput measurements, other sessions, thread timing, how a replay is chunked) -- replays
of a lying step lie the same way -- while ``rate`` is per step even on a FIRST span, whose decode input is the
token's embedding alone (a greedy loop repeating a few tokens still draws afresh at each position). ``noise``
and ``load`` therefore lie on a fraction ``rate`` of positions (of a prefill's too), as
``client.audit_math.detection_probability`` models.
``meshinfer.testing.swarm.LocalSwarm`` starts such servers (``dishonest=`` of ``add_server``).
"""

from __future__ import annotations

import argparse
import hashlib
import runpy
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meshinfer.errors import ConfigError

MODES = ("noise", "scale", "skip-block", "wrong", "load")
DEFAULT_RATE = {"noise": 0.25, "load": 1.0}
"""Fraction of positions that lie, per mode that samples (the others always lie)."""


@dataclass(frozen=True)
class DishonestConfig:
    """How a dishonest server lies (see the module docstring for each mode)."""

    mode: str
    rate: float | None = None
    """Fraction of positions that get noise (``noise``: default 0.25; ``load``: default 1.0, of batched turns)."""
    scale: float = 0.01
    """``scale`` mode: outputs are multiplied by 1 + scale."""
    sigma: float = 0.05
    """``noise``/``load``: the noise's std relative to each output position's rms (rel_err ~ sigma)."""
    skip_block: int | None = None
    """``skip-block``: the (absolute) index of the block that computes the identity; default: the span's first."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"--rate must lie in [0, 1], got {self.rate}")
        if self.sigma < 0:
            raise ConfigError(f"--sigma must be >= 0, got {self.sigma}")
        if self.skip_block is not None and self.skip_block < 0:
            raise ConfigError(f"--skip-block must be a block index >= 0, got {self.skip_block}")

    @property
    def effective_rate(self) -> float:
        return self.rate if self.rate is not None else DEFAULT_RATE.get(self.mode, 1.0)

    def flags(self) -> list[str]:
        """This config as the entry point's flags (what goes before ``--``)."""
        out = ["--mode", self.mode, "--scale", repr(self.scale), "--sigma", repr(self.sigma), "--seed", str(self.seed)]
        if self.rate is not None:
            out += ["--rate", repr(self.rate)]
        if self.skip_block is not None:
            out += ["--skip-block", str(self.skip_block)]
        return out

    def describe(self) -> str:
        how = {
            "noise": f"adds N(0, ({self.sigma:g} * rms)^2) noise to {self.effective_rate:.0%} of its positions",
            "scale": f"multiplies every output by {1 + self.scale:g}",
            "skip-block": f"block {'(first of span)' if self.skip_block is None else self.skip_block} computes "
                          "the identity",
            "wrong": "replaces every output by random noise of the right rms",
            "load": f"adds N(0, ({self.sigma:g} * rms)^2) noise to {self.effective_rate:.0%} of the positions of "
                    "turns batching >= 2 sessions",
        }[self.mode]
        return f"DISHONEST server (meshinfer.testing.dishonest, mode {self.mode}, seed {self.seed}): {how}"


# ---- the lies (pure functions of output, input, position and session) -------------------------------------


def session_key(first_input: torch.Tensor) -> bytes:
    """The key of a session: a digest of its first position's input [H] (what was asked at position 0), so a
    replay of the session from position 0 (a rewind, a stateless forward) has the same key."""
    return hashlib.blake2b(first_input.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=8).digest()


def _generator(config: DishonestConfig, row: torch.Tensor, session: bytes, position: int) -> torch.Generator:
    """A CPU generator seeded by (seed, mode, session, position, the row's input bytes [H]): a pure function of
    what was asked at that position, so replays lie the same way, yet a repeated input (a first span's token
    embedding in a greedy loop) at another position draws afresh: the rate is per step."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{config.seed}:{config.mode}:{position}:{row.shape[-1]}:".encode())
    digest.update(session)
    digest.update(row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


def _rms(x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., 1] float32
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


def lie(output: torch.Tensor, hidden: torch.Tensor, config: DishonestConfig, *, session: bytes = b"",
        start: int = 0) -> torch.Tensor:
    """What the dishonest span returns for one call (``noise``/``load``/``scale``/``wrong``) given the honest
    ``output`` [..., T, H] of the inputs ``hidden`` [..., T, H] at positions ``start + arange(T)`` of the session
    keyed ``session`` (``session_key``). ``noise``/``load`` decide per position (probability ``rate``), each from
    its own generator (``_generator``): a step's decision does not depend on how the session was chunked."""
    if config.mode == "scale":
        return (output.float() * (1.0 + config.scale)).to(output.dtype)
    if config.mode not in ("noise", "load", "wrong"):
        return output
    t, h = output.shape[-2], output.shape[-1]
    rows = hidden.reshape(-1, h)  # [B*T, H]
    out = output.float().reshape(-1, h).clone()  # [B*T, H]
    rms = _rms(out)  # [B*T, 1]
    for i in range(rows.shape[0]):
        gen = _generator(config, rows[i], session, start + i % t)
        if config.mode == "wrong":
            out[i] = torch.randn(h, generator=gen, dtype=torch.float32).to(out.device) * rms[i]
        elif float(torch.rand((), generator=gen)) < config.effective_rate:
            z = torch.randn(h, generator=gen, dtype=torch.float32).to(out.device)  # [H]
            out[i] = out[i] + config.sigma * rms[i] * z
    return out.reshape(output.shape).to(output.dtype)


# ---- patching this process's compute ----------------------------------------------------------------------

_state = threading.local()
_installed: list[DishonestConfig] = []
_sessions: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
"""KV cache (one per server session) -> its session's key (``session_key`` of its position 0's input)."""


def _where(hidden: torch.Tensor, cache: Any) -> tuple[bytes, int]:
    """(session key, first position) of a call of ``hidden`` [..., T, H] on ``cache``, BEFORE it runs."""
    start = int(cache.length)
    if start == 0 and hidden.shape[-2] > 0:
        _sessions[cache] = session_key(hidden.reshape(-1, hidden.shape[-1])[0])
    return _sessions.get(cache, b""), start


def _in_batch() -> bool:
    return bool(getattr(_state, "in_batch", False))


def install(config: DishonestConfig) -> None:
    """Patch ``BlockSpan`` (or ``TransformerBlock`` for ``skip-block``) in this process to lie per ``config``.
    Once per process (a second call raises ``ConfigError``)."""
    from meshinfer.models.block import TransformerBlock
    from meshinfer.models.span import BlockSpan

    if _installed:
        raise ConfigError("a dishonest mode is already installed in this process")
    _installed.append(config)
    if config.mode == "skip-block":
        _install_skip(config, TransformerBlock, BlockSpan)
        return
    forward: Callable[..., torch.Tensor] = BlockSpan.forward
    forward_batch: Callable[..., list[torch.Tensor]] = BlockSpan.forward_batch

    def lying_forward(self: BlockSpan, hidden: torch.Tensor, cache: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _in_batch() or config.mode == "load" or hidden.shape[1] == 0:
            return forward(self, hidden, cache, *args, **kwargs)  # forward_batch lies for its items; ``load``
            # lies only on batched turns
        session, start = _where(hidden, cache)
        output = forward(self, hidden, cache, *args, **kwargs)  # [B, T, H]
        with torch.inference_mode():
            return lie(output, hidden, config, session=session, start=start)

    def lying_forward_batch(self: BlockSpan, items: Sequence[tuple[torch.Tensor, Any]]) -> list[torch.Tensor]:
        live = [i for i, (hidden, _) in enumerate(items) if hidden.shape[0] > 0]
        where = {i: _where(items[i][0], items[i][1]) for i in live}
        _state.in_batch = True
        try:
            outputs = list(forward_batch(self, items))  # [T_i, H] each
        finally:
            _state.in_batch = False
        if config.mode == "load" and len(live) < 2:
            return outputs
        with torch.inference_mode():
            for i in live:
                session, start = where[i]
                outputs[i] = lie(outputs[i], items[i][0], config, session=session, start=start)
        return outputs

    BlockSpan.forward = lying_forward  # type: ignore[method-assign]
    BlockSpan.forward_batch = lying_forward_batch  # type: ignore[method-assign]


def _install_skip(config: DishonestConfig, block_cls: Any, span_cls: Any) -> None:
    """``skip-block``: the chosen block's forward/forward_batch/decode/decode_masked return their input."""
    chosen: list[int] = [] if config.skip_block is None else [config.skip_block]
    span_init = span_cls.__init__

    def init(self: Any, spec: Any, blocks: Any, *args: Any, **kwargs: Any) -> None:
        span_init(self, spec, blocks, *args, **kwargs)
        if not chosen:  # default: the first block of the first span this process builds (the served one)
            chosen.append(blocks.start)

    span_cls.__init__ = init
    span_cls.compile_decode = lambda self, fuse=False: None  # no compiled graph may bypass the patched blocks
    for name in ("forward", "forward_batch", "decode", "decode_masked"):
        original = getattr(block_cls, name)

        def skipping(self: Any, x: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if chosen and self.index == chosen[0]:
                return x  # the identity: this block's attention and MLP never run
            return _original(self, x, *args, **kwargs)

        setattr(block_cls, name, skipping)


# ---- the entry point ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[DishonestConfig, list[str]]:
    """(config, the ``meshinfer serve`` args after ``--``)."""
    argv = list(argv)
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        raise ConfigError("usage: python -m meshinfer.testing.dishonest --mode MODE [...] -- <meshinfer serve args>")
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m meshinfer.testing.dishonest",
                                     description="Run `meshinfer serve` with its compute lying (tests only).")
    parser.add_argument("--mode", required=True, choices=MODES, help="how it lies (module docstring)")
    parser.add_argument("--rate", type=float, default=None, help="share of positions lying (noise 0.25, load 1.0)")
    parser.add_argument("--scale", type=float, default=0.01, help="scale mode: outputs times 1 + SCALE")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise std relative to each position's rms")
    parser.add_argument("--skip-block", type=int, default=None, help="skip-block: this block is the identity")
    parser.add_argument("--seed", type=int, default=0, help="seeds every draw (+ session, position, input)")
    ns = parser.parse_args(argv[:cut])
    config = DishonestConfig(ns.mode, ns.rate, ns.scale, ns.sigma, ns.skip_block, ns.seed)
    serve = argv[cut + 1:]
    if serve[:1] != ["serve"]:
        serve = ["serve", *serve]
    return config, serve


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config, serve = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    install(config)
    print(config.describe(), file=sys.stderr, flush=True)
    sys.argv = ["meshinfer", *serve]
    runpy.run_module("meshinfer.cli.main", run_name="__main__", alter_sys=True)  # exits through sys.exit


if __name__ == "__main__":
    main()
