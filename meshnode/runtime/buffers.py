"""Zero-copy bridges between tensors and the byte buffers the transport moves.

A received message arrives as one contiguous ``bytearray`` with per-tensor slices; tensors are built
over those slices with ``torch.frombuffer`` (no copy, bf16 included — numpy has no bf16, so we never
go through numpy). On the send side, :func:`tensor_bytes` exposes a contiguous tensor's storage as a
``memoryview`` without copying.

Every wire dtype (``runtime/dtypes.py``) can be viewed; a slice that does not fit its declaration
raises :class:`~meshnode.runtime.accept.KVMismatch`, the runtime's one peer-data error, because the
slices come straight from a peer's header.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from meshnode.runtime.accept import KVMismatch
from meshnode.runtime.dtypes import TORCH_DTYPES, dtype_name

__all__ = ["TensorSlice", "dtype_name", "tensor_bytes", "tensors_from_buffer"]


@dataclass(frozen=True)
class TensorSlice:
    """Where one tensor lives inside a message buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, shared with it (no copy)."""
    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensors_from_buffer(buf: bytearray | memoryview, slices: Iterable[TensorSlice]) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (zero copy). Dtypes, shapes and bounds are checked before any view
    is made; a bad slice raises :class:`KVMismatch` naming the tensor."""
    mv = memoryview(buf).cast("B")
    out: dict[str, torch.Tensor] = {}
    for s in slices:
        dtype = TORCH_DTYPES.get(s.dtype) if isinstance(s.dtype, str) else None
        if dtype is None:
            raise KVMismatch(f"{s.name}: unsupported dtype {s.dtype!r}; one of {sorted(TORCH_DTYPES)}")
        if not all(type(d) is int and d >= 0 for d in s.shape):
            raise KVMismatch(f"{s.name}: shape {s.shape} has a negative or non-integer dimension")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if math.prod(s.shape) * itemsize != s.nbytes or s.offset < 0 or s.offset + s.nbytes > mv.nbytes:
            raise KVMismatch(f"{s.name}: declared {s.shape} {s.dtype} does not fit its slice")
        if s.nbytes == 0:
            out[s.name] = torch.empty(s.shape, dtype=dtype)
            continue
        t = torch.frombuffer(mv[s.offset:s.offset + s.nbytes], dtype=dtype)
        out[s.name] = t.view(s.shape)
    return out
