"""A chat's next turn, re-rendered by SmolLM2's ChatML template and re-tokenised, starts with every token the
previous turn's session holds (prompt + answer up to, not including, its final ``<|im_end|>``, never sent): the
prompt cache (``client.prefix_cache``) can reuse it all. Checked with the real model and tokenizer, locally."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshinfer.client.prefix_cache import common_prefix
from meshinfer.models.engine import LocalModel

pytestmark = pytest.mark.slow


def test_chatml_turns_share_the_whole_held_history(smollm2_gguf: Path) -> None:
    local = LocalModel.from_pretrained(smollm2_gguf)
    tok = local.tokenizer
    eos = local.spec.eos_token_ids

    def render(messages: list[dict[str, str]]) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]

    messages = [{"role": "system", "content": "You are a concise assistant. " * 8},
                {"role": "user", "content": "Name three colours."}]
    for turn in range(2):
        prompt = render(messages)
        answer = local.generate(prompt, 24, stop_token_ids=eos)
        held = prompt + answer[:-1]  # the last token sampled is never run through the servers
        text = tok.decode([t for t in answer if t not in eos], skip_special_tokens=True)
        messages = [*messages, {"role": "assistant", "content": text},
                    {"role": "user", "content": f"And {turn + 2} more?"}]
        following = render(messages)
        assert common_prefix(held, following) >= len(held) - 2, (held[-6:], following[len(held) - 6:len(held) + 2])
