"""A tiny checkpoint whose chat template supports tools (Qwen2.5's, Hermes-style ``<tool_call>`` calls).

Contract: ``tool_checkpoint(dest)`` copies a tiny checkpoint (``tiny_checkpoint("llama", variant="llama3")`` by
default, whose tokenizer has ChatML's ``<|im_start|>`` / ``<|im_end|>``) to ``dest``, writes ``QWEN25_TEMPLATE``
into its ``tokenizer_config.json`` and a longer context (2048) into ``config.json``: the gateway then renders
tools, parses ``<tool_call>`` output and enforces forced calls as it would for Qwen2.5. The template is
Qwen2.5-Instruct's, transcribed here (the Hermes tool prompt, ``<tool_call>`` per call, ``tool`` results in a
``user`` turn as ``<tool_response>``). Knows files only; no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from meshinfer.testing.checkpoints import tiny_checkpoint

QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
"""Qwen2.5-Instruct's chat template (tools as Hermes-style ``<tool_call>`` JSON)."""


def tool_checkpoint(dest: str | Path, source: str | Path | None = None, *, context: int = 2048) -> Path:
    """``source`` (default: the llama3-variant tiny checkpoint) copied to ``dest`` with ``QWEN25_TEMPLATE`` and
    ``context`` positions (the template's tool prompt alone is ~300 tokens of the tiny 512-token vocabulary)."""
    src = Path(source) if source is not None else tiny_checkpoint("llama", variant="llama3")
    out = Path(dest)
    shutil.copytree(src, out, dirs_exist_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = QWEN25_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    model_config = json.loads((out / "config.json").read_text())
    model_config["max_position_embeddings"] = context
    (out / "config.json").write_text(json.dumps(model_config, indent=2))
    return out
