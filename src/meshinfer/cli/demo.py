"""``meshinfer demo``: a real swarm on this machine splitting a real model, answering a question through it.

Contract: the guided tour of the project on a fresh machine. Resolves ``--model`` (default ``smollm2``:
SmolLM2-135M-Instruct, a real trained model pulled once from the catalogue, ``weights.catalogue``, and read
from its GGUF file; ``tiny`` is the built-in random-weight model), starts a bootstrap peer and ``--servers``
block servers as separate processes on 127.0.0.1 (``testing.swarm.LocalSwarm``, blocks split evenly with
``bench.swarm.even_spans``: 30 blocks -> 0:10, 10:20, 20:30; ``--quant`` makes them hold int8/int4 weights),
prints the swarm table (``cli.swarm``'s ``swarm_doc``/``print_tables``) and the route the client plans,
streams a greedy answer to ``--prompt`` through the swarm (``DistributedModel``; rendered with the model's chat
template when it has one, unless ``--no-chat``), runs the same prompt on the local engine (``LocalModel``,
same quant mode) and says "identical to local engine: yes/no" (exit 1 when not), prints timings, and stops
everything. Every process it started, p2p daemons included, is stopped by PID and checked
gone, on success, on error, on Ctrl-C (SIGINT; exit 130) and on SIGTERM. ``--json`` prints one JSON
object instead of the tour. This process and each server use one torch thread (a fair comparison,
and no oversubscription of a small machine). Imports torch and the network only inside ``main``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshinfer.cli.args import add_command
from meshinfer.errors import ConfigError

DEMO_MODEL = "smollm2"
DEMO_QUESTION = "What is the capital of France, and what is it known for?"
TINY_PROMPT = "The lighthouse keeper climbed the tower and"
DEMO_THREADS = 1
"""torch threads of the demo process and of each server."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "demo", main,
        help="run the demo: a real model split across a local swarm of 3 servers answering a question",
        description="Start a bootstrap peer and block servers on 127.0.0.1 that split a real model (SmolLM2-135M-"
                    "Instruct, pulled once), ask it a question through them, check the tokens against the local "
                    "engine, and shut down.",
    )
    parser.add_argument("--model", default=DEMO_MODEL, metavar="MODEL",
                        help=f"the model (default: {DEMO_MODEL}); 'tiny' is the built-in random-weight model; "
                             "also a checkpoint directory, a .gguf file or another catalogue name")
    parser.add_argument("--prompt", default=None,
                        help=f"the question (default: {DEMO_QUESTION!r}; for a model without a chat template, "
                             f"or with --no-chat, the text to continue, default {TINY_PROMPT!r})")
    parser.add_argument("--no-chat", action="store_true",
                        help="continue --prompt as plain text instead of asking it through the chat template")
    parser.add_argument("--quant", default="none", metavar="MODE",
                        help="how the servers (and the local engine compared with) hold their weights: "
                             "none, int8 or int4 (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="how many tokens to generate at most (default: 64)")
    parser.add_argument("--servers", type=int, default=3, metavar="N",
                        help="block servers splitting the model's blocks evenly (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the guided tour")


class Tour:
    """Prints the numbered steps of the tour (nothing in ``--json`` mode)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.step = 0
        self.midline = False

    def say(self, text: str = "", *, numbered: bool = False) -> None:
        if self.quiet:
            return
        if self.midline:  # streamed text was cut short (Ctrl-C): start on a fresh line
            print(flush=True)
            self.midline = False
        if numbered:
            self.step += 1
            text = f"{self.step}. {text}"
        print(text if numbered or not text else f"   {text}", flush=True)


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:6]}…{peer_id[-6:]}"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (so cleanup runs) while the demo runs."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while shutting down, so a second Ctrl-C cannot leave orphans behind."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while joining the swarm (a second or so), then act on them: a peer
    interrupted half way through its start-up can leave its daemon behind until this process exits."""
    received: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.servers < 1:
        raise ConfigError(f"--servers must be >= 1, got {args.servers}")
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt must not be empty")
    from meshinfer.types import check_quant

    args.quant = check_quant(args.quant)


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    from meshinfer.bench.swarm import even_spans
    from meshinfer.cli.generate import model_display_name, resolve_model_dir
    from meshinfer.models.spec import ModelSpec

    path = resolve_model_dir(args.model)  # pulls a catalogue model on first use (pip prints its progress)
    spec = ModelSpec.from_dir(path)
    spans = even_spans(spec.num_blocks, args.servers)  # ConfigError for more servers than blocks
    with _sigterm_as_interrupt():
        return _run(args, path, model_display_name(args.model, path), spec, spans, Tour(args.json))


def _describe(name: str, path: Path, spec: Any) -> str:
    params = spec.param_count()
    what = (f"{name}: {spec.family} architecture, {spec.num_blocks} blocks, hidden size {spec.hidden_size}, "
            f"{params / 1e6:.1f}M parameters")
    gguf = path / "model.gguf"
    if gguf.exists():
        return what + f", trained weights read from {gguf.resolve().name}"
    if path.name.startswith("demo-") or "checkpoints" in path.parts:
        return what + ", random weights (its text is gibberish by design)"
    return what


def _run(args: argparse.Namespace, path: Path, name: str, spec: Any, spans: list[Any], tour: Tour) -> int:
    import torch

    from meshinfer.testing.procs import descendants_of, wait_gone
    from meshinfer.testing.swarm import LocalSwarm

    torch.set_num_threads(DEMO_THREADS)
    doc: dict[str, Any] = {"model": name, "model_dir": str(path), "quant": args.quant,
                           "max_new_tokens": args.max_new_tokens, "blocks": [str(s) for s in spans]}
    tour.say(_describe(name, path, spec), numbered=True)
    tour.say(f"checkpoint ready: {path}")

    tour.say(f"starting a bootstrap peer and {len(spans)} block server(s) (blocks "
             f"{', '.join(map(str, spans))}{'' if args.quant == 'none' else ', weights in ' + args.quant}), "
             "each a separate process on 127.0.0.1...", numbered=True)
    swarm = LocalSwarm(path, spans, torch_threads=DEMO_THREADS,
                       server_args=["--quant", args.quant, "--model-name", name])
    held: dict[str, Any] = {}  # the client, once joined (closed in the finally clause)
    try:
        _generate(args, path, name, swarm, tour, doc, held)
        return int(doc["exit_code"])
    finally:
        with _uninterruptible():
            tour.say("shutting down: client, servers, bootstrap peer...", numbered=True)
            started = descendants_of(os.getpid())  # servers, bootstrap, p2p daemons (ours and theirs)
            if "client" in held:
                held["client"].close()
            swarm.stop()
            left = wait_gone(started, timeout=10.0)
            tour.say((f"stopped {len(started)} process(es) (p2p daemons included); " if started else "")
                     + (f"STILL RUNNING: {left}" if left else "none left running"))
            doc["processes_stopped"], doc["processes_left"] = len(started), left
            if args.json and "exit_code" in doc:
                print(json.dumps(doc, ensure_ascii=False), flush=True)


def _prompt(args: argparse.Namespace, tokenizer: Any) -> tuple[str, list[int] | None, frozenset[int] | None]:
    """(text shown, prompt ids or None to tokenise the text, stop ids or None for the model's eos)."""
    from meshinfer.cli.chat import Conversation
    from meshinfer.models.detokenize import chat_stop_ids

    if args.no_chat or not getattr(tokenizer, "chat_template", None):
        return args.prompt or TINY_PROMPT, None, None
    question = args.prompt or DEMO_QUESTION
    ids = Conversation(tokenizer, 1 << 30, args.max_new_tokens).encode([{"role": "user", "content": question}])
    return question, ids, chat_stop_ids(tokenizer)


def _generate(args: argparse.Namespace, path: Path, name: str, swarm: Any, tour: Tour, doc: dict[str, Any],
              held: dict[str, Any]) -> None:
    """Steps 2 (rest) to 6 of the tour; fills ``doc`` (``exit_code`` last)."""
    import asyncio

    from meshinfer.cli.generate import run_generation
    from meshinfer.cli.swarm import print_tables, read_doc
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.config import P2PConfig, SamplingConfig
    from meshinfer.models.engine import LocalModel
    from meshinfer.models.generator import GenerationParams

    t0 = time.perf_counter()
    swarm.start()
    swarm_s = time.perf_counter() - t0
    tour.say(f"swarm ready in {swarm_s:.1f} s; others could join it with --initial-peers {swarm.initial_peers[0]}")
    for server in swarm.servers:
        tour.say(f"  pid {server.pid}: blocks {server.span}, peer {_short(server.peer_id)}, "
                 f"{server.info.get('throughput', 0):.0f} tokens/s measured at start-up")

    with _deferred_interrupts():
        table = asyncio.run(read_doc(P2PConfig(initial_peers=tuple(swarm.initial_peers)), 5.0))
    doc["swarm"] = table
    if not tour.quiet:
        from rich.console import Console

        tour.say("the swarm, as `meshinfer swarm --initial-peers ...` shows it (read from the DHT):", numbered=True)
        print_tables(table, Console() if sys.stdout.isatty() else Console(width=120))

    t1 = time.perf_counter()
    config = ClientConfig(quant=args.quant)
    with _deferred_interrupts():
        remote = held["client"] = DistributedModel.from_pretrained(path, swarm.initial_peers, dtype="float32",
                                                                   model_name=name, config=config)
    join_s = time.perf_counter() - t1
    tokenizer = remote.tokenizer  # load it now, so that the generation below streams from its first token
    shown, prompt_ids, stops = _prompt(args, tokenizer)
    doc["prompt"], doc["chat"] = shown, prompt_ids is not None
    route = remote.plan()
    tour.say("route planned by the client (embeddings, final norm and LM head stay on this machine):",
             numbered=True)
    tour.say("this machine -> " + " -> ".join(f"{hop.span} on {_short(hop.peer_id)}" for hop in route)
             + " -> this machine (each server pushes its output straight to the next one)")

    params = GenerationParams(args.max_new_tokens, SamplingConfig(), stops)
    what = "answer" if prompt_ids is not None else "continuation"
    tour.say(f"greedy {what} of up to {args.max_new_tokens} tokens through the swarm, streamed as it comes:",
             numbered=True)
    if not tour.quiet:
        sys.stdout.write("\n" + (f"user> {shown}\nassistant> " if prompt_ids is not None else shown))
        sys.stdout.flush()
        tour.midline = True
    got = run_generation(remote, shown, params, out=None if tour.quiet else sys.stdout, prompt_ids=prompt_ids)
    tour.midline = False
    route = remote.last_route or route  # the route the generation took
    doc["route"] = [{"peer_id": hop.peer_id, "blocks": str(hop.span)} for hop in route]
    if not tour.quiet:
        print("\n", flush=True)

    t2 = time.perf_counter()
    local = LocalModel.from_pretrained(path, dtype="float32", quant=args.quant, head_quant="none")  # as the client
    local_load_s = time.perf_counter() - t2
    run_generation(local, shown, params, out=None, prompt_ids=prompt_ids)  # warm-up
    ref = run_generation(local, shown, params, out=None, prompt_ids=prompt_ids)
    identical = got.generated_token_ids == ref.generated_token_ids
    tour.say(f"the same prompt on the local engine (all {remote.spec.num_blocks} blocks in this process):",
             numbered=True)
    tour.say(f"identical to local engine: {'yes' if identical else 'no'} "
             f"({len(got.generated_token_ids)} tokens through the swarm, {len(ref.generated_token_ids)} locally)")

    timings = {"swarm_startup_s": swarm_s, "client_join_s": join_s, "local_load_s": local_load_s,
               "swarm": got.timings, "local": ref.timings}
    doc.update(text=got.text, generated_token_ids=got.generated_token_ids,
               local_token_ids=ref.generated_token_ids, identical_to_local=identical, timings=timings)
    tour.say("timings:", numbered=True)
    tour.say(f"start-up: swarm {swarm_s:.1f} s, client join {join_s:.2f} s, local engine load {local_load_s:.2f} s")
    tour.say("time to first token: " + _versus(got.timings, ref.timings, "time_to_first_token_s", 1000, "ms"))
    tour.say("decode: " + _versus(got.timings, ref.timings, "decode_tokens_per_s", 1, "tokens/s")
             + " (one compute thread per process; `meshinfer bench swarm` and `bench quant` measure more)")
    doc["exit_code"] = 0 if identical else 1


def _versus(swarm: dict[str, float], local: dict[str, float], key: str, scale: float, unit: str) -> str:
    if key not in swarm or key not in local:
        return "n/a (too few tokens)"
    return f"swarm {swarm[key] * scale:.1f} {unit}, local {local[key] * scale:.1f} {unit}"
