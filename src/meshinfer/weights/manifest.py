"""A model's manifest as the fetcher and seeder use it: groups, items and pieces with their hashes.

Contract: ``Manifest`` wraps a validated manifest document (built, canonically encoded and hashed by
``meshinfer.models.fingerprint``: the model id IS the manifest's hash) and answers what the piece protocol
needs: the GROUPS a node can hold (every small file on its own, the client part, each block), the ITEMS of a
group (tensors in safetensors order, or one file) and the PIECES of an item (``PieceRef``: kind, name,
index) with their expected size and sha256. ``Manifest.from_bytes(data, model_id)`` is the only way bytes
from a peer become a manifest: size-limited, decoded without pickle, structurally validated, and refused
unless its hash equals ``model_id``. ``Want`` says which part of a model a node needs (blocks, client part,
or everything; config and tokenizer files always). Pure data: no I/O, no network, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import msgspec

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models.fingerprint import FINGERPRINT_HEX_CHARS, canonical_manifest_bytes, manifest_id, validate_manifest
from meshinfer.models.safetensors_files import DTYPE_BYTES
from meshinfer.types import BlockRange
from meshinfer.wire.pieces import MAX_MANIFEST_BYTES

Kind = Literal["tensor", "file"]
CLIENT_GROUP = "client"
_MODEL_ID = re.compile(rf"^[0-9a-f]{{{FINGERPRINT_HEX_CHARS}}}$")


def is_model_id(text: str) -> bool:
    """Whether ``text`` has the form of a model id (32 lowercase hex characters)."""
    return bool(_MODEL_ID.match(text))


def check_model_id(text: str) -> str:
    if not is_model_id(text):
        raise ConfigError(f"{text[:80]!r} is not a model id (expected {FINGERPRINT_HEX_CHARS} lowercase hex "
                          "characters, as printed by `meshinfer manifest DIR`)")
    return text


def block_group(block: int) -> str:
    return f"block:{block}"


def file_group(name: str) -> str:
    return f"file:{name}"


@dataclass(frozen=True, order=True)
class PieceRef:
    """One piece: ``index`` of the ``kind`` item ``name`` (a tensor name or a small file's name)."""

    kind: Kind
    name: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind} {self.name} piece {self.index}"


@dataclass(frozen=True)
class Item:
    """One tensor or file: its bytes, cut into pieces. ``offset``: where its bytes start in the group's
    data section (tensors; 0 for a file)."""

    kind: Kind
    name: str
    size: int
    pieces: tuple[str, ...]
    dtype: str = ""
    shape: tuple[int, ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class Group:
    """What a node holds or fetches as one unit: one file, the client part, or one block."""

    key: str
    kind: Kind
    items: tuple[Item, ...]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)

    @property
    def num_pieces(self) -> int:
        return sum(len(item.pieces) for item in self.items)


@dataclass(frozen=True)
class Want:
    """Which part of a model a node needs; config and tokenizer files are always included."""

    blocks: BlockRange | None = None
    client_part: bool = False
    everything: bool = False

    @classmethod
    def whole(cls) -> Want:
        return cls(everything=True)

    def describe(self) -> str:
        if self.everything:
            return "the whole model"
        parts = ([f"blocks {self.blocks}"] if self.blocks else []) + (["the client part"] if self.client_part else [])
        return " and ".join(parts) or "config and tokenizer files"


def _tensor_items(tensors: dict[str, Any]) -> tuple[Item, ...]:
    """Tensors in the order a safetensors writer lays them out (widest dtype first, then by name)."""
    names = sorted(tensors, key=lambda n: (-DTYPE_BYTES[tensors[n]["dtype"]], n))
    out, offset = [], 0
    for name in names:
        t = tensors[name]
        out.append(Item("tensor", name, t["size"], tuple(t["pieces"]), t["dtype"], tuple(t["shape"]), offset))
        offset += t["size"]
    return tuple(out)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest and its model id."""

    doc: dict[str, Any] = field(repr=False)
    model_id: str

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Manifest:
        validate_manifest(doc)
        return cls(doc, manifest_id(doc))

    @classmethod
    def from_bytes(cls, data: bytes, model_id: str) -> Manifest:
        """Decode manifest bytes a peer sent; CheckpointError unless valid and hashing to ``model_id``."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"manifest of {len(data)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
        try:
            doc = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError, ValueError):
            raise CheckpointError("manifest is not valid JSON") from None
        manifest = cls.from_doc(doc)
        if manifest.model_id != model_id:
            raise CheckpointError(f"manifest hashes to {manifest.model_id}, not to the model id {model_id}")
        return manifest

    def canonical_bytes(self) -> bytes:
        return self._canonical

    @cached_property
    def _canonical(self) -> bytes:
        return canonical_manifest_bytes(self.doc)

    @property
    def num_blocks(self) -> int:
        return int(self.doc["num_blocks"])

    @property
    def piece_size(self) -> int:
        return int(self.doc["piece_size"])

    @cached_property
    def groups(self) -> dict[str, Group]:
        out: dict[str, Group] = {}
        for name in sorted(self.doc["files"]):
            f = self.doc["files"][name]
            item = Item("file", name, f["size"], tuple(f["pieces"]))
            out[file_group(name)] = Group(file_group(name), "file", (item,))
        out[CLIENT_GROUP] = Group(CLIENT_GROUP, "tensor", _tensor_items(self.doc["client"]))
        for i, block in enumerate(self.doc["blocks"]):
            out[block_group(i)] = Group(block_group(i), "tensor", _tensor_items(block))
        return out

    @cached_property
    def _items(self) -> dict[tuple[str, str], tuple[Group, Item]]:
        return {(item.kind, item.name): (g, item) for g in self.groups.values() for item in g.items}

    def file_groups(self) -> list[Group]:
        return [g for g in self.groups.values() if g.kind == "file"]

    def groups_for(self, want: Want) -> list[Group]:
        """Files first, then the client part, then blocks in order."""
        out = self.file_groups()
        if want.everything or want.client_part:
            out.append(self.groups[CLIENT_GROUP])
        if want.everything:
            blocks = range(self.num_blocks)
        elif want.blocks is not None:
            try:
                want.blocks.check_within(self.num_blocks)
            except ConfigError as err:
                raise ConfigError(f"{err} (model {self.model_id})") from None
            blocks = want.blocks.blocks()
        else:
            blocks = range(0)
        return out + [self.groups[block_group(i)] for i in blocks]

    def item(self, kind: str, name: str) -> tuple[Group, Item] | None:
        return self._items.get((kind, name))

    def pieces_of(self, group: Group) -> list[PieceRef]:
        return [PieceRef(item.kind, item.name, i) for item in group.items for i in range(len(item.pieces))]

    def piece_bounds(self, item: Item, index: int) -> tuple[int, int]:
        """[start, end) of piece ``index`` within the item's bytes."""
        start = index * self.piece_size
        return start, min(item.size, start + self.piece_size)
