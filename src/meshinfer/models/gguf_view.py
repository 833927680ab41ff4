"""GGUF view directories: a GGUF file seen as a checkpoint directory, zero-copy, and where its tensors lie.

Contract: ``gguf_view(path)`` turns a GGUF file (checked completely by ``models.gguf_file.GgufFile``) into a
VIEW DIRECTORY ``<cache>/gguf/<stem>-<key>/`` (``<cache>``: the argument, else ``config.cache_root()``;
``key``: sha256 of the file's absolute path, size and mtime_ns, 16 hex characters) holding ``model.gguf`` (a
symlink: the tensor bytes stay in the user's file), ``config.json`` (derived from the GGUF metadata, with a
``meshinfer_gguf`` section: version, architecture, ``qk_permuted`` and per HF tensor name its ggml type and
logical shape), ``generation_config.json``, ``gguf-metadata.json`` (every key/value but ``GGUF.*``, canonical
JSON: what a peer that fetched only tensors rebuilds the tokenizer from), ``tokenizer/`` (derived files, not
part of the model id; rebuilt when missing, ``ensure_tokenizer_dir``) and ``.gguf-view.json`` (internal, not
part of the model id: the source's path, size and mtime and each tensor's byte range, so a view is reopened
without parsing the GGUF again). JSON files are deterministic. A view is built in a temporary directory and
renamed into place, and reused while valid; a view whose source vanished or changed is a one-line
``CheckpointError`` (opening the .gguf file again makes a new view: the key changes with the file).

Inside a GGUF-sourced checkpoint (a view, or a fetched copy: config.json, gguf-metadata.json and safetensors
files) tensors have their Hugging Face names and keep their GGUF bytes (q/k rows still permuted when
``qk_permuted``); their container form (``view_locations``, and the safetensors entries of fetched copies) is
``ggml_types.container``: F32/F16/BF16 as themselves, quantized types as ``U8`` ``[rows, row_bytes]``.
File I/O, numpy and gguf only: no torch (manifests and seeding of views stay torch-free), no network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from meshinfer.errors import CheckpointError, MeshinferError
from meshinfer.models import ggml_types
from meshinfer.models.gguf_file import SUPPORTED_ARCHITECTURES, GgufFile, is_gguf_file
from meshinfer.models.safetensors_files import DTYPE_BYTES, TensorLocation

SECTION = "meshinfer_gguf"
VIEW_VERSION = 1
VIEW_GGUF = "model.gguf"
METADATA_FILE = "gguf-metadata.json"
TOKENIZER_DIR = "tokenizer"
VIEW_TABLE = ".gguf-view.json"
_VIEWS = "gguf"


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _pretty(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


# ---- recognising GGUF-sourced checkpoints ------------------------------------------------------


def gguf_section(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checked ``meshinfer_gguf`` section of ``root/config.json``; None for other checkpoints."""
    path = Path(root) / "config.json"
    config = _read_json(path)
    if not isinstance(config, dict) or SECTION not in config:
        return None
    section = config[SECTION]
    ok = (isinstance(section, dict) and section.get("version") == VIEW_VERSION
          and section.get("architecture") in SUPPORTED_ARCHITECTURES and isinstance(section.get("qk_permuted"), bool)
          and isinstance(section.get("tensors"), dict))
    if ok:
        for entry in section["tensors"].values():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], list) and all(isinstance(d, int) and d > 0 for d in entry[1])):
                ok = False
                break
    if not ok:
        raise CheckpointError(f"{path}: malformed '{SECTION}' section (version {VIEW_VERSION} expected)")
    return section


def is_gguf_sourced(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` is a GGUF-sourced checkpoint: a view or a fetched copy (config.json has the section)."""
    try:
        return gguf_section(root) is not None
    except CheckpointError:
        return True  # it claims to be one: let the reader report what is wrong


def is_gguf_view(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` is a GGUF view: the section in config.json and a ``model.gguf`` entry (even dangling)."""
    return os.path.lexists(Path(root) / VIEW_GGUF) and is_gguf_sourced(root)


# ---- views -------------------------------------------------------------------------------------


def views_root(cache: str | os.PathLike[str] | None = None) -> Path:
    from meshinfer.config import cache_root

    return (Path(cache).expanduser() if cache is not None else cache_root()) / _VIEWS


def _source(path: str | os.PathLike[str]) -> tuple[Path, os.stat_result]:
    src = Path(path).expanduser().resolve()
    try:
        st = src.stat()
    except OSError as err:
        raise CheckpointError(f"cannot read {src}: {err.strerror or err}") from None
    if not src.is_file() or not is_gguf_file(src):
        raise CheckpointError(f"{src} is not a GGUF file (it does not start with b'GGUF')")
    return src, st


def _signature(src: Path, size: int, mtime_ns: int) -> list[Any]:
    return [str(src), size, mtime_ns]


def _view_name(src: Path, size: int, mtime_ns: int) -> str:
    key = hashlib.sha256(_canonical(_signature(src, size, mtime_ns))).hexdigest()[:16]
    return f"{src.stem[:80]}-{key}"


def _valid_view(view: Path, signature: list[Any]) -> bool:
    table = _read_json(view / VIEW_TABLE)
    try:
        return (isinstance(table, dict) and table.get("version") == VIEW_VERSION and table.get("source") == signature
                and os.readlink(view / VIEW_GGUF) == signature[0] and gguf_section(view) is not None
                and all((view / n).is_file() for n in ("generation_config.json", METADATA_FILE)))
    except (OSError, CheckpointError):
        return False


def gguf_view(path: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """The view directory of the GGUF file ``path`` (made, atomically, unless a valid one exists)."""
    src, st = _source(path)
    root = views_root(cache)
    view = root / _view_name(src, st.st_size, st.st_mtime_ns)
    if _valid_view(view, _signature(src, st.st_size, st.st_mtime_ns)):
        return view
    gguf = GgufFile(src)
    view = root / _view_name(src, gguf.size, gguf.mtime_ns)  # the state the header was read in
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-view-", dir=root))
    except OSError as err:
        raise CheckpointError(f"cannot create a GGUF view in {root}: {err.strerror or err}") from None
    try:
        _write_view(gguf, src, tmp)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, view, keep_existing=lambda: _valid_view(view, _signature(src, gguf.size, gguf.mtime_ns)))
    except OSError as err:
        raise CheckpointError(f"cannot write the GGUF view {view}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def replace_dir(tmp: Path, final: Path, keep_existing: Any = None) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is kept when ``keep_existing()`` (a concurrent
    writer won), else moved aside and removed."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists() and not final.is_symlink():
            raise
    if keep_existing is not None and keep_existing():
        return
    old = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
    os.rename(final, old / "x")
    try:
        os.rename(tmp, final)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_view(gguf: GgufFile, src: Path, tmp: Path) -> None:
    config = gguf.hf_config()
    config[SECTION] = {
        "version": VIEW_VERSION, "architecture": gguf.architecture, "qk_permuted": gguf.qk_permuted,
        "tensors": {name: [t.ggml_type, list(t.shape)] for name, t in gguf.tensors.items()},
    }
    try:
        metadata = _canonical(gguf.metadata)
    except ValueError:
        raise CheckpointError(f"{src}: GGUF metadata holds a value JSON cannot carry (NaN or infinity)") from None
    os.symlink(str(src), tmp / VIEW_GGUF)
    (tmp / "config.json").write_text(_pretty(config), encoding="utf-8")
    (tmp / "generation_config.json").write_text(_pretty(gguf.generation_config()), encoding="utf-8")
    (tmp / METADATA_FILE).write_bytes(metadata)
    table = {"version": VIEW_VERSION, "source": _signature(src, gguf.size, gguf.mtime_ns),
             "tensors": {name: [t.gguf_name, t.start, t.end] for name, t in gguf.tensors.items()}}
    (tmp / VIEW_TABLE).write_text(_pretty(table), encoding="utf-8")
    from meshinfer.models.gguf_tokenizer import write_tokenizer_files

    with contextlib.suppress(MeshinferError):  # an unsupported tokenizer must not stop serving the weights
        write_tokenizer_files(gguf.metadata, tmp / TOKENIZER_DIR)


def view_table(root: Path) -> dict[str, list[Any]]:
    """The view's byte table, after checking its source file is still the one it was made from."""
    table = _read_json(root / VIEW_TABLE)
    if not (isinstance(table, dict) and table.get("version") == VIEW_VERSION and isinstance(table.get("tensors"), dict)
            and isinstance(table.get("source"), list) and len(table["source"]) == 3):
        raise CheckpointError(f"{root} is an incomplete GGUF view ({VIEW_TABLE} missing or malformed); open the "
                              f".gguf file again")
    target, size, mtime_ns = table["source"]
    try:
        st = (root / VIEW_GGUF).stat()
    except OSError:
        raise CheckpointError(f"the GGUF file {target} behind the view {root} is gone") from None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise CheckpointError(f"the GGUF file {target} changed after its view {root} was made; open the .gguf "
                              f"file again to make a new view")
    return table["tensors"]


def view_locations(root: str | os.PathLike[str]) -> dict[str, TensorLocation]:
    """Every tensor of a GGUF view -> where its bytes lie in ``root/model.gguf`` (container dtype and shape)."""
    root = Path(root)
    section = gguf_section(root)
    if section is None:
        raise CheckpointError(f"{root} is not a GGUF view")
    table = view_table(root)
    out: dict[str, TensorLocation] = {}
    for name, (ggml_type, shape) in section["tensors"].items():
        entry = table.get(name)
        dtype, cshape = container_of(name, ggml_type, shape)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[2] - entry[1] == math.prod(cshape)
                * DTYPE_BYTES[dtype]):
            raise CheckpointError(f"{root}: {VIEW_TABLE} disagrees with config.json about tensor {name}")
        out[name] = TensorLocation(root / VIEW_GGUF, dtype, cshape, int(entry[1]), int(entry[2]))
    return out


def container_of(name: str, ggml_type: str, shape: list[int]) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, shape) of tensor ``name``'s container (errors name the tensor)."""
    ggml_types.check_supported_type(ggml_type, f"tensor {name}")
    try:
        return ggml_types.container(ggml_type, shape)
    except ValueError as err:
        raise CheckpointError(f"tensor {name}: {err}") from None


def ensure_tokenizer_dir(root: str | os.PathLike[str]) -> Path | None:
    """``root/tokenizer`` of a GGUF-sourced checkpoint, built from gguf-metadata.json (atomically) when
    missing; None when ``root`` cannot be written (the caller then builds the tokenizer in memory)."""
    from meshinfer.models.gguf_tokenizer import write_tokenizer_files

    root = Path(root)
    tokdir = root / TOKENIZER_DIR
    if all((tokdir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return tokdir
    metadata = read_metadata(root)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=root))
    except OSError:
        return None
    try:
        write_tokenizer_files(metadata, tmp)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, tokdir, keep_existing=lambda: (tokdir / "tokenizer_config.json").is_file())
    except OSError:
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokdir


def read_metadata(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The GGUF key/values stored in ``root/gguf-metadata.json``."""
    path = Path(root) / METADATA_FILE
    metadata = _read_json(path)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is missing or not a JSON object (needed to build the tokenizer)")
    return metadata
