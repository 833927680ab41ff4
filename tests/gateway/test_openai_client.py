"""The gateway in front of a real 3-server swarm, driven by the official ``openai`` package.

Every expected text is computed without the gateway: by the local engine on the same checkpoint with the
chat CLI's rendering and stop tokens (``local_chat``), or by ``meshinfer generate``'s own code path
(``cli.generate.run_generation`` on a ``LocalModel``).
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from gateway_helpers import MODEL_NAME, Served, local_chat

from meshinfer.cli.chat import stop_ids
from meshinfer.cli.generate import run_generation
from meshinfer.config import SamplingConfig
from meshinfer.gateway.app import create_app
from meshinfer.gateway.config import GatewayConfig
from meshinfer.gateway.generation import SwarmGenerator
from meshinfer.gateway.serving import ApiServer
from meshinfer.models.generator import GenerationParams

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower"
MESSAGES = [{"role": "system", "content": "You are a lighthouse keeper."},
            {"role": "user", "content": "What do you see from the tower?"}]


@pytest.fixture()
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).owned_by == "meshinfer"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_greedy_chat_equals_local_chat(served: Served, client: openai.OpenAI) -> None:
    want, prompt, reply, finish = local_chat(served.local, MESSAGES, 24)
    got = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=24)
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want
    assert choice.finish_reason == finish
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), len(reply))
    assert got.usage.total_tokens == len(prompt) + len(reply)


def test_streaming_chat_equals_non_streaming(served: Served, client: openai.OpenAI) -> None:
    want, prompt, reply, finish = local_chat(served.local, MESSAGES, 20)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(prompt), len(reply))


def test_greedy_completion_equals_meshinfer_generate(served: Served, client: openai.OpenAI) -> None:
    # `meshinfer generate`'s code
    want = run_generation(served.local, PROMPT, GenerationParams(16, SamplingConfig()), out=None)
    trips = served.model.speculation.trips
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=16)
    assert got.choices[0].text == want.text
    assert served.model.speculation.trips > trips  # speculative decoding is the gateway's default
    assert got.usage is not None
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.generated_token_ids)
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_stop_strings(served: Served, client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=32)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and len(text) > 12
    stop = text[len(text) // 2:len(text) // 2 + 3]
    want = text[:text.index(stop)]  # the text before the first occurrence, which may come earlier
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=32,
                                    stop=[stop, "\x00never"])
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "stop"
    assert got.usage is not None and got.usage.completion_tokens < 32
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=32, stop=stop,
                                         stream=True)
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == want
    assert not any(stop in p for p in pieces)


def test_seeded_sampling_is_reproducible_and_equals_local(served: Served, client: openai.OpenAI) -> None:
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=7)
    want, _, _, _ = local_chat(served.local, MESSAGES, 16, sampling)
    texts = [client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0.9, top_p=0.95,
                                            seed=7, max_tokens=16).choices[0].message.content for _ in range(2)]
    assert texts == [want, want]


def test_logprobs_are_the_local_engines(served: Served, client: openai.OpenAI) -> None:
    want, prompt, reply, _ = local_chat(served.local, MESSAGES, 8)
    stops = stop_ids(served.local.tokenizer, served.local.spec)  # as local_chat ends a reply
    scored = list(served.local.stream_scored(prompt, 8, stop_token_ids=stops, top_logprobs=3))
    got = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=8,
                                         logprobs=True, top_logprobs=3)
    assert got.choices[0].message.content == want
    content = got.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == len(reply) == len(scored)
    for entry, s in zip(content, scored, strict=True):  # the blocks ran on the swarm: equal up to rounding
        assert entry.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in s.top], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2,
                                         stream=True)
    tokens: list[str] = []
    for chunk in streamed:
        lp = chunk.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens or []
            assert all(len(top) <= 2 for top in lp.top_logprobs or [])
    assert len(tokens) == 6


def test_echo_scores_a_prompt_as_evaluation_harnesses_ask(served: Served, client: openai.OpenAI) -> None:
    ids = [int(i) for i in served.local.tokenizer(PROMPT)["input_ids"]]  # as the gateway tokenises a text prompt
    want = served.local.score_prompt(ids, 1)
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=1, echo=True,
                                    logprobs=1)
    choice = got.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([s.logprob for s in want], abs=1e-4)
    assert lp.top_logprobs is not None and all(len(top) == 1 for top in lp.top_logprobs[1:])
    scored_only = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert scored_only.choices[0].text == PROMPT and scored_only.usage is not None
    assert scored_only.usage.completion_tokens == 0


def test_n_choices_sample_with_seed_plus_index(served: Served, client: openai.OpenAI) -> None:
    want = [local_chat(served.local, MESSAGES, 12, SamplingConfig(temperature=0.9, top_p=0.95, seed=7 + i))[0]
            for i in range(3)]
    got = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0.9, top_p=0.95, seed=7,
                                         max_tokens=12, n=3)
    assert [c.message.content for c in sorted(got.choices, key=lambda c: c.index)] == want
    assert len(set(want)) > 1  # the seeds differ, so do the choices
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0.9, top_p=0.95,
                                              seed=7, max_tokens=12, n=3, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == want


def test_errors_are_the_packages_exception_types(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=600)
    assert overflow.value.code == "context_length_exceeded" and "512" in overflow.value.message
    for penalty in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.BadRequestError) as out_of_range:
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **{penalty: 2.5})
        assert out_of_range.value.param == penalty and "[-2, 2]" in out_of_range.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=[PROMPT, PROMPT])


def test_api_key(served: Served) -> None:
    app = create_app(SwarmGenerator(served.model), MODEL_NAME, GatewayConfig(api_key="s3cret"))
    with ApiServer(app) as server:
        base = f"{server.url}/v1"
        for key in ("wrong", "s3cre"):
            with openai.OpenAI(base_url=base, api_key=key, max_retries=0) as bad, \
                    pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0) as good:
            assert [m.id for m in good.models.list().data] == [MODEL_NAME]
            got = good.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=4)
            assert got.choices[0].message.content == local_chat(served.local, MESSAGES, 4)[0]


def test_a_model_the_swarm_cannot_serve_is_503(served: Served) -> None:
    import httpx

    from meshinfer.client.model import DistributedModel
    from meshinfer.testing.checkpoints import tiny_checkpoint

    other = tiny_checkpoint("qwen2")  # nobody serves it in this swarm
    with DistributedModel.from_pretrained(other, served.swarm.initial_peers, route_wait=0.5) as model, \
            ApiServer(create_app(SwarmGenerator(model), "unserved")) as server, \
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(model="unserved", messages=MESSAGES, max_tokens=4, stream=stream)
            assert info.value.status_code == 503 and info.value.code == "no_route"
            assert "no online servers cover blocks" in info.value.message
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["swarm"]["ok"] is False
