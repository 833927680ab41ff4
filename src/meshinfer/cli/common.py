"""Helpers shared by CLI subcommands: config dataclasses as flags, logging, numeric flag types.

Contract: argparse plumbing only; no model, network or torch imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Any, TypeVar

from meshinfer.errors import ConfigError

T = TypeVar("T")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for noisy in ("hivemind", "httpx", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                     skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of config dataclass ``cls`` (to a parser or an argument group); field help becomes
    flag help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if origin is tuple:
            kwargs.update(nargs="*", type=str, metavar=f.name.upper().rstrip("S"))
        elif hint is bool or (origin in (typing.Union, types.UnionType) and args == [bool]):
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            base = args[0] if origin in (typing.Union, types.UnionType) and args else hint
            kwargs.update(type=base, metavar=f.name.removesuffix("_per_peer").split("_")[-1].upper())
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if f.default is not dataclasses.MISSING and f.default not in (None, ()):
            kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build config ``cls`` from the flags ``add_config_flags`` added (unset flags keep defaults)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return cls(**values)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
