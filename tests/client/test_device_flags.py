"""``--device`` and ``--dtype auto`` of ``meshinfer generate``/``chat``/``api``: the flags, their help and defaults,
and the one-line errors for a device this machine lacks or a malformed one (in-process ``main`` calls: nothing is
loaded or joined before the device is checked)."""

from __future__ import annotations

import argparse

import pytest
import torch

from meshinfer.cli.generate import DTYPE_HELP, check_device, check_dtype_flag, client_config
from meshinfer.cli.main import build_parser, main
from meshinfer.client.config import ClientConfig
from meshinfer.devices import DEVICE_HELP
from meshinfer.errors import ConfigError

PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmNotAPeer"
COMMANDS = {
    "generate": ["generate", "--model", "tiny", "--prompt", "hi"],
    "chat": ["chat", "--model", "tiny"],
    "api": ["api", "--model", "/nonexistent", "--initial-peers", PEER, "--port", "0"],
}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def _action(parser: argparse.ArgumentParser, command: str, flag: str) -> argparse.Action:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return next(a for a in sub._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_take_device_and_dtype_auto(command: str) -> None:
    parser = build_parser()
    device = _action(parser, command, "--device")
    assert device.help is not None and device.help.startswith(DEVICE_HELP) and "(default: auto)" in device.help
    dtype = _action(parser, command, "--dtype")
    assert (dtype.default, dtype.help) == ("auto", DTYPE_HELP)
    args = parser.parse_args(COMMANDS[command])
    assert client_config(args).device == "auto" and args.dtype == "auto"
    args = parser.parse_args([*COMMANDS[command], "--device", "cuda:1", "--dtype", "bf16"])
    assert client_config(args) == ClientConfig(device="cuda:1") and check_dtype_flag(args.dtype) == "bfloat16"


def test_device_is_listed_with_the_commands_own_flags_not_the_swarm_clients() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    swarm = next(g for g in sub._action_groups if g.title and g.title.startswith("swarm client"))
    assert "--device" not in {o for a in swarm._group_actions for o in a.option_strings}
    assert "--route-wait" in {o for a in swarm._group_actions for o in a.option_strings}


def test_dtype_flag_values() -> None:
    assert [check_dtype_flag(t) for t in ("auto", " AUTO", "fp32", "bf16", "float16")] == [
        "auto", "auto", "float32", "bfloat16", "float16"]
    with pytest.raises(ConfigError, match=r"^--dtype must be auto, fp32, bf16 or fp16, got 'fp8'$"):
        check_dtype_flag("fp8")


def test_check_device_resolves_here() -> None:
    assert check_device(ClientConfig(device="cpu")) == "cpu"
    assert check_device(ClientConfig()) == ("cuda:0" if torch.cuda.is_available() else
                                            "mps" if torch.backends.mps.is_available() else "cpu")


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@NO_CUDA
@pytest.mark.parametrize("command", list(COMMANDS))
def test_absent_cuda_is_one_line_and_nothing_is_loaded(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([*COMMANDS[command], "--device", "cuda"], capsys)
    assert line.startswith("error: --device cuda: ") and line.endswith("use --device cpu (or auto)"), line
    line = _one_line_error([*COMMANDS[command], "--device", "cuda:3"], capsys)
    assert line.startswith("error: --device cuda:3: "), line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_malformed_device_names_the_accepted_forms(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([*COMMANDS[command], "--device", "tpu"], capsys)
    assert line == "error: --device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_dtype_is_one_line(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error([*COMMANDS[command], "--dtype", "fp8"], capsys)
    assert line == "error: --dtype must be auto, fp32, bf16 or fp16, got 'fp8'"


@NO_CUDA
def test_python_api_refuses_an_absent_device_before_joining() -> None:
    from meshinfer.client.model import DistributedModel

    for device in ("cuda", torch.device("cuda", 1)):
        with pytest.raises(ConfigError, match=r"^--device cuda(:1)?: "):
            DistributedModel.from_pretrained("nowhere", [PEER], device=device)
    with pytest.raises(ConfigError, match=r"^--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"):
        DistributedModel.from_pretrained("nowhere", [PEER], device="tpu")
    with pytest.raises(ConfigError, match=r"^--device cuda: "):
        DistributedModel.from_pretrained("nowhere", [PEER], config=ClientConfig(device="cuda"))
