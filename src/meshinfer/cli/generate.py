"""``meshinfer generate``: run a prompt through a model and stream the continuation to stdout.

Contract: parses and validates every flag (one-line ``ConfigError`` for bad values) before importing
torch; ``--model demo`` means the built-in demo checkpoint. The model is opened by
``open_generator``: ``LocalModel`` (the whole model on this machine), or with ``--initial-peers`` (without them:
the peers ``cli.lan`` finds on this LAN by mDNS within ``--mdns-browse-s``; none found, or ``--no-mdns``: as
before, local) the swarm's ``DistributedModel`` (only embeddings, final norm and LM head here; blocks on servers), which
is closed (leaves the swarm) at the end; both give the same greedy tokens. ``--ignore-eos`` empties the stop set
(exactly ``--max-new-tokens`` tokens, for benchmarks); ``--logit-bias ID=BIAS ...`` is parsed by
``sampling_config`` (shared with ``meshinfer chat``). Both compute on ``--device``
(``ClientConfig.device``, default auto: the first CUDA GPU, else MPS, else the CPU; resolved by ``check_device``
right after the flags, so a device this machine lacks is one line before anything loads) in ``--dtype`` (auto:
fp32 on the CPU, bf16 on CUDA, fp16 on MPS; ``--json`` reports the dtype used). Text is streamed through
``IncrementalDetokenizer`` (from ``meshinfer.models.detokenize``; it and ``text_decoder`` stay importable
from here), which never splits a multi-byte character; ``--json`` prints one JSON object instead (prompt,
prompt_token_ids, generated_token_ids, text, timings; ``route`` via a swarm). Errors from the engine
(unsupported architecture, missing tensors, corrupt files, context overflow) and from the swarm (no route,
unreachable peers, server errors) are ``MeshinferError``s that ``cli.main`` prints as one line. Knows
nothing of block code or of the network itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.cli.lan import add_mdns_flags, lan_peers
from meshinfer.client.config import CLI_SKIP, LOCAL_FIELDS, ClientConfig
from meshinfer.config import SamplingConfig, parse_logit_bias
from meshinfer.errors import ConfigError
from meshinfer.models.detokenize import IncrementalDetokenizer, text_decoder
from meshinfer.models.generator import GenerationParams, TextGenerator
from meshinfer.types import canonical_dtype

DEMO_MODEL = "demo"
TINY_MODELS = ("tiny", DEMO_MODEL)
"""Names of the built-in tiny random-weight model (made on first use, no download): ``tiny`` (``demo`` is kept
as its older name)."""


# ---------------------------------------------------------------------------------------------------
# Running a generation


@dataclass
class GenerationResult:
    prompt: str
    prompt_token_ids: list[int]
    generated_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def resolve_model_dir(model: str) -> Path:
    """The checkpoint directory ``--model`` names: ``tiny`` (or ``demo``) -> the built-in tiny random model (built
    on first use); a directory, a .gguf file (its view) or a catalogue name such as ``smollm2`` (pulled and
    verified on first use) -> ``weights.resolve.local_checkpoint``; a model id or hub name -> itself, fetched
    later from the swarm (needs --initial-peers)."""
    if model.strip().lower() in TINY_MODELS:
        from meshinfer.testing.checkpoints import demo_checkpoint

        return demo_checkpoint()
    from meshinfer.weights.resolve import local_checkpoint

    local = local_checkpoint(model)
    return local if local is not None else Path(model)


def model_display_name(model: str, model_dir: Path) -> str:
    """The name ``--model`` is shown and served under (catalogue name, GGUF stem, directory name)."""
    if model.strip().lower() in TINY_MODELS:
        return model_dir.name
    from meshinfer.weights.resolve import display_name

    return display_name(model, model_dir)


def open_generator(model_dir: Path, dtype: str, initial_peers: Sequence[str] = (),
                   max_download: float | None = None, quant: str = "auto", model_name: str | None = None,
                   head_quant: str | None = None, compile: bool = False,
                   client: ClientConfig | None = None) -> TextGenerator:
    """Open the model that will generate: the swarm's ``DistributedModel`` when ``initial_peers`` are
    given (close it when done; ``client``: its tunables, the arguments before it override theirs; a model id is
    fetched at most ``max_download`` bytes/s; ``quant``: the servers' weights its routes use, ``auto`` the most
    precise mode that covers the model), else a ``LocalModel``
    (``quant``: how it holds its own weights; ``auto`` means ``none`` there). Either computes on ``client.device``
    (default ``auto``) in ``dtype`` (``auto``: the device's default). The rest of this module only uses
    ``TextGenerator``."""
    if client is not None and client.sealed and not initial_peers:
        raise ConfigError("--sealed sends the generation to a swarm's full node: give --initial-peers")
    if initial_peers:
        from meshinfer.client.model import DistributedModel

        if compile:
            raise ConfigError("--compile applies to a model run on this machine; through a swarm the blocks run on "
                              "the servers")
        return DistributedModel.from_pretrained(model_dir, initial_peers, dtype=dtype, config=client,
                                                max_download=max_download, quant=None if quant == "auto" else quant,
                                                model_name=model_name, head_quant=head_quant or "none")
    from meshinfer.models.engine import LocalModel

    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is a model id: give --initial-peers to fetch it from the swarm")
    device = (client or ClientConfig()).device
    return LocalModel.from_pretrained(model_dir, dtype=dtype, device=device,
                                      quant="none" if quant == "auto" else quant, head_quant=head_quant,
                                      compile=compile)


def run_generation(generator: TextGenerator, prompt: str, params: GenerationParams, out: TextIO | None, *,
                   prompt_ids: Sequence[int] | None = None) -> GenerationResult:
    """Tokenise ``prompt`` (unless ``prompt_ids`` are given, e.g. a rendered chat template), generate with
    ``params`` (stop tokens: default the model's eos), and (when ``out`` is given) stream the text to it as it
    comes."""
    tokenizer = generator.tokenizer
    ids = [int(i) for i in (tokenizer(prompt)["input_ids"] if prompt_ids is None else prompt_ids)]
    result = GenerationResult(prompt=prompt, prompt_token_ids=ids)
    detok = IncrementalDetokenizer(text_decoder(tokenizer))
    pieces: list[str] = []
    start = time.perf_counter()
    first = start
    with contextlib.closing(generator.generation(ids, params)) as tokens:
        for scored in tokens:
            token = scored.token
            if not result.generated_token_ids:
                first = time.perf_counter()
            result.generated_token_ids.append(int(token))
            piece = detok.push(int(token))
            if piece:
                pieces.append(piece)
                if out is not None:
                    out.write(piece)
                    out.flush()
    end = time.perf_counter()
    tail = detok.flush()
    pieces.append(tail)
    if out is not None and tail:
        out.write(tail)
        out.flush()
    result.text = "".join(pieces)
    n = len(result.generated_token_ids)
    result.timings = {"total_s": end - start, "time_to_first_token_s": (first - start) if n else 0.0}
    if n:
        result.timings["prefill_tokens_per_s"] = len(ids) / max(first - start, 1e-9)
    if n > 1:
        result.timings["decode_tokens_per_s"] = (n - 1) / max(end - first, 1e-9)
    return result


def describe_timings(result: GenerationResult, load_s: float) -> str:
    t = result.timings
    parts = [f"{len(result.prompt_token_ids)} prompt + {len(result.generated_token_ids)} new tokens",
             f"load {load_s:.2f} s", f"first token {t.get('time_to_first_token_s', 0.0) * 1000:.0f} ms"]
    if "decode_tokens_per_s" in t:
        parts.append(f"decode {t['decode_tokens_per_s']:.1f} tokens/s")
    return "[" + ", ".join(parts) + "]"


# ---------------------------------------------------------------------------------------------------
# CLI


DTYPE_HELP = ("compute dtype: auto (fp32 on the CPU, bf16 on CUDA, fp16 on MPS), fp32, bf16 or fp16 "
              "(default: auto)")
"""``--dtype`` help of the commands that compute on this machine (``generate``, ``chat``, ``api``)."""

MODEL_HELP = ("the model: a Hugging Face checkpoint directory (safetensors), a .gguf file, a catalogue name "
              "(smollm2: a real model, pulled and verified on first use; see `meshinfer models list`), a model id "
              "(fetched from the swarm's seeders) or 'tiny' (the built-in random-weight test model)")


def add_model_flags(parser: argparse.ArgumentParser, *, model_required: bool) -> None:
    kwargs: dict[str, Any] = {"required": True} if model_required else {"default": DEMO_MODEL}
    parser.add_argument("--model", metavar="MODEL", help=MODEL_HELP, **kwargs)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--quant", default="auto", metavar="MODE",
                        help="weights: none, int8 or int4. On this machine: how the model holds its weights "
                             "(auto = none). Through a swarm: which servers' weights a route uses, one mode per "
                             "route (auto = the most precise mode that covers the model)")
    parser.add_argument("--compile", action="store_true",
                        help="run decode steps of a model run on this machine as torch.compile graphs (faster, "
                             "above all with small blocks and int4; the first generation waits for the compiler: "
                             "tens of seconds, cached on disk; needs a C++ compiler)")
    parser.add_argument("--head-quant", default=None, metavar="MODE",
                        help="how this machine holds the embeddings and LM head: none, int8 or int4 (default: int8 "
                             "when --quant quantizes a model run here, else none)")


def add_swarm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                        help="multiaddrs of any peers of a swarm: run the model's blocks on its servers "
                             "(default: the swarm found on this LAN by mDNS, if any; else run the whole model on "
                             "this machine)")
    add_mdns_flags(parser)
    add_download_flag(parser)
    add_client_flags(parser)


def add_download_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-download", type=float, default=None, metavar="MB_PER_S",
                        help="when --model is a model id: cap the fetch of its config, tokenizer and client part "
                             "from the swarm, in MB/s (default: no cap)")


def add_client_flags(parser: argparse.ArgumentParser, title: str = "swarm client (with --initial-peers)") -> None:
    """The ``ClientConfig`` flags (``--route-wait``, ``--step-timeout``, ``--no-push``, ...; not those in
    ``CLI_SKIP``, spelled their own way), in a group of ``--help`` named ``title``; those of ``LOCAL_FIELDS``
    (``--device``) among the command's own flags, since they apply without a swarm too."""
    swarm_only = tuple(f.name for f in dataclasses.fields(ClientConfig) if f.name not in LOCAL_FIELDS)
    add_config_flags(parser, ClientConfig, skip=swarm_only)
    add_config_flags(parser.add_argument_group(title), ClientConfig, skip=CLI_SKIP + LOCAL_FIELDS)


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The ``ClientConfig`` of the flags ``add_client_flags`` added (unset: defaults; the ``CLI_SKIP`` fields
    keep theirs, whatever same-named flags say), or a one-line ConfigError."""
    return ClientConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClientConfig)
                           if f.name not in CLI_SKIP and hasattr(args, f.name)})


def max_download_bytes(args: argparse.Namespace) -> float | None:
    """``--max-download`` in bytes/s (None: no cap), or a one-line ConfigError."""
    cap = getattr(args, "max_download", None)
    if cap is None:
        return None
    if not cap > 0:  # also refuses nan
        raise ConfigError(f"--max-download must be > 0 MB/s, got {cap:g}")
    return cap * 1_000_000


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate", help="generate text from a prompt (on this machine, or through a swarm)",
        description="Generate a continuation of --prompt and stream it to stdout (temperature 0: greedy). "
                    "With --initial-peers the transformer blocks run on the swarm's servers.",
    )
    add_model_flags(parser, model_required=True)
    add_swarm_flags(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                        help="how many tokens to generate at most (default: 32)")
    add_config_flags(parser, SamplingConfig)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at the model's eos tokens: always generate --max-new-tokens tokens "
                             "(for benchmarks)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (token ids, text, timings) instead of streaming text")
    parser.set_defaults(func=main)


def validated(args: argparse.Namespace) -> tuple[SamplingConfig, str]:
    """The sampling config and ``--dtype`` (``auto`` or canonical), or a one-line ConfigError (nothing heavy
    imported)."""
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    max_download_bytes(args)
    check_quant_flag(args)
    client_config(args)
    return sampling_config(args), check_dtype_flag(args.dtype)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """``SamplingConfig`` from the flags ``add_config_flags`` added (``--logit-bias ID=BIAS ...`` parsed), or a
    one-line ConfigError naming the flag."""
    overrides = {}
    if hasattr(args, "logit_bias"):
        overrides["logit_bias"] = parse_logit_bias(args.logit_bias)
    return config_from_args(SamplingConfig, args, **overrides)


def check_dtype_flag(text: str) -> str:
    """``--dtype`` as ``auto`` (the device's default, resolved once the device is) or a canonical dtype, or a
    one-line ConfigError."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return canonical_dtype(text)
    except ConfigError:
        raise ConfigError(f"--dtype must be auto, fp32, bf16 or fp16, got {text[:32]!r}") from None


def check_device(client: ClientConfig) -> str:
    """``--device`` resolved on this machine (``cpu``, ``cuda:0``, ``mps``), or the one-line ConfigError of
    ``models.device.resolve_device`` (no CUDA here...): called before anything is loaded or joined."""
    from meshinfer.models.device import resolve_device

    return str(resolve_device(client.device))


def check_quant_flag(args: argparse.Namespace) -> str:
    """``--quant`` as ``auto`` or one of ``types.QUANT_MODES``, or a one-line ConfigError."""
    from meshinfer.types import check_quant

    value = str(getattr(args, "quant", "auto")).strip().lower()
    head = getattr(args, "head_quant", None)
    if head is not None:
        args.head_quant = check_quant(str(head))
    return value if value == "auto" else check_quant(value)


def main(args: argparse.Namespace) -> int:
    sampling, dtype = validated(args)
    check_device(client_config(args))
    model_dir = resolve_model_dir(args.model)
    args.initial_peers = list(lan_peers(args, required=False, note=False))
    t0 = time.perf_counter()
    generator = open_generator(model_dir, dtype, args.initial_peers, max_download_bytes(args),
                               quant=check_quant_flag(args), model_name=model_display_name(args.model, model_dir),
                               head_quant=args.head_quant, compile=args.compile, client=client_config(args))
    load_s = time.perf_counter() - t0
    with contextlib.closing(generator):
        return _generate(args, generator, sampling, dtype, model_dir, load_s)


def _dtype_name(dtype: object) -> str:
    """The canonical name of a compute dtype (``torch.float32`` -> ``float32``)."""
    name = str(dtype).removeprefix("torch.")
    return name if name == "auto" else canonical_dtype(name)


def _generate(args: argparse.Namespace, generator: TextGenerator, sampling: SamplingConfig, dtype: str,
              model_dir: Path, load_s: float) -> int:
    params = GenerationParams(args.max_new_tokens, sampling, frozenset() if args.ignore_eos else None)
    if args.json:
        result = run_generation(generator, args.prompt, params, out=None)
        doc = asdict(result)
        doc["timings"]["load_s"] = load_s
        doc.update(model=str(model_dir), dtype=_dtype_name(getattr(generator, "dtype", dtype)),
                   sampling=asdict(sampling))
        route = getattr(generator, "last_route", None)
        if args.initial_peers and route:
            doc["route"] = [{"peer_id": hop.peer_id, "blocks": str(hop.span)} for hop in route]
        print(json.dumps(doc, ensure_ascii=False))
    else:
        result = run_generation(generator, args.prompt, params, out=sys.stdout)
        print()
        print(describe_timings(result, load_s), file=sys.stderr)
    return 0
