"""Bounded reads on libp2p streams: every length is checked before memory is allocated."""

from __future__ import annotations

import struct

import msgpack
from libp2p.network.stream.exceptions import StreamEOF

_LEN = struct.Struct(">I")


class FrameError(ValueError):
    """A peer sent a frame that is too large, truncated or malformed."""


async def read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except StreamEOF:
            chunk = b""
        if not chunk:
            raise FrameError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream, max_bytes: int) -> bytes:
    """One ``u32 length || body`` frame; the length is checked against ``max_bytes`` first."""
    (n,) = _LEN.unpack(await read_exactly(stream, 4))
    if n > max_bytes:
        raise FrameError(f"frame of {n} bytes exceeds limit {max_bytes}")
    return await read_exactly(stream, n)


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def unpack_bounded(data: bytes, max_items: int = 4096, max_str: int = 4096):
    """msgpack decode with strict container/string limits (never pickle, never ext types)."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=max_str, max_bin_len=len(data),
            max_array_len=max_items, max_map_len=max_items, max_ext_len=0,
        )
    except Exception as exc:
        raise FrameError(f"malformed msgpack: {exc}") from None
