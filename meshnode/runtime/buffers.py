"""Zero-copy bridges between tensors and the byte buffers the transport moves.

A received message arrives as one contiguous ``bytearray`` with per-tensor slices; tensors are built
over those slices with ``torch.frombuffer`` (no copy, bf16 included — numpy has no bf16, so we never
go through numpy). On the send side, :func:`tensor_bytes` exposes a contiguous tensor's storage as a
``memoryview`` without copying.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
}


@dataclass(frozen=True)
class TensorSlice:
    """Where one tensor lives inside a message buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, shared with it (no copy)."""
    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensors_from_buffer(buf: bytearray | memoryview, slices: Iterable[TensorSlice]) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (zero copy). Shapes and bounds are checked before any view is made."""
    mv = memoryview(buf).cast("B")
    out: dict[str, torch.Tensor] = {}
    for s in slices:
        dtype = DTYPE_BY_NAME.get(s.dtype)
        if dtype is None:
            raise ValueError(f"{s.name}: unsupported dtype {s.dtype}")
        count = 1
        for d in s.shape:
            if d < 0:
                raise ValueError(f"{s.name}: negative dimension")
            count *= d
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if count * itemsize != s.nbytes or s.offset < 0 or s.offset + s.nbytes > mv.nbytes:
            raise ValueError(f"{s.name}: declared {s.shape} {s.dtype} does not fit its slice")
        if s.nbytes == 0:
            out[s.name] = torch.empty(s.shape, dtype=dtype)
            continue
        t = torch.frombuffer(mv[s.offset:s.offset + s.nbytes], dtype=dtype)
        out[s.name] = t.view(s.shape)
    return out
