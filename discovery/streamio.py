"""Length-prefixed, bounded msgpack: the one framing helper every LatentLink protocol uses.

Frame = ``u32 big-endian length || msgpack body``. Every length is checked against the caller's
bound *before* a byte of the body is buffered, and every body is decoded by msgpack with explicit
container, string and binary limits, never pickle, never ``ext`` types (DESIGN.md invariant D).

Three shapes of the same thing:

* :func:`frame` / :func:`pack_frame` build a frame; :func:`unpack_bounded` decodes a body;
* :class:`FrameReader` is the sans-I/O reader (feed bytes, take complete bodies) for protocol
  cores that never touch a socket (``crdt_state.wire``, ``tensor_rpc.lanectl``);
* :func:`read_frame` / :func:`read_exactly` read one frame from a libp2p stream.

It lives in ``discovery`` because that is the lowest package: ``tensor_rpc`` and ``crdt_state``
may import it without an import cycle (dependencies point one way, DESIGN.md §2).
Errors are :class:`FrameError` only; each protocol maps it onto its own error type.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from libp2p.network.stream.exceptions import StreamEOF

LEN = struct.Struct(">I")


class FrameError(ValueError):
    """A peer sent a frame that is too large, truncated or malformed."""


def pack(obj: Any) -> bytes:
    """msgpack with ``bin`` for bytes (the encoding every reader here expects)."""
    return msgpack.packb(obj, use_bin_type=True)


def frame(body: bytes | bytearray | memoryview) -> bytes:
    """``u32 length || body``."""
    return LEN.pack(len(body)) + bytes(body)


def pack_frame(obj: Any, max_bytes: int | None = None) -> bytes:
    """One frame holding ``obj``; refuses (ValueError) a body the peer's reader would drop."""
    body = pack(obj)
    if max_bytes is not None and len(body) > max_bytes:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {max_bytes}")
    return frame(body)


def unpack_bounded(data: bytes | bytearray | memoryview, max_items: int = 4096,
                   max_str: int = 4096, max_bin: int | None = None,
                   max_bytes: int | None = None, max_map: int | None = None) -> Any:
    """Decode one msgpack object with strict limits: at most ``max_items`` entries per array
    (and per map, unless ``max_map`` is given), ``max_str`` bytes per string, ``max_bin`` per
    binary (default: the body's size), and a body of at most ``max_bytes``. Anything else raises
    :class:`FrameError`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise FrameError(f"body of {len(data)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, use_list=True, max_str_len=max_str,
            max_bin_len=len(data) if max_bin is None else max_bin,
            max_array_len=max_items, max_map_len=max_items if max_map is None else max_map, max_ext_len=0,
        )
    except Exception as exc:  # ExtraData, FormatError, StackError, ValueError, UnicodeDecodeError...
        raise FrameError(f"malformed msgpack: {type(exc).__name__}") from None


class FrameReader:
    """Sans-I/O frame reader: :meth:`feed` bytes, get every complete body. Never buffers more than
    one frame of ``max_bytes`` (plus the 4-byte prefix): a larger declared length raises first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= LEN.size:
            (n,) = LEN.unpack_from(self._buf)
            if n > self.max_bytes:
                raise FrameError(f"frame of {n} bytes exceeds limit {self.max_bytes}")
            if len(self._buf) < LEN.size + n:
                break
            out.append(bytes(self._buf[LEN.size:LEN.size + n]))
            del self._buf[:LEN.size + n]
        return out


async def read_exactly(stream: Any, n: int) -> bytes:
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


async def read_frame(stream: Any, max_bytes: int) -> bytes:
    """One ``u32 length || body`` frame; the length is checked against ``max_bytes`` first."""
    (n,) = LEN.unpack(await read_exactly(stream, LEN.size))
    if n > max_bytes:
        raise FrameError(f"frame of {n} bytes exceeds limit {max_bytes}")
    return await read_exactly(stream, n)


def is_relayed(conn: Any) -> bool:
    """Whether a libp2p stream or connection (swarm or muxed) runs over a Circuit Relay v2
    circuit. Here, not in ``meshnode.host``, so that discovery can tell which providers it
    reached only through a relay (py-libp2p 0.8.1 has no public accessor: the raw connection's
    type sits under the muxer and the secure session)."""
    muxed = getattr(conn, "muxed_conn", conn)
    raw = getattr(getattr(getattr(muxed, "secured_conn", None), "conn", None), "conn", None)
    kind = getattr(raw, "_connection_type", None)
    return getattr(kind, "name", None) == "RELAYED"

