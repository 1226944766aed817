"""Lay buffer-protocol tensors (numpy arrays, torch ``.numpy()`` views, bytes) back to back.

A payload is the tensors' bytes in list order. :func:`tensor_source` describes them without
copying (the sender seals straight from each tensor's memory); :func:`pack_tensors` makes one
contiguous copy for callers that want it. No torch import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .envelope import DTYPES, TensorSpec
from .errors import ErrorCode, ProtocolError
from .message import GatherSource, MemorySource, PayloadSource


def byte_view(buf: Any) -> memoryview:
    """Flat unsigned-byte view of any C-contiguous buffer (zero-size arrays included)."""
    mv = memoryview(buf)
    if mv.nbytes == 0:
        return memoryview(b"")
    if not mv.c_contiguous:
        raise ProtocolError(ErrorCode.MALFORMED, "tensor buffers must be C-contiguous")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _specs(items: Sequence[tuple[str, str, Sequence[int], Any]]) -> tuple[list[TensorSpec], list[memoryview]]:
    specs, views = [], []
    for name, dtype, shape, buf in items:
        if dtype not in DTYPES:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"unknown dtype {dtype}")
        view = byte_view(buf)
        n = 1
        for s in shape:
            n *= int(s)
        if n * DTYPES[dtype] != len(view):
            raise ProtocolError(ErrorCode.CHECKSUM, f"{name}: shape x itemsize != buffer length")
        specs.append(TensorSpec(name, dtype, tuple(int(s) for s in shape), len(view)))
        views.append(view)
    return specs, views


def tensor_source(items: Sequence[tuple[str, str, Sequence[int], Any]]) -> tuple[list[TensorSpec], PayloadSource]:
    """``[(name, dtype, shape, buffer)]`` -> (specs, a payload source over the buffers, no copy)."""
    specs, views = _specs(items)
    return specs, (MemorySource(views[0]) if len(views) == 1 else GatherSource(views))


def pack_tensors(items: Sequence[tuple[str, str, Sequence[int], Any]],
                 into: bytearray | memoryview | None = None) -> tuple[list[TensorSpec], memoryview]:
    """``[(name, dtype, shape, buffer)]`` -> (specs without checksums, payload view).

    ``into`` is reused when large enough (avoids page faults on fresh memory for every transfer).
    """
    specs, views = _specs(items)
    total = sum(len(v) for v in views)
    out = byte_view(into) if into is not None and len(into) >= total \
        else memoryview(bytearray(total))
    off = 0
    for v in views:
        out[off:off + len(v)] = v
        off += len(v)
    return specs, out[:total]
