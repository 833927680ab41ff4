"""Several models behind one gateway, driven by the official openai client: two tiny checkpoints of different
fingerprints, each served by one ``meshinfer serve`` process of one swarm (the second joins the first's bootstrap
peer; it is started by the first test that needs it, so the ``--model auto`` test sees it appear).

- in process: the second model is a sibling of the first (``DistributedModel.sibling``: one loop, one peer), the
  gateway runs on that loop; ``model`` routes each request (answers equal each model's local greedy output),
  ``/v1/models`` lists both with coverage, an unknown name 404s; closing leaves no thread behind;
- ``meshinfer api --model auto`` as a subprocess started while the swarm serves only the first model: it serves
  that one, opens the second once it appears (``--auto-refresh-s 1``), and answers both like the local engine.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_helpers import local_chat

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


class TwoSwarms:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        from meshinfer.models.checkpoint import Checkpoint
        from meshinfer.testing.checkpoints import tiny_checkpoint
        from meshinfer.testing.swarm import LocalSwarm

        self.stack = stack
        self.dirs = {"llama": tiny_checkpoint("llama", variant="llama3"), "qwen": tiny_checkpoint("qwen2")}
        self.blocks = {name: Checkpoint(path).spec.num_blocks for name, path in self.dirs.items()}
        self.first = stack.enter_context(LocalSwarm(self.dirs["llama"], [(0, self.blocks["llama"])]))
        self.second: LocalSwarm | None = None

    def both(self) -> TwoSwarms:
        """Start the second model's server (once)."""
        from meshinfer.testing.swarm import LocalSwarm

        if self.second is None:
            self.second = self.stack.enter_context(LocalSwarm(self.dirs["qwen"], [(0, self.blocks["qwen"])],
                                                              initial_peers=self.first.initial_peers))
        return self


@pytest.fixture(scope="module")
def swarms() -> Iterator[TwoSwarms]:
    with contextlib.ExitStack() as stack:
        yield TwoSwarms(stack)


def _wait_threads(before: set[threading.Thread], timeout: float = 30.0) -> list[str]:
    """The threads started since ``before`` still alive after up to ``timeout`` s (but the app's own parse worker,
    which lives as long as the app: uvicorn runs it without lifespan events)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [t.name for t in threading.enumerate()
                if t not in before and t.is_alive() and not t.name.startswith("meshinfer-gateway-parse")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_meshinfer_api_model_auto_serves_every_announced_model(swarms: TwoSwarms, tmp_path: Path) -> None:
    import openai

    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone

    argv = meshinfer_argv("api", "--model", "auto", "--initial-peers", *swarms.first.initial_peers, "--port", "0",
                          "--auto-refresh-s", "1", "--stop-on-stdin-eof")
    alone = swarms.second is None  # the second model appears after the gateway started (when this test runs first)
    proc = ManagedProcess(argv, name="meshinfer api --model auto")
    try:
        line = proc.read_line(180)
        while not line.startswith("ready "):
            line = proc.read_line(180)
        info = json.loads(line[len("ready "):])
        if alone:
            assert info["model_id"] == swarms.first.model_id and info["models"] == [info["model"]]
        ids = {"llama": swarms.first.model_id, "qwen": swarms.both().second.model_id}  # type: ignore[union-attr]
        with openai.OpenAI(base_url=info["base_url"], api_key="unused", max_retries=0, timeout=120) as client:
            def loaded() -> dict[str, str]:
                return {m["meshinfer"]["model_id"]: m["id"] for m in client.models.list().model_dump()["data"]
                        if m["meshinfer"]["loaded"]}

            _poll(lambda: ids["qwen"] in loaded(), 180, "the second model to be opened")
            names = loaded()
            assert set(names) == set(ids.values()) and names[ids["llama"]] == info["model"]
            for key, path in swarms.dirs.items():
                want = local_chat(LocalModel.from_pretrained(path), MESSAGES, 8)[0]
                got = client.chat.completions.create(model=names[ids[key]], messages=MESSAGES,  # type: ignore[arg-type]
                                                     max_tokens=8, temperature=0)
                assert got.choices[0].message.content == want, key
            # the next turn of the first chat continues its held session: the prompt cache's counters in /metrics
            first = names[ids["llama"]]
            reply = client.chat.completions.create(model=first, messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                                   temperature=0).choices[0].message.content
            turn2 = [*MESSAGES, {"role": "assistant", "content": reply}, {"role": "user", "content": "And the sky?"}]
            client.chat.completions.create(model=first, messages=turn2, max_tokens=4)  # type: ignore[arg-type]
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        samples = {(s.name, s.labels.get("model")): s.value
                   for f in text_string_to_metric_families(httpx.get(info["url"] + "/metrics", timeout=30).text)
                   for s in f.samples}
        assert samples[("meshinfer_prompt_cache_hits_total", first)] >= 1, samples
        assert samples[("meshinfer_prompt_cache_tokens_reused_total", first)] > 0
        assert ("meshinfer_prompt_cache_held", names[ids["qwen"]]) in samples  # one sample per served model
        tree = proc.descendants()
    finally:
        code = proc.stop(timeout=30)
    assert code == 0, proc.stderr_tail()
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


def test_two_sibling_models_behind_one_gateway(swarms: TwoSwarms) -> None:
    import openai

    from meshinfer.client.model import DistributedModel
    from meshinfer.gateway.app import create_app
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.models.engine import LocalModel

    dirs = swarms.both().dirs
    before = set(threading.enumerate())
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(DistributedModel.from_pretrained(dirs["llama"], swarms.first.initial_peers))
        models = {"llama": first, "qwen": first.sibling(dirs["qwen"])}
        assert models["qwen"].loop is first.loop and models["qwen"].view is first.view
        app = create_app(SwarmGenerator(first), "llama", more={"qwen": SwarmGenerator(models["qwen"])})
        server = stack.enter_context(ApiServer(app, loop=first.loop))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for name, path in dirs.items():
            want, _, reply, finish = local_chat(LocalModel.from_pretrained(path), MESSAGES, 12)
            got = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12,  # type: ignore[arg-type]
                                                 temperature=0)
            assert got.model == name and got.choices[0].message.content == want, name
            assert (got.usage and got.usage.completion_tokens, got.choices[0].finish_reason) == (len(reply), finish)
        listed = client.models.list().model_dump()["data"]
        assert [m["id"] for m in listed[:2]] == ["llama", "qwen"]
        for entry, name in zip(listed[:2], ("llama", "qwen"), strict=True):
            ext = entry["meshinfer"]
            assert ext["loaded"] and ext["covered"] and ext["route_ok"] and ext["servers"] == 1, entry
            assert ext["model_id"] == models[name].model_id
        assert all(not m["meshinfer"]["loaded"] for m in listed[2:])  # nothing else runs in this swarm
        with pytest.raises(openai.NotFoundError, match="'llama', 'qwen'"):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        client.close()
        models["qwen"].close()  # a sibling closes only its own parts: the first still answers
        assert first.generate([5, 6, 7], 2, stop_token_ids=()) == LocalModel.from_pretrained(dirs["llama"]).generate(
            [5, 6, 7], 2, stop_token_ids=())
    assert not _wait_threads(before), "threads left behind"


def test_meshinfer_api_explicit_model_and_auto(swarms: TwoSwarms) -> None:
    from meshinfer.testing.procs import ManagedProcess, meshinfer_argv

    both = swarms.both()
    argv = meshinfer_argv("api", "--model", f"mine={both.dirs['llama']}", "--model", "auto", "--initial-peers",
                          *both.first.initial_peers, "--port", "0", "--stop-on-stdin-eof")
    proc = ManagedProcess(argv, name="meshinfer api --model X --model auto")
    try:
        info = proc.wait_ready(180)
        assert info["model"] == "mine" and len(info["models"]) == 2 and info["models"][0] == "mine", info
    finally:
        code = proc.stop(timeout=30)
    assert code == 0, proc.stderr_tail()


def test_meshinfer_api_model_auto_with_no_model_in_the_swarm_is_a_one_line_error() -> None:
    import subprocess

    from meshinfer.testing.procs import meshinfer_argv, start_dht

    dht, maddrs = start_dht(timeout=90)  # a swarm with no server
    try:
        argv = meshinfer_argv("api", "--model", "auto", "--initial-peers", *maddrs, "--route-wait", "0.5")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        dht.stop()
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --model auto: the swarm announces no model") and maddrs[0] in lines[-1], lines
