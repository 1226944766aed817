"""Length-prefixed frames: ``type:u8 | length:u32be | body``.

The decoder checks the declared length against the current bound *before* it waits for or keeps
the body, so a peer cannot make us buffer more than ``max_body`` bytes per frame (invariant D).
The bound changes once: small during the handshake, negotiated afterwards.
"""

from __future__ import annotations

import enum
import struct

from .errors import ErrorCode, ProtocolError

HEADER = struct.Struct(">BI")
HEADER_BYTES = HEADER.size


class FrameType(enum.IntEnum):
    """Frame type byte. 0x0_ plaintext handshake, 0x1_ sealed control, 0x20 bulk chunk."""

    HELLO = 0x01
    AUTH = 0x02
    ABORT = 0x03
    HEADER = 0x10
    ACK = 0x11
    REJECT = 0x12
    CREDIT = 0x13
    CLOSE = 0x14
    DIGEST = 0x15
    CHUNK = 0x20


_KNOWN = frozenset(int(t) for t in FrameType)


def encode_frame(ftype: FrameType, body: bytes | bytearray | memoryview) -> bytes:
    """One frame as bytes (copies ``body``; bulk paths build frames in place instead)."""
    return HEADER.pack(int(ftype), len(body)) + bytes(body)


class FrameDecoder:
    """Incremental frame parser: feed bytes, pull ``(type, body)`` pairs. Never buffers > bound.

    Consumed bytes are dropped lazily (read offset + occasional compaction), so a feed holding many
    frames costs O(n), not O(n²) memmoves.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data
        if self.buffered >= HEADER_BYTES:
            self._check_header()

    def _check_header(self) -> tuple[int, int]:
        ftype, length = HEADER.unpack_from(self._buf, self._pos)
        if ftype not in _KNOWN:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown frame type 0x{ftype:02x}")
        if length > self.max_body:
            raise ProtocolError(ErrorCode.LIMIT, f"frame of {length} bytes exceeds {self.max_body}")
        return ftype, length

    def next_frame(self) -> tuple[FrameType, bytes] | None:
        """The next complete frame, or None if more bytes are needed."""
        if self.buffered < HEADER_BYTES:
            return None
        ftype, length = self._check_header()
        start = self._pos + HEADER_BYTES
        end = start + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as mv:
            body = bytes(mv[start:end])
        self._pos = end
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= 1 << 20 and self._pos * 2 >= len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        return FrameType(ftype), body

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos
