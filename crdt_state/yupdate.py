"""Strict decoder for the subset of Yjs/yrs update v1 that session documents are made of.

Why we read pycrdt's bytes ourselves: replica admission must know *which map key* an update
writes before pycrdt applies it (pycrdt has no dry run and a CRDT edit cannot be taken back), so
that per-key ownership ("an outcome is written by the message's receiver") is enforced on every
replica, deterministically, from the update alone.

Encoding (lib0, as Yjs ``encodeStateAsUpdate`` / yrs ``encode_v1``)::

    update  = varuint(#clients) { varuint(#structs) varuint(client) varuint(clock) struct* }
              delete_set
    item    = info:u8 [origin:id if info&0x80] [right_origin:id if info&0x40]
              [parent_info:varuint (1 = root name: varstring) parent_sub:varstring if info&0x20
               -- only when the item has neither origin]  content(info & 0x1f)
    id      = varuint(client) varuint(clock)
    delete_set = varuint(#clients) { varuint(client) varuint(#ranges) {varuint(clock) varuint(len)} }

Accepted subset: items whose content is one ``Any`` value (ref 8) or one deleted slot (ref 1),
directly under a root map. Everything else (GC and skip structs, strings, embedded shared types,
nested parents, subdocuments, trailing bytes) raises :class:`UpdateFormatError`: session documents
never contain them, and refusing them keeps the decoder small enough to trust.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

MAX_VARUINT = (1 << 53) - 1
MAX_DEPTH = 16

BIT_ORIGIN = 0x80
BIT_RIGHT_ORIGIN = 0x40
BIT_PARENT_SUB = 0x20
CONTENT_DELETED = 1
CONTENT_ANY = 8

ID = tuple[int, int]  # (client, clock)


class UpdateFormatError(ValueError):
    """The bytes are not an update of the accepted subset."""


@dataclass(frozen=True)
class Item:
    """One struct of the update, occupying exactly one clock tick."""

    client: int
    clock: int
    origin: ID | None
    right_origin: ID | None
    root: str | None      # given only when the item has no origin
    key: str | None       # ditto (the map key, "parent_sub")
    deleted: bool
    value: Any = None


@dataclass(frozen=True)
class Update:
    items: list[Item]
    deletes: list[tuple[int, int, int]]  # (client, first clock, length)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise UpdateFormatError("truncated update")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise UpdateFormatError("truncated update")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def varuint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if value > MAX_VARUINT:
                raise UpdateFormatError("varuint out of range")
            if b < 0x80:
                return value
            shift += 7

    def varint(self) -> int:
        b = self.byte()
        negative = bool(b & 0x40)
        value, shift = b & 0x3F, 6
        while b & 0x80:
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
            if value > MAX_VARUINT:
                raise UpdateFormatError("varint out of range")
        return -value if negative else value

    def string(self) -> str:
        try:
            return self.take(self.varuint()).decode("utf-8")
        except UnicodeDecodeError:
            raise UpdateFormatError("string is not UTF-8") from None

    def id(self) -> ID:
        return self.varuint(), self.varuint()

    def any(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise UpdateFormatError("value nested too deep")
        tag = self.byte()
        if tag in (126, 127):          # null, undefined
            return None
        if tag == 125:
            return self.varint()
        if tag == 124:
            return struct.unpack(">f", self.take(4))[0]
        if tag == 123:
            return struct.unpack(">d", self.take(8))[0]
        if tag == 122:
            return struct.unpack(">q", self.take(8))[0]
        if tag in (120, 121):
            return tag == 120
        if tag == 119:
            return self.string()
        if tag == 118:
            n = self.varuint()
            out: dict[str, Any] = {}
            for _ in range(n):
                k = self.string()
                out[k] = self.any(depth + 1)
            return out
        if tag == 117:
            return [self.any(depth + 1) for _ in range(self.varuint())]
        if tag == 116:
            return self.take(self.varuint())
        raise UpdateFormatError(f"unknown value tag {tag}")


def decode(data: bytes) -> Update:
    """Decode ``data`` completely or raise :class:`UpdateFormatError`."""
    r = _Reader(data)
    items: list[Item] = []
    for _ in range(r.varuint()):
        n_structs, client, clock = r.varuint(), r.varuint(), r.varuint()
        for _ in range(n_structs):
            items.append(_item(r, client, clock))
            clock += 1
            if clock > MAX_VARUINT:
                raise UpdateFormatError("clock out of range")
    deletes = []
    for _ in range(r.varuint()):
        client = r.varuint()
        for _ in range(r.varuint()):
            first, length = r.varuint(), r.varuint()
            if length == 0:
                raise UpdateFormatError("empty delete range")
            deletes.append((client, first, length))
    if r.pos != len(data):
        raise UpdateFormatError("trailing bytes after update")
    return Update(items, deletes)


def _item(r: _Reader, client: int, clock: int) -> Item:
    info = r.byte()
    ref = info & 0x1F
    if ref not in (CONTENT_ANY, CONTENT_DELETED):
        raise UpdateFormatError(f"unsupported struct or content type {ref}")
    origin = r.id() if info & BIT_ORIGIN else None
    right_origin = r.id() if info & BIT_RIGHT_ORIGIN else None
    root = key = None
    if origin is None and right_origin is None:
        if r.varuint() != 1:
            raise UpdateFormatError("item inside a nested shared type")
        root = r.string()
        if not info & BIT_PARENT_SUB:
            raise UpdateFormatError("sequence item in a root (maps only)")
        key = r.string()
    if r.varuint() != 1:  # Any: number of values; Deleted: number of deleted slots
        raise UpdateFormatError("item spans more than one slot")
    if ref == CONTENT_DELETED:
        return Item(client, clock, origin, right_origin, root, key, deleted=True)
    return Item(client, clock, origin, right_origin, root, key, deleted=False, value=r.any())
