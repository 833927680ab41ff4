"""A tiny checkpoint whose chat template supports tools (Qwen2.5's, Hermes-style ``<tool_call>`` calls, by default),
and the real tool-calling templates of Llama 3.1 (``LLAMA31_TEMPLATE``) and Mistral's recent tokenizers
(``MISTRAL_ARGS_TEMPLATE``), transcribed (shortened where noted) for tests that need no network.

Contract: ``tool_checkpoint(dest)`` copies a tiny checkpoint (``tiny_checkpoint("llama", variant="llama3")`` by
default, whose tokenizer has ChatML's ``<|im_start|>`` / ``<|im_end|>``) to ``dest``, writes ``QWEN25_TEMPLATE``
(or ``template``) into its ``tokenizer_config.json`` and a longer context (2048) into ``config.json``: the gateway
then renders tools, parses ``<tool_call>`` output and enforces forced calls as it would for Qwen2.5. The template is
Qwen2.5-Instruct's, transcribed here (the Hermes tool prompt, ``<tool_call>`` per call, ``tool`` results in a
``user`` turn as ``<tool_response>``). ``special_markers`` makes given tokens special tokens of its tokenizer (as
real Mistral tokenizers have ``[TOOL_CALLS]`` / ``[ARGS]``, which decoding skips). Knows files only; no network.
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

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function "
        "call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim
            + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
"""Llama 3.1-Instruct's chat template (JSON tool calls ``{"name", "parameters"}``, tools in the first user message,
results as ``ipython`` turns), without its built-in tools (brave_search, wolfram_alpha: ``<|python_tag|>`` calls)."""

MISTRAL_ARGS_TEMPLATE = """{%- set default_system_message = '' %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message != '' %}
    {{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}
{%- endif %}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in loop_messages %}
    {%- if m['role'] == 'user' %}
        {%- set ns.last_user_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if tools is defined and tools is not none and tools|length > 0 and loop.index0 == ns.last_user_index %}
            {{- '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is defined and message['content'] is not none %}
            {{- message['content'] }}
        {%- endif %}
        {%- if message['tool_calls'] is defined and message['tool_calls'] is not none
               and message['tool_calls']|length > 0 %}
            {%- for tool in message['tool_calls'] %}
                {%- set arguments = tool['function']['arguments'] %}
                {%- if arguments is not string %}
                    {%- set arguments = arguments|tojson|safe %}
                {%- elif arguments == '' %}
                    {%- set arguments = '{}' %}
                {%- endif %}
                {{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}
            {%- endfor %}
        {%- endif %}
        {{- eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS]' + message['content']|string + '[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported, got ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""
"""The chat template of Mistral's recent tokenizers (Ministral 3, Devstral Small 2: ``[TOOL_CALLS]name[ARGS]{...}``
per call, ``[AVAILABLE_TOOLS]`` before the last user turn, ``[TOOL_RESULTS]``), without its image and thinking
parts and its default system prompt."""


def tool_checkpoint(dest: str | Path, source: str | Path | None = None, *, context: int = 2048,
                    template: str = QWEN25_TEMPLATE) -> Path:
    """``source`` (default: the llama3-variant tiny checkpoint) copied to ``dest`` with ``template`` and
    ``context`` positions (the template's tool prompt alone is ~300 tokens of the tiny 512-token vocabulary)."""
    src = Path(source) if source is not None else tiny_checkpoint("llama", variant="llama3")
    out = Path(dest)
    shutil.copytree(src, out, dirs_exist_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))
    model_config = json.loads((out / "config.json").read_text())
    model_config["max_position_embeddings"] = context
    (out / "config.json").write_text(json.dumps(model_config, indent=2))
    return out


MISTRAL_MARKERS = {2: "[TOOL_CALLS]", 3: "[ARGS]"}
"""The special tokens ``special_markers`` gives by default: ids 2 and 3 (the tiny tokenizer's ``<|pad|>`` and
``<|im_start|>``, which the Mistral template never uses; the pad token becomes the eos token)."""


def special_markers(directory: str | Path, markers: dict[int, str] | None = None) -> Path:
    """Rename the special tokens of ``directory``'s tokenizer at the ids of ``markers`` to its texts (in
    ``tokenizer.json`` and ``tokenizer_config.json``): a tokenizer that, like Mistral's real ones, encodes
    ``[TOOL_CALLS]`` as one special token the model can emit and ``decode(skip_special_tokens=True)`` drops."""
    out = Path(directory)
    names = MISTRAL_MARKERS if markers is None else markers
    tok_path, config_path = out / "tokenizer.json", out / "tokenizer_config.json"
    tok, config = json.loads(tok_path.read_text()), json.loads(config_path.read_text())
    renamed: dict[str, str] = {}
    for entry in tok["added_tokens"]:
        if entry["id"] in names:
            renamed[entry["content"]] = names[entry["id"]]
            entry["content"] = names[entry["id"]]
    vocab = tok["model"]["vocab"]  # the BPE vocabulary spells the special tokens too (trained first)
    tok["model"]["vocab"] = {renamed.get(piece, piece): i for piece, i in vocab.items()}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        if int(key) in names:
            entry["content"] = names[int(key)]
    if set(names) - {e["id"] for e in tok["added_tokens"] if e["special"]}:
        raise ValueError(f"ids {sorted(names)} are not all special tokens of {out}")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if config.get(key) in renamed:
            config[key] = config["eos_token"] if key == "pad_token" else renamed[config[key]]
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))
    config_path.write_text(json.dumps(config, indent=2))
    special_map = out / "special_tokens_map.json"
    if special_map.exists():
        mapping = json.loads(special_map.read_text())
        mapping = {k: (config.get(k, v) if v in renamed else v) for k, v in mapping.items()}
        special_map.write_text(json.dumps(mapping, indent=2))
    return out
