"""Length-prefixed frames: ``type:u8 | length:u32be | body``.

The decoder checks the declared length against the current bound *before* it waits for or keeps
the body, so a peer cannot make us buffer more than ``max_body`` bytes per frame (invariant D).
The bound changes once: small during the handshake, negotiated afterwards.
"""

from __future__ import annotations

import enum
import struct
from collections import deque

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
    LANES = 0x16
    ABANDON = 0x17
    ABANDONED = 0x18
    CHUNK = 0x20


_KNOWN = frozenset(int(t) for t in FrameType)


def encode_frame(ftype: FrameType, body: bytes | bytearray | memoryview) -> bytes:
    """One frame as bytes (copies ``body``; bulk paths build frames in place instead)."""
    return HEADER.pack(int(ftype), len(body)) + bytes(body)


class FrameDecoder:
    """Incremental frame parser: feed bytes, pull ``(type, body)`` pairs. Never buffers > bound.

    Fed pieces are kept as they came (no growing buffer): a frame that lies inside one piece is
    returned as a zero-copy view of it, and one that straddles pieces is joined once. So each
    payload byte is copied at most once here, which matters for multi-MiB CHUNK frames. CHUNK
    bodies come back as ``memoryview`` (read-only, valid as long as referenced), others as ``bytes``.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._parts: deque[memoryview] = deque()
        self._size = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not len(data):
            return
        # bytes are immutable: keep a view; anything else the caller may reuse, so copy it once
        self._parts.append(memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B"))
        self._size += len(self._parts[-1])
        if self._size >= HEADER_BYTES:
            self._check_header()

    def _peek_header(self) -> tuple[int, int]:
        first = self._parts[0]
        raw = first[:HEADER_BYTES] if len(first) >= HEADER_BYTES else self._join(HEADER_BYTES, False)
        return HEADER.unpack(raw)

    def _check_header(self) -> tuple[int, int]:
        ftype, length = self._peek_header()
        if ftype not in _KNOWN:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown frame type 0x{ftype:02x}")
        if length > self.max_body:
            raise ProtocolError(ErrorCode.LIMIT, f"frame of {length} bytes exceeds {self.max_body}")
        return ftype, length

    def _join(self, n: int, consume: bool) -> memoryview:
        """The next ``n`` buffered bytes: a view of the first piece if it holds them, else a copy."""
        first = self._parts[0]
        if len(first) >= n:
            out = first[:n]
            if consume:
                rest = first[n:]
                if len(rest):
                    self._parts[0] = rest
                else:
                    self._parts.popleft()
                self._size -= n
            return out
        buf = bytearray(n)
        got, i = 0, 0
        while got < n:
            part = self._parts[i]
            take = min(len(part), n - got)
            buf[got:got + take] = part[:take]
            got += take
            if consume and take == len(part):
                self._parts.popleft()
            elif consume:
                self._parts[0] = part[take:]
            else:
                i += 1
        if consume:
            self._size -= n
        return memoryview(buf)

    def next_frame(self) -> tuple[FrameType, bytes | memoryview] | None:
        """The next complete frame, or None if more bytes are needed."""
        if self._size < HEADER_BYTES:
            return None
        ftype, length = self._check_header()
        if self._size < HEADER_BYTES + length:
            return None
        self._join(HEADER_BYTES, True)
        body = self._join(length, True) if length else memoryview(b"")
        if ftype != FrameType.CHUNK:
            return FrameType(ftype), bytes(body)
        return FrameType(ftype), body

    @property
    def buffered(self) -> int:
        return self._size
