"""Our model engine: pure torch block code for llama, mistral, qwen2 and qwen3, checkpoints, generation.

Contract: never imports network code. Public pieces: ``ModelSpec`` (architecture from config.json),
``BlockSpan`` (what a server runs), ``ClientHead`` (what a client keeps), ``KVCache``,
``Checkpoint``/``open_checkpoint``/``load_tokenizer`` (safetensors, per span) and ``LocalModel``
(local generation). Import them from their modules; this package module stays import-light.
"""
