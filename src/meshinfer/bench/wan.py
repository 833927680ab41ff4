"""``meshinfer bench wan``: decode tokens/s and time to first token through a swarm under emulated WAN links.

Contract: per model (the bench checkpoint, and SmolLM2 when it is on this machine: ``--real-model``, never
downloaded here) starts one ``bench.wan_relay.RelayProcess`` and a ``LocalSwarm`` whose ``--servers`` servers
(the blocks split by ``even_spans``) bind fixed ports and announce only their relay's ports (``--announce``,
``--direct-announce``): the client and the servers pushing to each other reach a server only through its
relay, i.e. over one emulated link (the DHT bootstrap is not relayed: control plane only). The servers do not
know they are emulated. For each one-way delay of ``--delays-ms`` (0 always included) with the bandwidth cap
``--bandwidth-mbit`` on every link and direction, the relays are reconfigured in place (same swarm, same
client), one short warm-up runs, then ``--runs`` greedy generations of ``--new-tokens`` tokens, timed as in
``bench swarm`` (time to first token; decode tokens/s = (N - 1) / (total - first), medians).

Physical limit of a token (``wan_link.ring_limit_ms``): the measured ms per token at 0 ms (compute, the servers' and
client's work, serialisation at the cap) plus one ring of one-way delays: client -> server 1 -> ... -> server k ->
client, k + 1 hops with push routes. ``ratio_to_limit`` = limit ms / measured ms (target >= 0.9 at 10 and 50 ms).
``ttft_delays`` = (ttft(d) - ttft(0)) / d: how many one-way delays opening the route and the prefill cost a warm
client; ``time_to_first_token_cold_ms`` / ``ttft_cold_delays``: the same for a fresh client's first generation
(probes, dials, Opens, prefill). ``relay`` gives how late the emulator delivered (its own error, not meshinfer's).
The greedy tokens of every run must equal the local engine's (no network), reported per delay.

Speculation (``--speculation``, default on; ``client.speculative``), side by side in the same run and swarm: at
each delay the same client decodes an EDIT prompt (a passage, an instruction to rewrite it, and its first words
again: text with repetition) ``--runs`` times without and with speculation (``ClientConfig.speculate`` toggled),
giving per delay ``speculation``: both decode rates, ``spec_over_plain`` (target >= 2 at 50 ms), the tokens per
trip (1 + accepted drafts per verify step, over all decode trips), the speculative limit (the plain limit of a
token divided by the tokens per trip: ``wan_link.spec_limit_ms``) and the ratio to it, and whether the greedy tokens
with speculation equal those without and the local engine's. Every process
started (relay, bootstrap, servers) is stopped by PID whatever happens, Ctrl-C included. Imports torch and the
network only inside ``run``; never asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshinfer.bench.wan_link import ring_limit_ms, spec_limit_ms
from meshinfer.errors import ConfigError

DESCRIPTION = "decode tokens/s and time to first token of a 3-server route under emulated one-way delays and a cap"
TARGET_RATIO = 0.9
"""Without speculation: decode tokens/s >= 90% of the physical limit at 10 and 50 ms (issue 21)."""
TARGET_SPEC_RATIO = 2.0
"""With speculation on text with repetition: >= 2x the decode tokens/s of no speculation at 50 ms (issue 21)."""
EDIT_HEAD = "Edit this passage, keeping its words and their order:\n\n"
EDIT_TAIL = "\n\nThe edited passage:\n\n"
EDIT_PASSAGE_TOKENS = 96
"""Tokens of the passage an edit prompt repeats."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the bench checkpoint, built on first use)")
    parser.add_argument("--real-model", default="smollm2", metavar="REF",
                        help="also run this real model when it is on this machine: a catalogue name already "
                             "pulled (never downloaded here), a .gguf file or a checkpoint directory; 'none' "
                             "skips it (default: smollm2)")
    parser.add_argument("--delays-ms", default="0,10,50", metavar="LIST",
                        help="one-way delays per hop in ms, comma-separated; 0 is always added (default: 0,10,50)")
    parser.add_argument("--bandwidth-mbit", type=float, default=50.0,
                        help="bandwidth cap of every link and direction in Mbit/s; 0: none (default: 50)")
    parser.add_argument("--servers", type=int, default=3, help="server processes splitting the blocks (default: 3)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per delay (default: 2)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per run (default: 32)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default: fp32)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="compute threads of each server and of this process (default: 1)")
    parser.add_argument("--speculation", action=argparse.BooleanOptionalAction, default=True,
                        help="also decode an edit prompt (text with repetition) with and without speculative "
                             "decoding, side by side (default: on)")
    parser.add_argument("--draft-tokens", type=int, default=None, metavar="N",
                        help="draft tokens per speculative step (default: the client's, 6)")


def parse_delays(text: str) -> list[float]:
    """``"10,50"`` -> ``[0.0, 10.0, 50.0]``: ascending, 0 added, each in 0..1000 ms; ConfigError otherwise."""
    out = {0.0}
    for part in text.split(","):
        try:
            d = float(part.strip())
        except ValueError:
            raise ConfigError(f"--delays-ms takes comma-separated numbers of ms, got {text!r}") from None
        if not 0.0 <= d <= 1000.0:
            raise ConfigError(f"each --delays-ms value must be in 0..1000, got {d:g}")
        out.add(d)
    return sorted(out)


def _check(args: argparse.Namespace) -> None:
    if args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        raise ConfigError("need --runs >= 1, --prompt-tokens >= 1 and --new-tokens >= 2")
    if args.servers < 1 or args.torch_threads < 1:
        raise ConfigError("need --servers >= 1 and --torch-threads >= 1")
    if args.draft_tokens is not None and not 1 <= args.draft_tokens <= 32:
        raise ConfigError(f"--draft-tokens must be in 1..32, got {args.draft_tokens}")
    if not args.bandwidth_mbit >= 0:
        raise ConfigError(f"--bandwidth-mbit must be >= 0 (0: no cap), got {args.bandwidth_mbit:g}")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def edit_prompt(tokenizer: Any) -> list[int]:
    """A prompt with repetition: an instruction, a passage (``EDIT_PASSAGE_TOKENS`` of the shipped corpus), and
    the start of its edited copy (its first 8 tokens), so the continuation is largely the passage again."""
    from meshinfer.bench.local import prompt_ids

    passage = prompt_ids(tokenizer, EDIT_PASSAGE_TOKENS)
    head = [int(i) for i in tokenizer(EDIT_HEAD)["input_ids"]]
    tail = [int(i) for i in tokenizer(EDIT_TAIL)["input_ids"]]
    return head + passage + tail + passage[:8]


def spec_row(plain: dict[str, Any], spec: dict[str, Any], stats: dict[str, float], limit_ms: float,
             same: bool) -> dict[str, Any]:
    """One delay's speculation figures: ``plain`` and ``spec`` (``summarise_timed`` of the edit prompt without and
    with speculation), ``stats`` (``SpecStats.as_dict`` of the speculative runs), ``limit_ms`` (the plain limit of
    a token at this delay) and whether the greedy tokens agreed."""
    per_trip = float(stats["tokens_per_trip"]) or 1.0
    limit = spec_limit_ms(limit_ms, per_trip)
    return {
        "plain_decode_tokens_per_s": plain["decode_tokens_per_s"],
        "spec_decode_tokens_per_s": spec["decode_tokens_per_s"],
        "spec_over_plain": spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
        "plain_time_to_first_token_ms": plain["time_to_first_token_ms"],
        "spec_time_to_first_token_ms": spec["time_to_first_token_ms"],
        "tokens_per_trip": per_trip,
        "accepted_per_verify_step": (stats["accepted"] / stats["verify_steps"]) if stats["verify_steps"] else 0.0,
        "stats": stats,
        "spec_limit_ms_per_token": limit,
        "spec_limit_tokens_per_s": 1000 / limit,
        "spec_ratio_to_limit": limit / spec["decode_ms_per_token"],
        "greedy_tokens_identical": same,
    }


def real_model_dir(ref: str) -> tuple[Path | None, str]:
    """The checkpoint directory of ``--real-model`` if it is on this machine, else None and why."""
    if ref.strip().lower() == "none":
        return None, "--real-model none"
    from meshinfer.weights import catalogue
    from meshinfer.weights.resolve import local_checkpoint

    if catalogue.is_catalogue_name(ref):
        if catalogue.pulled(ref) is None:
            return None, (f"{ref} is not pulled on this machine (meshinfer models pull {ref}, or give "
                          f"--real-model PATH)")
    try:
        return local_checkpoint(ref), ""
    except ConfigError as e:
        return None, str(e)


@dataclass(frozen=True)
class Timed:
    """One generation: seconds to the first token, to the last token and to the stream's end (the session
    closed), and the tokens."""

    first_s: float
    last_s: float
    end_s: float
    tokens: list[int]


def time_tokens(tokens: Iterable[int]) -> Timed:
    """Consume a token stream, stamping the first token, the last token and the end."""
    out: list[int] = []
    start = time.perf_counter()
    first = last = start
    for token in tokens:
        last = time.perf_counter()
        if not out:
            first = last
        out.append(int(token))
    return Timed(first - start, last - start, time.perf_counter() - start, out)


def summarise_timed(samples: list[Timed], n: int) -> dict[str, Any]:
    """Medians over runs of ``n`` tokens: decode tokens/s between the first and the last token ((n - 1) / that
    time: the tokens a reader sees stream), time to first token, and the teardown after the last token
    (closing the session on every hop; not a decode cost, but the caller waits for it)."""
    decode = [(n - 1) / max(s.last_s - s.first_s, 1e-9) for s in samples]
    return {
        "decode_tokens_per_s": statistics.median(decode),
        "decode_tokens_per_s_runs": [round(d, 2) for d in decode],
        "decode_ms_per_token": 1000 / statistics.median(decode),
        "decode_ms_per_token_mean": 1000 * sum(s.last_s - s.first_s for s in samples) / ((n - 1) * len(samples)),
        "time_to_first_token_ms": 1000 * statistics.median(s.first_s for s in samples),
        "time_to_first_token_ms_runs": [round(1000 * s.first_s, 1) for s in samples],
        "teardown_ms": 1000 * statistics.median(s.end_s - s.last_s for s in samples),
        "total_ms": 1000 * statistics.median(s.end_s for s in samples),
    }


def summarise_rows(rows: dict[float, dict[str, Any]], hops: int) -> None:
    """Add the physical limit, the ratio to it and the first token's cost in delays to each row (in place)."""
    base = rows[0.0]
    for d, row in rows.items():
        limit = ring_limit_ms(base["decode_ms_per_token"], d, hops)
        row["limit_ms_per_token"] = limit
        row["limit_tokens_per_s"] = 1000 / limit
        row["ratio_to_limit"] = limit / row["decode_ms_per_token"]
        row["extra_ms_per_token_over_limit"] = row["decode_ms_per_token"] - limit
        row["ttft_delays"] = ((row["time_to_first_token_ms"] - base["time_to_first_token_ms"]) / d
                              if d > 0 else None)
        if "time_to_first_token_cold_ms" in row:  # a fresh client's first generation, in the same delays
            row["ttft_cold_delays"] = ((row["time_to_first_token_cold_ms"] - base["time_to_first_token_ms"]) / d
                                       if d > 0 else None)


def parts(*, ms_per_token: float, delay_ms: float, hops: int, route_ms: float | None,
          server_ms: list[float | None]) -> dict[str, Any] | None:
    """Where a decode token's mean time goes at one delay: in the client (``ms_per_token - route_ms``: head,
    sampling, bookkeeping), in the servers' steps (arrival to result, from their metrics), and between them
    (``route_ms`` minus the steps: transfers and waits), of which ``hops * delay_ms`` is the emulated ring;
    ``between_beyond_ring_ms`` is what the network part costs beyond the delays (0 on an ideal transport)."""
    if route_ms is None or any(m is None for m in server_ms):
        return None
    steps = sum(m for m in server_ms if m is not None)
    between = route_ms - steps
    return {"client_ms": ms_per_token - route_ms, "route_ms": route_ms, "server_steps_ms": steps,
            "between_servers_ms": between, "ring_delays_ms": hops * delay_ms,
            "between_beyond_ring_ms": between - hops * delay_ms}


def _measure(path: Path, name: str, args: argparse.Namespace, delays: list[float]) -> dict[str, Any]:
    import torch

    from meshinfer.bench.local import prompt_ids
    from meshinfer.bench.swarm import even_spans
    from meshinfer.bench.swarm_parts import per_step_ms, server_decode_seconds
    from meshinfer.bench.wan_relay import RelayProcess, free_port
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.swarm import LocalSwarm
    from meshinfer.types import canonical_dtype

    dtype = canonical_dtype(args.dtype)
    torch.set_num_threads(args.torch_threads)
    local = LocalModel.from_pretrained(path, dtype=dtype)
    n = args.new_tokens
    if local.spec.max_position_embeddings < args.prompt_tokens + n:
        raise ConfigError(f"--prompt-tokens + --new-tokens exceeds {name}'s context")
    spans = even_spans(local.spec.num_blocks, args.servers)
    prompt = prompt_ids(local.tokenizer, args.prompt_tokens)
    reference = time_tokens(local.stream(prompt, n, stop_token_ids=())).tokens
    edit = edit_prompt(local.tokenizer) if args.speculation else []
    edit_reference = time_tokens(local.stream(edit, n, stop_token_ids=())).tokens if edit else []
    if edit and local.spec.max_position_embeddings < len(edit) + n:
        raise ConfigError(f"the edit prompt ({len(edit)} tokens) + --new-tokens exceeds {name}'s context")
    rate = args.bandwidth_mbit * 1e6 / 8
    rows: dict[float, dict[str, Any]] = {}
    spec_rows: dict[float, tuple[dict[str, Any], dict[str, Any], dict[str, float], bool]] = {}
    _note(f"[{name}] starting a relay and {args.servers} servers ({', '.join(map(str, spans))}) behind it...")
    with RelayProcess() as relay, LocalSwarm(path, [], dtype=dtype, torch_threads=args.torch_threads,
                                               server_args=["--metrics-port", "0"]) as swarm:
        for span in spans:
            port, dport = free_port(), free_port()
            rp, rd = relay.listen(port), relay.listen(dport)
            swarm.add_server(span, extra_args=["--port", str(port), "--direct-port", str(dport),
                                               "--announce", f"127.0.0.1:{rp}",
                                               "--direct-announce", f"127.0.0.1:{rd}"])
        plain_config = ClientConfig(push=True, speculate=False)
        spec_config = dataclasses.replace(plain_config, speculate=True, **(
            {} if args.draft_tokens is None else {"draft_tokens": args.draft_tokens}))
        remote = DistributedModel.from_pretrained(path, swarm.initial_peers, dtype=dtype, config=plain_config)
        try:
            for d in delays:
                relay.configure(d, rate)
                _note(f"[{name}] one-way delay {d:g} ms, cap {args.bandwidth_mbit:g} Mbit/s: "
                      f"{args.runs} run(s) of {n} tokens...")
                time_tokens(remote.stream(prompt, min(n, 4), stop_token_ids=()))  # warm-up at this delay
                relay.stats(reset=True)
                urls = [str(s.info.get("metrics_url")) for s in swarm.servers]
                before = [server_decode_seconds(url) for url in urls]
                route_before = (remote.decode_route_s_total, remote.decode_steps_total)
                samples = [time_tokens(remote.stream(prompt, n, stop_token_ids=())) for _ in range(args.runs)]
                row = summarise_timed(samples, n)
                row["parts"] = parts(
                    ms_per_token=row["decode_ms_per_token_mean"], delay_ms=d, hops=len(spans) + 1,
                    route_ms=per_step_ms(route_before, (remote.decode_route_s_total, remote.decode_steps_total)),
                    server_ms=[per_step_ms(b, server_decode_seconds(u)) for b, u in zip(before, urls, strict=True)])
                row["greedy_tokens_identical_to_local"] = all(s.tokens == reference for s in samples)
                row["time_to_first_token_cold_ms"] = _cold_ttft_ms(path, swarm.initial_peers, prompt, dtype)
                row["relay"] = relay.stats(reset=True)
                rows[d] = row
                if edit:
                    _note(f"[{name}] edit prompt ({len(edit)} tokens) without and with speculation...")
                    plain = [time_tokens(remote.stream(edit, n, stop_token_ids=())) for _ in range(args.runs)]
                    remote.config = spec_config
                    before_spec = dataclasses.replace(remote.speculation)
                    try:
                        spec = [time_tokens(remote.stream(edit, n, stop_token_ids=())) for _ in range(args.runs)]
                    finally:
                        remote.config = plain_config
                    stats = dataclasses.replace(remote.speculation)
                    for field in ("trips", "verify_steps", "drafted", "accepted", "tokens"):
                        setattr(stats, field, getattr(stats, field) - getattr(before_spec, field))
                    same = all(s.tokens == edit_reference for s in plain + spec)
                    spec_rows[d] = (summarise_timed(plain, n), summarise_timed(spec, n), stats.as_dict(), same)
            route = [str(hop.span) for hop in remote.last_route]
        finally:
            remote.close()
        addresses = [s.info.get("maddrs") for s in swarm.servers]
    hops = len(route) + 1
    summarise_rows(rows, hops)
    for d, (plain_row, spec_timed, stats, same) in spec_rows.items():
        rows[d]["speculation"] = spec_row(plain_row, spec_timed, stats, rows[d]["limit_ms_per_token"], same)
    return {"model": str(path), "params_millions": round(local.spec.param_count() / 1e6, 1),
            "hidden_size": local.spec.hidden_size, "route": route, "ring_hops": hops,
            "announced_maddrs": addresses, "by_delay_ms": {f"{d:g}": rows[d] for d in delays}}


def _cold_ttft_ms(path: Path, initial_peers: list[str], prompt: list[int], dtype: str) -> float:
    """Time to first token of a fresh client's first generation (its plan's probes, dials, Opens and the prefill;
    the swarm is already warm between servers): what the warm rows do not count."""
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel

    with DistributedModel.from_pretrained(path, initial_peers, dtype=dtype, config=ClientConfig(push=True)) as cold:
        return 1000 * time_tokens(cold.stream(prompt, 2, stop_token_ids=())).first_s


def _table(name: str, result: dict[str, Any]) -> None:
    _note(f"\n{name}: delay/hop | decode tok/s | ms/token | limit ms | ratio | ttft ms | ttft delays | "
          "teardown ms | same tokens")
    for d, row in result["by_delay_ms"].items():
        td = row["ttft_delays"]
        _note(f"  {d:>6} ms | {row['decode_tokens_per_s']:12.2f} | {row['decode_ms_per_token']:8.1f} | "
              f"{row['limit_ms_per_token']:8.1f} | {row['ratio_to_limit']:5.2f} | "
              f"{row['time_to_first_token_ms']:7.0f} | {'-' if td is None else f'{td:.1f}':>11} | "
              f"{row['greedy_tokens_identical_to_local']}")
    for d, row in result["by_delay_ms"].items():
        if "time_to_first_token_cold_ms" in row:
            cd = row.get("ttft_cold_delays")
            cold = row["time_to_first_token_cold_ms"]
            _note(f"  {d:>6} ms | first generation of a fresh client: ttft {cold:.0f} ms"
                  + ("" if cd is None else f" ({cd:.1f} delays over the warm ttft at 0 ms)"))
    spec = {d: row["speculation"] for d, row in result["by_delay_ms"].items() if "speculation" in row}
    if spec:
        _note(f"{name}, edit prompt: delay/hop | plain tok/s | spec tok/s | spec/plain | tokens/trip | "
              "spec limit ms | ratio | same tokens")
        for d, row in spec.items():
            _note(f"  {d:>6} ms | {row['plain_decode_tokens_per_s']:11.2f} | {row['spec_decode_tokens_per_s']:10.2f} | "
                  f"{row['spec_over_plain']:10.2f} | {row['tokens_per_trip']:11.2f} | "
                  f"{row['spec_limit_ms_per_token']:13.1f} | {row['spec_ratio_to_limit']:5.2f} | "
                  f"{row['greedy_tokens_identical']}")


def _spec_at_max_delay(models: dict[str, Any], delays: list[float]) -> dict[str, float]:
    """Per model: speculation's decode speed-up at the largest delay (issue 21's target: >= 2 at 50 ms)."""
    out: dict[str, float] = {}
    for name, result in models.items():
        row = result.get("by_delay_ms", {}).get(f"{max(delays):g}", {})
        if "speculation" in row:
            out[name] = row["speculation"]["spec_over_plain"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from meshinfer.bench.common import bench_model_dir

    _check(args)
    delays = parse_delays(args.delays_ms)
    t0 = time.perf_counter()
    models: dict[str, Any] = {"bench": _measure(bench_model_dir(args.model), "bench", args, delays)}
    real, why = real_model_dir(args.real_model)
    if real is None:
        _note(f"skipping the real model: {why}")
        models[args.real_model] = {"skipped": why}
    else:
        from meshinfer.weights.resolve import display_name

        name = display_name(args.real_model, real)
        models[name] = _measure(real, name, args, delays)
    for name, result in models.items():
        if "by_delay_ms" in result:
            _table(name, result)
    ratios = [row["ratio_to_limit"] for m in models.values() for d, row in m.get("by_delay_ms", {}).items()
              if float(d) > 0]
    return {
        "delays_ms": delays,
        "bandwidth_mbit": args.bandwidth_mbit,
        "servers": args.servers,
        "runs": args.runs,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "torch_threads_per_process": args.torch_threads,
        "speculation": bool(args.speculation),
        "target_spec_over_plain": TARGET_SPEC_RATIO,
        "spec_over_plain_at_max_delay": _spec_at_max_delay(models, delays),
        "target_ratio_to_limit": TARGET_RATIO,
        "min_ratio_to_limit": min(ratios) if ratios else None,
        "models": models,
        "emulator": "userspace TCP relay per server (bench.wan_relay): one-way delay + token-bucket cap per link "
                    "and direction; no loss, jitter or reordering; TCP legs over loopback (no slow start)",
        "wall_s": time.perf_counter() - t0,
        "median_note": "decode and ttft figures are medians over runs" if args.runs > 1 else "one run",
    }
