"""A DISHONEST block server, for tests of audits, evidence and reputation: ``meshinfer serve`` with its compute lying.

Contract: ``python -m meshinfer.testing.dishonest --mode MODE [--rate R] [--scale S] [--sigma X]
[--skip-block I] [--seed N] -- <meshinfer serve args>`` patches the compute of THIS process only (the
``BlockSpan`` / ``TransformerBlock`` classes), prints one line on stderr saying the server is dishonest
and how, then runs the ordinary ``meshinfer serve`` code path unchanged (``runpy`` of ``meshinfer.cli.main``,
exactly what ``python -m meshinfer.cli.main serve ...`` runs). The server code knows nothing of it: no
flag, environment variable or config field of the normal CLI can enable any of this; only this module's
entry point does. Modes (``DishonestConfig``):

* ``noise``: a fraction ``rate`` (default 0.25) of span calls (one step, or one piece of a chunked
  prefill) get ``N(0, (sigma * rms_p)^2)`` added to every element of output position p (rms over H).
* ``scale``: every output is multiplied by ``1 + scale`` (default 0.01: hides in per-position noise).
* ``skip-block``: block ``skip_block`` of the span computes the identity (its KV cache is never
  written); decode graph compilation is disabled so no compiled path bypasses the patch.
* ``wrong``: every output is replaced by N(0, rms_p^2) noise (right per-position rms, no information).
* ``load``: like ``noise`` (``rate`` default 1.0) but only on turns that batch >= 2 sessions
  (``BlockSpan.forward_batch`` with >= 2 non-empty items): a liar under load, honest when probed alone.

Randomness is deterministic: each call's draws come from a generator seeded by (``seed``, mode, the
call's input bytes), so the same input gets the same lie whatever ran before (start-up throughput
measurements, other sessions, thread timing) -- replays of a lying step lie the same way.
``meshinfer.testing.swarm.LocalSwarm`` starts such servers (``dishonest=`` of ``add_server``).
"""

from __future__ import annotations

import argparse
import hashlib
import runpy
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meshinfer.errors import ConfigError

MODES = ("noise", "scale", "skip-block", "wrong", "load")
DEFAULT_RATE = {"noise": 0.25, "load": 1.0}
"""Fraction of span calls that lie, per mode that samples (the others always lie)."""


@dataclass(frozen=True)
class DishonestConfig:
    """How a dishonest server lies (see the module docstring for each mode)."""

    mode: str
    rate: float | None = None
    """Fraction of calls that get noise (``noise``: default 0.25; ``load``: default 1.0, of batched turns)."""
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
            "noise": f"adds N(0, ({self.sigma:g} * rms)^2) noise to {self.effective_rate:.0%} of its span calls",
            "scale": f"multiplies every output by {1 + self.scale:g}",
            "skip-block": f"block {'(first of span)' if self.skip_block is None else self.skip_block} computes "
                          "the identity",
            "wrong": "replaces every output by random noise of the right rms",
            "load": f"adds N(0, ({self.sigma:g} * rms)^2) noise to {self.effective_rate:.0%} of the outputs of "
                    "turns batching >= 2 sessions",
        }[self.mode]
        return f"DISHONEST server (meshinfer.testing.dishonest, mode {self.mode}, seed {self.seed}): {how}"


# ---- the lies (pure functions of output, input and config) -----------------------------------------------


def _generator(config: DishonestConfig, hidden: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by (seed, mode, the input's bytes): the same input always gets the same draws."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{config.seed}:{config.mode}:{tuple(hidden.shape)}:".encode())
    digest.update(hidden.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


def _rms(x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., 1] float32
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


def add_noise(output: torch.Tensor, hidden: torch.Tensor, config: DishonestConfig) -> torch.Tensor:
    """``output`` [..., H] + N(0, (sigma * rms_p)^2) with probability ``rate`` (else unchanged)."""
    gen = _generator(config, hidden)
    if float(torch.rand((), generator=gen)) >= config.effective_rate:
        return output
    z = torch.randn(output.shape, generator=gen, dtype=torch.float32).to(output.device)  # [..., H]
    return (output.float() + config.sigma * _rms(output) * z).to(output.dtype)


def lie(output: torch.Tensor, hidden: torch.Tensor, config: DishonestConfig) -> torch.Tensor:
    """What the dishonest span returns for one call (``noise``/``scale``/``wrong``) given the honest ``output``."""
    if config.mode == "noise":
        return add_noise(output, hidden, config)
    if config.mode == "scale":
        return (output.float() * (1.0 + config.scale)).to(output.dtype)
    if config.mode == "wrong":
        z = torch.randn(output.shape, generator=_generator(config, hidden), dtype=torch.float32).to(output.device)
        return (z * _rms(output)).to(output.dtype)
    return output


# ---- patching this process's compute ----------------------------------------------------------------------

_state = threading.local()
_installed: list[DishonestConfig] = []


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

    def lying_forward(self: BlockSpan, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = forward(self, hidden, *args, **kwargs)  # [B, T, H]
        if _in_batch() or config.mode == "load" or hidden.shape[1] == 0:
            return output  # forward_batch lies for its items; ``load`` lies only on batched turns
        with torch.inference_mode():
            return lie(output, hidden, config)

    def lying_forward_batch(self: BlockSpan, items: Sequence[tuple[torch.Tensor, Any]]) -> list[torch.Tensor]:
        _state.in_batch = True
        try:
            outputs = forward_batch(self, items)  # [T_i, H] each
        finally:
            _state.in_batch = False
        live = [i for i, (hidden, _) in enumerate(items) if hidden.shape[0] > 0]
        if config.mode == "load" and len(live) < 2:
            return outputs
        with torch.inference_mode():
            for i in live:
                hidden = items[i][0]
                outputs[i] = add_noise(outputs[i], hidden, config) if config.mode == "load" \
                    else lie(outputs[i], hidden, config)
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
    parser.add_argument("--rate", type=float, default=None, help="fraction of calls that lie (noise 0.25, load 1.0)")
    parser.add_argument("--scale", type=float, default=0.01, help="scale mode: outputs times 1 + SCALE")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise std relative to each position's rms")
    parser.add_argument("--skip-block", type=int, default=None, help="skip-block: this block is the identity")
    parser.add_argument("--seed", type=int, default=0, help="seeds every draw (with the call's input bytes)")
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
