"""Two models behind one gateway, driven by the official openai client: two tiny checkpoints, each served by
one ``meshinfer serve`` process of one swarm (the second joins the first's bootstrap peer), each with its own
``DistributedModel``; the gateway runs on the first one's loop. ``model`` routes each request (answers equal
each model's local greedy output), ``/v1/models`` lists both with coverage, an unknown name 404s."""

from __future__ import annotations

import contextlib

import pytest
from gateway_helpers import local_chat

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def test_two_models_behind_one_gateway() -> None:
    import openai

    from meshinfer.client.model import DistributedModel
    from meshinfer.gateway.app import create_app
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.checkpoints import tiny_checkpoint
    from meshinfer.testing.swarm import LocalSwarm

    dirs = {"llama": tiny_checkpoint("llama", variant="llama3"), "qwen": tiny_checkpoint("qwen2")}
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(LocalSwarm(dirs["llama"], [(0, Checkpoint(dirs["llama"]).spec.num_blocks)]))
        stack.enter_context(LocalSwarm(dirs["qwen"], [(0, Checkpoint(dirs["qwen"]).spec.num_blocks)],
                                       initial_peers=first.initial_peers))
        models = {name: stack.enter_context(DistributedModel.from_pretrained(path, first.initial_peers))
                  for name, path in dirs.items()}
        app = create_app(SwarmGenerator(models["llama"]), "llama", more={"qwen": SwarmGenerator(models["qwen"])})
        server = stack.enter_context(ApiServer(app, loop=models["llama"].loop))
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
