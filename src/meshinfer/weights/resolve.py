"""What a ``--model`` reference names, for every command and ``from_pretrained``: one resolver.

Contract: ``local_checkpoint(ref)`` turns a reference that needs no swarm into a checkpoint directory that
``models.checkpoint.Checkpoint`` opens: an existing directory as is; a GGUF file through its zero-copy view
(``models.gguf.gguf_view``); a catalogue name (``smollm2``: ``weights.catalogue``) pulled and verified first,
then viewed. It returns None for what only a swarm can provide (a model id, a hub name ``org/name``), and
raises a one-line ``ConfigError`` for a path that does not exist or is neither a directory nor a GGUF file.
``display_name(ref, path)`` is the human name a model is announced and served under (the catalogue name, the
GGUF file's stem, or the directory's name). File I/O (and ``pip`` through the catalogue) only; no network of
its own, no torch.
"""

from __future__ import annotations

from pathlib import Path

from meshinfer.errors import ConfigError
from meshinfer.weights import catalogue
from meshinfer.weights.hub import is_hub_ref
from meshinfer.weights.manifest import is_model_id

GGUF_SUFFIX = ".gguf"


def local_checkpoint(ref: str, cache: str | None = None) -> Path | None:
    """The checkpoint directory ``ref`` names on this machine (see the module doc); None for swarm-only refs."""
    text = ref.strip()
    if not text:
        raise ConfigError("the model reference is empty: give a checkpoint directory, a .gguf file, a model id or a "
                          f"catalogue name ({', '.join(sorted(catalogue.CATALOGUE))})")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    from meshinfer.models.gguf import gguf_view, is_gguf_file  # GGUF support loads only when a GGUF is named

    if path.is_file():
        if path.suffix.lower() == GGUF_SUFFIX or is_gguf_file(path):
            return gguf_view(path, cache)
        raise ConfigError(f"model {text[:200]!r} is a file but not a GGUF file; give a checkpoint directory "
                          "(Hugging Face safetensors) or a .gguf file")
    if catalogue.is_catalogue_name(text):
        return gguf_view(catalogue.resolve(text, cache), cache)
    if is_model_id(text) or is_hub_ref(text):
        return None
    if path.suffix.lower() == GGUF_SUFFIX or "/" in text or text.startswith("."):
        raise ConfigError(f"model {text[:200]!r} does not exist")
    raise ConfigError(f"model {text[:200]!r} is neither a checkpoint directory, a .gguf file, a model id, a hub "
                      f"name (org/name) nor a catalogue name (known: {', '.join(sorted(catalogue.CATALOGUE))})")


def display_name(ref: str, path: Path | None = None) -> str:
    """The name a model is shown and served under: catalogue name, GGUF stem or directory name."""
    text = ref.strip()
    if catalogue.is_catalogue_name(text):
        return text.lower()
    p = Path(text).expanduser()
    if p.suffix.lower() == GGUF_SUFFIX:
        return p.stem
    if path is not None and (path / "model.gguf").is_symlink():
        return Path(path / "model.gguf").resolve().stem
    return (path or p).resolve().name if (path or p).exists() else text
