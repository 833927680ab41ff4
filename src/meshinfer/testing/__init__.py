"""Helpers shared by tests, the demo and benchmarks: real HF-format checkpoints built locally.

Contract: everything here writes or reads local files only; it sits above client/server in the layer
order so that it may later start local swarms. Import the submodules (``testing.checkpoints``,
``testing.tokenizer``) for the API; importing this package does not import torch.
"""
