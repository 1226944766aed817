"""Wire format of ``/latentlink/crdt/1.0.0``: length-prefixed msgpack frames, decoded with limits.

Every frame is ``u32 big-endian length || msgpack body``, built and split by the project's one
framing helper (:mod:`discovery.streamio`). The length is checked against
``CrdtLimits.max_frame_bytes`` before a byte of the body is buffered (DESIGN.md invariant D), and the
body is parsed by msgpack with per-object limits, then checked field by field. Any malformed input
raises :class:`SyncProtocolError` and nothing else (the helper's ``FrameError`` is mapped onto it).

Bodies (msgpack arrays):

* ``[1, doc_id, want_reply, [[author, writer, seq], ...]]``        STEP1: my version vector
* ``[2, doc_id, [[author, writer, first_seq, last_seq], ...]]``     REQUEST: send me these records
* ``[3, doc_id, [[author, writer, seq, update, pubkey, sig], ...]]`` RECORDS: signed updates

``author`` is the libp2p peer ID (bytes), ``writer`` an 8-byte incarnation chosen at each start so
that a restarted node never reuses a sequence number it may have lost in a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crdt_state.limits import CrdtLimits
from discovery.streamio import LEN, FrameError, FrameReader, frame, pack, unpack_bounded

T_STEP1 = 1
T_REQUEST = 2
T_RECORDS = 3

MAX_DOC_ID = 256
MAX_AUTHOR = 64
WRITER_LEN = 8
MAX_KEY = 128
MAX_SIG = 128
MAX_SEQ = (1 << 53) - 1

__all__ = ["LEN", "FrameDecoder", "Records", "Request", "SignedUpdate", "Step1",
           "SyncProtocolError", "decode_body", "encode", "encode_records"]

WriterKey = tuple[bytes, bytes]  # (author peer-id bytes, writer incarnation)


class SyncProtocolError(Exception):
    """A peer sent bytes that are not a valid frame/message; the stream should be dropped."""


@dataclass(frozen=True)
class SignedUpdate:
    """One pycrdt update as its author signed it; relayed unchanged so anyone can re-verify."""

    doc_id: str
    author: bytes
    writer: bytes
    seq: int
    update: bytes
    pubkey: bytes
    sig: bytes

    @property
    def key(self) -> WriterKey:
        return (self.author, self.writer)

    def wire(self) -> list[Any]:
        return [self.author, self.writer, self.seq, self.update, self.pubkey, self.sig]

    def size(self) -> int:
        return len(self.update) + len(self.author) + len(self.pubkey) + len(self.sig) + 32

    def to_bytes(self) -> bytes:
        """Self-contained encoding for the on-disk log."""
        return pack([self.doc_id, *self.wire()])

    @classmethod
    def from_bytes(cls, data: bytes, limits: CrdtLimits) -> SignedUpdate:
        obj = _unpack(data, limits)
        if not isinstance(obj, list) or len(obj) != 7:
            raise SyncProtocolError("stored record: expected 7 fields")
        return _record(_doc_id(obj[0]), obj[1:])


@dataclass(frozen=True)
class Step1:
    doc_id: str
    vv: dict[WriterKey, int]
    want_reply: bool = False


@dataclass(frozen=True)
class Request:
    doc_id: str
    ranges: list[tuple[bytes, bytes, int, int]]


@dataclass(frozen=True)
class Records:
    doc_id: str
    records: list[SignedUpdate]


Message = Step1 | Request | Records


def encode(msg: Message) -> bytes:
    """One frame (length prefix included)."""
    if isinstance(msg, Step1):
        body: list[Any] = [T_STEP1, msg.doc_id, msg.want_reply,
                           [[a, w, s] for (a, w), s in msg.vv.items()]]
    elif isinstance(msg, Request):
        body = [T_REQUEST, msg.doc_id, [list(r) for r in msg.ranges]]
    else:
        body = [T_RECORDS, msg.doc_id, [r.wire() for r in msg.records]]
    return frame(pack(body))


def encode_records(doc_id: str, records: list[SignedUpdate], limits: CrdtLimits) -> list[bytes]:
    """Split records into as many frames as needed to keep each under ``max_frame_bytes``."""
    frames: list[bytes] = []
    batch: list[SignedUpdate] = []
    size = 0
    budget = limits.max_frame_bytes - 1024
    for rec in records:
        if batch and (size + rec.size() > budget or len(batch) >= limits.max_records_per_frame):
            frames.append(encode(Records(doc_id, batch)))
            batch, size = [], 0
        batch.append(rec)
        size += rec.size()
    if batch:
        frames.append(encode(Records(doc_id, batch)))
    return frames


def _unpack(data: bytes, limits: CrdtLimits) -> Any:
    """Bounded msgpack decode. No body of this protocol holds a map: the field checks below
    refuse one wherever it appears (the shared helper bounds maps like arrays while decoding)."""
    n = limits.max_frame_bytes
    try:
        return unpack_bounded(
            data, max_items=max(limits.max_records_per_frame, limits.max_writers_per_doc, 8),
            max_str=MAX_DOC_ID, max_bin=n, max_bytes=n)
    except FrameError as exc:
        raise SyncProtocolError(f"undecodable body: {exc}") from None


def _doc_id(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_DOC_ID:
        raise SyncProtocolError("bad doc_id")
    return v


def _bytes(v: Any, lo: int, hi: int, what: str) -> bytes:
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise SyncProtocolError(f"bad {what}")
    return v


def _seq(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEQ:
        raise SyncProtocolError("bad seq")
    return v


def _list(v: Any, n: int | None = None) -> list[Any]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise SyncProtocolError("bad array")
    return v


def _record(doc_id: str, f: list[Any]) -> SignedUpdate:
    f = _list(f, 6)
    return SignedUpdate(
        doc_id=doc_id, author=_bytes(f[0], 1, MAX_AUTHOR, "author"),
        writer=_bytes(f[1], WRITER_LEN, WRITER_LEN, "writer"), seq=_seq(f[2]),
        update=_bytes(f[3], 0, 1 << 62, "update"), pubkey=_bytes(f[4], 0, MAX_KEY, "pubkey"),
        sig=_bytes(f[5], 0, MAX_SIG, "signature"),
    )


def decode_body(data: bytes, limits: CrdtLimits) -> Message:
    """Parse one frame body (without its length prefix)."""
    obj = _list(_unpack(data, limits))
    if len(obj) < 3 or isinstance(obj[0], bool) or not isinstance(obj[0], int):
        raise SyncProtocolError("bad message header")
    kind, doc_id = obj[0], _doc_id(obj[1])
    if kind == T_STEP1:
        _list(obj, 4)
        if not isinstance(obj[2], bool):
            raise SyncProtocolError("bad want_reply")
        entries = _list(obj[3])
        if len(entries) > limits.max_writers_per_doc:
            raise SyncProtocolError("version vector too long")
        vv: dict[WriterKey, int] = {}
        for e in entries:
            e = _list(e, 3)
            key = (_bytes(e[0], 1, MAX_AUTHOR, "author"), _bytes(e[1], WRITER_LEN, WRITER_LEN, "writer"))
            vv[key] = _seq(e[2])
        return Step1(doc_id, vv, obj[2])
    if kind == T_REQUEST:
        _list(obj, 3)
        ranges = []
        for e in _list(obj[2]):
            e = _list(e, 4)
            first, last = _seq(e[2]), _seq(e[3])
            if first < 1 or last < first:
                raise SyncProtocolError("bad range")
            ranges.append((_bytes(e[0], 1, MAX_AUTHOR, "author"),
                           _bytes(e[1], WRITER_LEN, WRITER_LEN, "writer"), first, last))
        return Request(doc_id, ranges)
    if kind == T_RECORDS:
        _list(obj, 3)
        return Records(doc_id, [_record(doc_id, r) for r in _list(obj[2])])
    raise SyncProtocolError(f"unknown message type {kind}")


class FrameDecoder:
    """Reassembles frames from a byte stream; refuses a declared length over the limit up front."""

    def __init__(self, limits: CrdtLimits) -> None:
        self._limits = limits
        self._reader = FrameReader(limits.max_frame_bytes)

    def feed(self, data: bytes) -> list[Message]:
        try:
            bodies = self._reader.feed(data)
        except FrameError as exc:
            raise SyncProtocolError(str(exc)) from None
        return [decode_body(body, self._limits) for body in bodies]
