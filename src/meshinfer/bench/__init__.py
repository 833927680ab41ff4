"""Benchmarks behind ``meshinfer bench``. Each kind is one module; see ``meshinfer.cli.bench``."""
