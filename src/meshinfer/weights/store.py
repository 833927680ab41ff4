"""The local weight cache: fetched pieces land in files laid out so that loading is a memory map.

Contract: a fetched model lives in ``<cache>/<model_id>/`` (``<cache>`` = the caller's directory, else
``config.cache_root()/models``: ``$MESHINFER_CACHE_DIR/models``, else ``~/.cache/meshinfer/models``) and is a
checkpoint directory that ``models.checkpoint.Checkpoint`` opens: ``meshinfer-manifest.json`` (so its
fingerprint IS the model id), the small files under their own names, one safetensors file per group
(``block-00003.safetensors``, ``client.safetensors``) and ``model.safetensors.index.json`` mapping the tensors
of the groups held. A group being fetched is a preallocated ``<name>.partial`` file with its final safetensors
header; each verified piece is written in place (``pwrite``); when every piece is in, the file is flushed and
renamed to its final name and the index is rewritten (atomically). Resume needs no side file: a partial file's
pieces are re-hashed from disk and only those that do not match are fetched again (a torn or missing write
never passes). ``write`` verifies a piece's size and sha256 before writing and refuses wrong bytes. The disk
budget (``check_budget``) is checked before anything is written: a fetch that would take the cache over
``max_bytes`` is a one-line ``ConfigError``. One process fetches a model at a time (``lock``). File I/O only:
no network, no torch; methods block, call them from a thread when on an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from meshinfer.config import cache_root
from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models.fingerprint import MANIFEST_NAME, write_manifest_file
from meshinfer.models.safetensors_files import INDEX_FILE
from meshinfer.weights.manifest import CLIENT_GROUP, Group, Item, Manifest, PieceRef

PARTIAL_SUFFIX = ".partial"
LOCK_NAME = ".lock"


def models_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where fetched models live: ``cache``, else ``config.cache_root()/models``."""
    return Path(cache).expanduser() if cache is not None else cache_root() / "models"


def group_filename(group: Group) -> str:
    if group.kind == "file":
        return group.items[0].name
    if group.key == CLIENT_GROUP:
        return "client.safetensors"
    return f"block-{int(group.key.split(':')[1]):05d}.safetensors"


def safetensors_header(group: Group) -> bytes:
    """The 8-byte length plus JSON header of a group's safetensors file (padded to 8 bytes, as writers do)."""
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for item in group.items:
        doc[item.name] = {"dtype": item.dtype, "shape": list(item.shape),
                          "data_offsets": [item.offset, item.offset + item.size]}
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def directory_bytes(root: Path) -> int:
    """Total size of the files under ``root`` (0 if it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class PartialGroup:
    """A group being fetched: its ``.partial`` file, open for verified in-place writes."""

    def __init__(self, store: ModelStore, group: Group) -> None:
        self.store, self.group = store, group
        self.path = store.path / (group_filename(group) + PARTIAL_SUFFIX)
        self.header = safetensors_header(group) if group.kind == "tensor" else b""
        self.file_size = len(self.header) + group.size
        self._fd: int | None = None
        self._missing: set[PieceRef] = set()
        self.reused = 0

    def open(self) -> list[PieceRef]:
        """Create (or resume) the partial file; returns the pieces still to fetch (re-hashing what is there)."""
        pieces = self.store.manifest.pieces_of(self.group)
        resumed = self.path.is_file() and self.path.stat().st_size == self.file_size
        if resumed and self.header:
            with self.path.open("rb") as f:
                resumed = f.read(len(self.header)) == self.header
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if resumed else os.O_TRUNC), 0o644)
            if not resumed:
                os.pwrite(self._fd, self.header, 0)
                os.ftruncate(self._fd, self.file_size)
        except OSError as err:
            raise CheckpointError(f"cannot write {self.path}: {err.strerror or err}") from None
        missing = [p for p in pieces if not (resumed and self._on_disk(p))]
        self.reused = len(pieces) - len(missing)
        self._missing = set(missing)
        return missing

    def _where(self, ref: PieceRef) -> tuple[Item, int, int]:
        found = self.store.manifest.item(ref.kind, ref.name)
        if found is None or found[0].key != self.group.key or not 0 <= ref.index < len(found[1].pieces):
            raise CheckpointError(f"{ref} is not part of {self.group.key}")
        item = found[1]
        start, end = self.store.manifest.piece_bounds(item, ref.index)
        return item, len(self.header) + item.offset + start, end - start

    def _on_disk(self, ref: PieceRef) -> bool:
        item, offset, length = self._where(ref)
        assert self._fd is not None
        data = os.pread(self._fd, length, offset)
        return len(data) == length and hashlib.sha256(data).hexdigest() == item.pieces[ref.index]

    def write(self, ref: PieceRef, data: bytes) -> bool:
        """Verify ``data`` as piece ``ref`` and write it in place; False (nothing written) when it is wrong."""
        item, offset, length = self._where(ref)
        if len(data) != length or hashlib.sha256(data).hexdigest() != item.pieces[ref.index]:
            return False
        if self._fd is None:
            raise CheckpointError(f"{self.path} is not open")
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise ConfigError(f"the disk holding {self.path} is full") from None
            raise CheckpointError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._missing.discard(ref)
        return True

    @property
    def complete(self) -> bool:
        return not self._missing

    def finish(self, *, durable: bool = True) -> Path:
        """All pieces are in: flush, rename to the final name, update the index; returns the final path."""
        if self._missing:
            raise CheckpointError(f"{self.group.key}: {len(self._missing)} pieces still missing")
        final = self.store.path / group_filename(self.group)
        try:
            if self._fd is not None:
                if durable:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            os.replace(self.path, final)
        except OSError as err:
            raise CheckpointError(f"cannot finish {final}: {err.strerror or err}") from None
        if self.group.kind == "tensor":
            self.store.write_index()
        return final

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class ModelStore:
    """The cache directory of one model (``<cache>/<model_id>``)."""

    def __init__(self, cache: str | os.PathLike[str] | None, manifest: Manifest) -> None:
        self.root = models_root(cache)
        self.manifest = manifest
        self.path = self.root / manifest.model_id
        self._index_lock = threading.Lock()

    @staticmethod
    def stored_manifest(cache: str | os.PathLike[str] | None, model_id: str) -> Manifest | None:
        """The manifest already in the cache for ``model_id`` (verified against the id), or None."""
        path = models_root(cache) / model_id / MANIFEST_NAME
        try:
            return Manifest.from_bytes(path.read_bytes(), model_id)
        except (OSError, CheckpointError):
            return None

    def final_size(self, group: Group) -> int:
        return (len(safetensors_header(group)) if group.kind == "tensor" else 0) + group.size

    def is_complete(self, group: Group) -> bool:
        path = self.path / group_filename(group)
        try:
            return path.stat().st_size == self.final_size(group)
        except OSError:
            return False

    def needed_bytes(self, groups: Iterable[Group]) -> int:
        """Bytes the cache grows by when ``groups`` are fetched (what partial files already hold is counted)."""
        total = 0
        for group in groups:
            if self.is_complete(group):
                continue
            partial = self.path / (group_filename(group) + PARTIAL_SUFFIX)
            have = partial.stat().st_size if partial.is_file() else 0
            total += max(0, self.final_size(group) - have)
        if not (self.path / MANIFEST_NAME).is_file():
            total += len(self.manifest.canonical_bytes())
        return total

    def check_budget(self, groups: Iterable[Group], max_bytes: int | None, what: str = "the wanted part") -> None:
        """ConfigError, before anything is written, when fetching ``groups`` would exceed ``max_bytes``."""
        if max_bytes is None:
            return
        needed, used = self.needed_bytes(groups), directory_bytes(self.root)
        if used + needed > max_bytes:
            raise ConfigError(
                f"fetching {what} of model {self.manifest.model_id} needs {human_bytes(needed)} more, but the cache "
                f"{self.root} already holds {human_bytes(used)} of its {human_bytes(max_bytes)} budget "
                f"(--max-cache-bytes {max_bytes}): free space there or raise the limit")

    def write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.stored_manifest(self.root, self.manifest.model_id) is None:
            write_manifest_file(self.path / MANIFEST_NAME, self.manifest.doc)

    def begin(self, group: Group) -> PartialGroup:
        self.path.mkdir(parents=True, exist_ok=True)
        return PartialGroup(self, group)

    def write_index(self) -> None:
        """Rewrite model.safetensors.index.json for the tensor groups held now (atomically)."""
        with self._index_lock:  # groups finish in several threads at once
            weight_map: dict[str, str] = {}
            total = 0
            for group in self.manifest.groups.values():
                if group.kind == "tensor" and group.items and self.is_complete(group):
                    weight_map.update({item.name: group_filename(group) for item in group.items})
                    total += group.size
            doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            tmp = self.path / f".{INDEX_FILE}.{os.getpid()}.tmp"
            try:
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
                os.replace(tmp, self.path / INDEX_FILE)
            except OSError as err:
                raise CheckpointError(f"cannot write {self.path / INDEX_FILE}: {err.strerror or err}") from None

    def try_lock(self) -> int | None:
        """Take this model's cache lock (one fetching process at a time) if it is free: the handle for
        ``release_lock``, or None when another process holds it. Never blocks."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire_lock(self, timeout: float = 600.0) -> int:
        """``try_lock`` until it succeeds (ConfigError after ``timeout`` s). Blocks: not for an event loop."""
        deadline = time.monotonic() + timeout
        while (fd := self.try_lock()) is None:
            if time.monotonic() > deadline:
                raise ConfigError(f"another process keeps fetching into {self.path}")
            time.sleep(0.2)
        return fd

    @staticmethod
    def release_lock(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor releases the lock
