"""``meshinfer demo`` and ``meshinfer bench swarm`` as real runs: a bootstrap peer and block servers on 127.0.0.1.

The demo runs as a subprocess; while it runs, a watcher thread records every process below it (servers,
bootstrap, p2p daemons), so that after it exits we can check that none of them outlived it, also when it
is interrupted with SIGINT mid-generation. The bench runs in-process on the tiny checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

import pytest

from meshinfer.bench.swarm import even_spans
from meshinfer.cli.main import main
from meshinfer.testing.procs import ManagedProcess, command_line, descendants_of, meshinfer_argv, wait_gone
from meshinfer.types import BlockRange

pytestmark = pytest.mark.slow

IDENTICAL = "identical to local engine: yes"


class Watched:
    """A ``meshinfer`` subprocess whose process tree is sampled every 50 ms until it exits."""

    def __init__(self, *args: str) -> None:
        self.proc = ManagedProcess(meshinfer_argv(*args), name="meshinfer " + " ".join(args))
        self.seen: dict[int, str] = {}
        self.lines: list[str] = []
        self._watch = threading.Thread(target=self._sample, daemon=True)
        self._watch.start()

    def _sample(self) -> None:
        while self.proc.proc.poll() is None:
            for pid in descendants_of(self.proc.pid):
                if pid not in self.seen:
                    self.seen[pid] = command_line(pid)
            time.sleep(0.05)

    def read_until(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.read_line(max(0.1, deadline - time.monotonic()))
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float) -> int:
        """Wait for exit (reading the rest of stdout); returns the exit code."""
        deadline = time.monotonic() + timeout
        while (line := self.proc.poll_line(max(0.1, deadline - time.monotonic()))) is not None:
            self.lines.append(line)
            if time.monotonic() > deadline:
                break
        code = self.proc.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        self._watch.join(timeout=5)
        return code

    def leftovers(self) -> dict[int, str]:
        """Processes that ran below the demo and are still alive (give them a moment to exit)."""
        alive = wait_gone(self.seen, timeout=10)
        return {pid: self.seen[pid] for pid in alive}

    def servers_seen(self) -> int:
        return sum(" serve " in cmd for cmd in self.seen.values())

    def stop(self) -> None:
        self.proc.stop(timeout=20)


def test_demo_answers_with_the_real_model_identically_through_three_servers_and_leaves_nothing(
        smollm2_gguf: Path) -> None:
    demo = Watched("demo", "--max-new-tokens", "12")  # the default model: SmolLM2 from the catalogue
    try:
        code = demo.finish(timeout=300)
    finally:
        demo.stop()
    out = "\n".join(demo.lines)
    assert code == 0, f"{out}\n{demo.proc.stderr_tail()}"
    assert "smollm2: llama architecture, 30 blocks" in out and "trained weights" in out, out
    assert "user> What is the capital of France" in out and "Paris" in out, out  # a real answer
    assert IDENTICAL in out, out
    assert "0:10 on" in out and "10:20 on" in out and "20:30 on" in out, out  # the planned route was shown
    assert "none left running" in out, out
    assert demo.servers_seen() == 3, demo.seen
    assert not demo.leftovers(), demo.leftovers()


def test_demo_on_the_tiny_model_with_int8_servers(meshinfer_cache_dir: Path) -> None:
    demo = Watched("demo", "--model", "tiny", "--quant", "int8", "--max-new-tokens", "8")
    try:
        code = demo.finish(timeout=240)
    finally:
        demo.stop()
    out = "\n".join(demo.lines)
    assert code == 0, f"{out}\n{demo.proc.stderr_tail()}"
    assert "random weights" in out and "weights in int8" in out and "int8 ·" in out, out
    assert IDENTICAL in out and "0:3 on" in out and "6:8 on" in out, out
    assert not demo.leftovers(), demo.leftovers()


def test_demo_interrupted_mid_generation_stops_everything() -> None:
    demo = Watched("demo", "--model", "tiny", "--max-new-tokens", "900")
    try:
        demo.read_until("5. ", timeout=180)  # the generation through the swarm has started
        time.sleep(0.5)
        assert demo.servers_seen() == 3, demo.seen
        demo.proc.kill(signal.SIGINT)
        code = demo.finish(timeout=60)
    finally:
        demo.stop()
    assert code == 130, f"{demo.lines}\n{demo.proc.stderr_tail()}"
    assert "interrupted" in demo.proc.stderr_tail()
    assert any("none left running" in line for line in demo.lines), demo.lines
    assert not demo.leftovers(), demo.leftovers()


def test_even_spans_and_bad_demo_flags(capsys: pytest.CaptureFixture[str], smollm2_gguf: Path) -> None:
    assert even_spans(8, 3) == [BlockRange(0, 3), BlockRange(3, 6), BlockRange(6, 8)]
    assert even_spans(12, 3) == [BlockRange(0, 4), BlockRange(4, 8), BlockRange(8, 12)]
    assert even_spans(4, 1) == [BlockRange(0, 4)]
    for flags, text in [(["--servers", "31"], "cannot split 30 blocks over 31 servers"),
                        (["--model", "tiny", "--servers", "9"], "cannot split 8 blocks over 9 servers"),
                        (["--servers", "0"], "--servers must be >= 1"),
                        (["--quant", "int3"], "unknown quant mode 'int3'; choose one of none, int8, int4"),
                        (["--model", "/no/such/dir"], "model '/no/such/dir' does not exist"),
                        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1")]:
        assert main(["demo", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and text in err and "\n" not in err, err


def test_bench_swarm_compares_against_the_local_engine(meshinfer_cache_dir: Path) -> None:
    from meshinfer.bench import swarm as bench
    from meshinfer.testing.checkpoints import tiny_checkpoint

    args = argparse.Namespace(model=str(tiny_checkpoint("llama")), servers=2, runs=1, prompt_tokens=5,
                              new_tokens=6, dtype="fp32", torch_threads=1, no_push=False, private_blocks=0)
    figures = bench.run(args)
    assert figures["route"] == ["0:2", "2:4"] and figures["hops"] == 2
    assert figures["greedy_tokens_identical"] is True
    assert figures["greedy_tokens_matching_prefix"] == 6
    for engine in ("swarm", "local"):
        assert figures[engine]["decode_tokens_per_s"] > 0 and figures[engine]["time_to_first_token_ms"] > 0
    ratio = figures["ratio_swarm_over_local"]["decode_tokens_per_s"]
    assert ratio == pytest.approx(figures["swarm"]["decode_tokens_per_s"] / figures["local"]["decode_tokens_per_s"])
    assert [s["torch_threads"] for s in figures["servers"]] == [1, 1]
    split = figures["breakdown"]  # read from the servers' decode step metrics: 5 decode steps each
    assert len(split["server_step_ms"]) == 2 and all(ms > 0 for ms in split["server_step_ms"])
    # The parts are differences of clocks read in four processes and two client threads: on a shared 2-core
    # machine their order is not guaranteed (a late wake-up of the consuming thread can make the route look
    # longer than the token), so only what the split itself promises is checked here: every part is read,
    # and they add up.
    assert split["route_ms_per_token"] > 0 and split["swarm_ms_per_token"] > 0
    assert split["in_servers_ms_per_token"] == pytest.approx(sum(split["server_step_ms"]))
    assert split["route_ms_per_token"] == pytest.approx(split["in_servers_ms_per_token"]
                                                        + split["between_servers_ms_per_token"])
    assert split["swarm_ms_per_token"] == pytest.approx(split["route_ms_per_token"] + split["client_ms_per_token"])
    assert split["gap_ms_per_token"] == pytest.approx(split["gap_servers_ms"] + split["gap_network_ms"]
                                                      + split["gap_client_ms"])
    assert figures["local_parts"]["blocks_ms"] > 0 and figures["local_parts"]["head_ms"] > 0
    assert figures["stage_pause"]["blocks"] == "0:2" and figures["stage_pause"]["after_pause_ms"] > 0
