"""``meshinfer chat``: a conversation in the terminal, with the model's chat template, locally or via a swarm.

Contract: parses and validates flags before importing torch; opens the model through
``cli.generate.open_generator`` (``--initial-peers``, or without them the peers found on this LAN by mDNS
(``cli.lan``): the swarm's ``DistributedModel``; otherwise the local engine). Each user turn is appended to
the history, the whole conversation is rendered with the tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True)``, tokenised without extra special tokens, as
transformers does), and the reply is streamed as it is generated and kept in
the history. Generation stops at the model's eos ids, the tokenizer's eos and known end-of-turn tokens
(``<|im_end|>``, ``<|eot_id|>``...). When the conversation no longer fits the context, the oldest turns
are dropped (the system prompt is kept). ``/exit``, ``/quit`` or end of input (Ctrl-D) leaves;
``/reset`` clears the history. With a terminal on stdin it prompts interactively; otherwise it reads one
user message per line (``--json``: one JSON object per turn: user, reply, token ids), so it is testable.
Knows nothing of blocks or of the network beyond passing ``--initial-peers`` (or the LAN's peers) on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, TextIO

from meshinfer.cli.common import add_config_flags
from meshinfer.cli.generate import (
    IncrementalDetokenizer,
    add_model_flags,
    add_swarm_flags,
    check_device,
    check_dtype_flag,
    check_quant_flag,
    client_config,
    max_download_bytes,
    model_display_name,
    open_generator,
    resolve_model_dir,
    sampling_config,
    text_decoder,
)
from meshinfer.cli.lan import lan_peers
from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError, ContextOverflowError
from meshinfer.models.detokenize import chat_stop_ids
from meshinfer.models.generator import GenerationParams, TextGenerator

EXIT_COMMANDS = ("/exit", "/quit")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "chat", help="chat with a model in the terminal (locally, or through a swarm with --initial-peers)",
        description="Interactive chat using the model's chat template. Type /exit or press Ctrl-D to leave, "
                    "/reset to forget the conversation. Reads one message per line when stdin is not a terminal.",
    )
    add_model_flags(parser, model_required=True)
    add_swarm_flags(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system prompt for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="most tokens per reply (default: 128)")
    add_config_flags(parser, SamplingConfig)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per turn (user, reply, token ids) instead of plain text")
    parser.set_defaults(func=main)


class Conversation:
    """Chat history rendered through a tokenizer's chat template, trimmed to fit a context length."""

    def __init__(self, tokenizer: Any, context: int, max_new_tokens: int, system: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template (a base model?); "
                              "use `meshinfer generate` for plain text continuation")
        self.tokenizer = tokenizer
        self.context = context
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.turns: list[dict[str, str]] = []

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + turns

    def encode(self, turns: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(self._messages(turns), add_generation_prompt=True,
                                                  tokenize=False)
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt_for(self, user: str) -> list[int]:
        """Add the user's message and return the prompt ids, dropping the oldest turns if needed."""
        self.turns.append({"role": "user", "content": user})
        while True:
            ids = self.encode(self.turns)
            if len(ids) + self.max_new_tokens <= self.context:
                return ids
            if len(self.turns) <= 1:
                self.turns.pop()
                raise ContextOverflowError(
                    f"this message needs {len(ids)} prompt tokens + {self.max_new_tokens} new ones; the model's "
                    f"context is {self.context} tokens (shorten it or lower --max-new-tokens)"
                )
            del self.turns[:2]  # the oldest user message and its reply

    def add_reply(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        self.turns.clear()


def stop_ids(tokenizer: Any, spec: Any) -> frozenset[int]:
    """The ids that end a reply: the model's eos ids, the tokenizer's eos and known end-of-turn tokens."""
    return chat_stop_ids(tokenizer, getattr(spec, "eos_token_ids", ()) or ())


def _user_lines(interactive: bool) -> Iterator[str]:
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            if interactive:
                print()  # end the prompt line on Ctrl-D
            return
        if not interactive and line == "":
            return  # end of input
        yield line.rstrip("\n")


def reply(generator: TextGenerator, conversation: Conversation, user: str, params: GenerationParams,
          out: TextIO | None) -> tuple[str, list[int]]:
    """Generate the reply to ``user`` with ``params`` (streamed to ``out``), record it, return its text and ids."""
    ids = conversation.prompt_for(user)
    detok = IncrementalDetokenizer(text_decoder(conversation.tokenizer))
    pieces: list[str] = []
    try:
        with contextlib.closing(generator.generation(ids, params)) as tokens:
            for scored in tokens:
                piece = detok.push(int(scored.token))
                if piece:
                    pieces.append(piece)
                    if out is not None:
                        out.write(piece)
                        out.flush()
    except BaseException:
        conversation.turns.pop()  # the user message stays unanswered: forget it
        raise
    tail = detok.flush()
    pieces.append(tail)
    if out is not None and tail:
        out.write(tail)
        out.flush()
    text = "".join(pieces).strip()
    conversation.add_reply(text)
    return text, list(detok.ids)


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    sampling = sampling_config(args)
    dtype = check_dtype_flag(args.dtype)
    quant = check_quant_flag(args)
    client = client_config(args)
    check_device(client)
    model_dir = resolve_model_dir(args.model)
    name = model_display_name(args.model, model_dir)
    args.initial_peers = list(lan_peers(args, required=False, note=False))
    interactive = sys.stdin.isatty() and not args.json
    generator = open_generator(model_dir, dtype, initial_peers=args.initial_peers,
                               max_download=max_download_bytes(args), quant=quant, model_name=name,
                               head_quant=args.head_quant, compile=args.compile, client=client)
    with contextlib.closing(generator):
        tokenizer = generator.tokenizer
        spec = generator.spec
        conversation = Conversation(tokenizer, spec.max_position_embeddings, args.max_new_tokens, args.system)
        params = GenerationParams(args.max_new_tokens, sampling, stop_ids(tokenizer, spec))
        if interactive:
            where = "through the swarm" if args.initial_peers else "on this machine"
            print(f"chatting with {name} {where}; /exit or Ctrl-D to leave, /reset to start over",
                  file=sys.stderr)
        for line in _user_lines(interactive):
            text = line.strip()
            if not text:
                continue
            if text in EXIT_COMMANDS:
                break
            if text == "/reset":
                conversation.reset()
                continue
            if interactive:
                print("assistant> ", end="", flush=True)
            try:
                answer, ids = reply(generator, conversation, text, params, out=None if args.json else sys.stdout)
            except ContextOverflowError as err:
                if not interactive:
                    raise
                print(f"\nerror: {err}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({"user": text, "reply": answer, "reply_token_ids": ids,
                                  "sampling": asdict(sampling)}, ensure_ascii=False), flush=True)
            else:
                print(flush=True)
    return 0
