"""Bounded msgpack for every peer-supplied map (invariant D: never pickle, never eval).

The decoding itself is the project's one bounded-msgpack helper (:mod:`discovery.streamio`); this
module adds the protocol's view of it: a map is required, and every failure is a
:class:`ProtocolError` (``LIMIT`` for a body over its bound, ``MALFORMED`` otherwise).
"""

from __future__ import annotations

from typing import Any

from discovery.streamio import FrameError, pack, unpack_bounded

from .errors import ErrorCode, ProtocolError

__all__ = ["need", "need_str_list", "need_uint", "pack", "unpack_map"]


def unpack_map(data: bytes | bytearray | memoryview, max_bytes: int, *, max_array: int = 4096,
               max_map: int = 64, max_str: int = 4096, max_bin: int = 64 * 1024) -> dict[str, Any]:
    """Decode one msgpack map from peer bytes, bounded everywhere; raise only ProtocolError."""
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.LIMIT, f"metadata of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = unpack_bounded(data, max_items=max_array, max_str=max_str, max_bin=max_bin,
                             max_map=max_map)
    except FrameError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"bad msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "expected a msgpack map")
    return obj


def need(d: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """Typed field access for decoded maps (bool is never accepted as int)."""
    if key not in d:
        raise ProtocolError(ErrorCode.MALFORMED, f"missing field {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} has the wrong type")
    if not isinstance(v, kind):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} has the wrong type")
    return v


def need_uint(d: dict[str, Any], key: str, hi: int = (1 << 63) - 1) -> int:
    v = need(d, key, int)
    if not 0 <= v <= hi:
        raise ProtocolError(ErrorCode.LIMIT, f"field {key!r}={v} out of range 0..{hi}")
    return v


def need_str_list(d: dict[str, Any], key: str, max_len: int = 64) -> list[str]:
    v = need(d, key, list)
    if len(v) > max_len or not all(isinstance(x, str) for x in v):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be a list of strings")
    return v
