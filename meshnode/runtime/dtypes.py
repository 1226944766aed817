"""The one dtype table of the runtime, derived from the wire contract (``tensor_rpc.envelope.DTYPES``).

The wire lists every dtype a peer may legally declare (name -> item size). The runtime must be able
to *name* every one of them as a torch dtype — so that a legal-but-unwanted message is refused
with a reason instead of crashing a lookup — and it must never keep a second hand-written list
that could drift from the wire. So: each wire name is looked up as ``torch.<name>`` once, at
import, and checked against its wire item size; a wire name torch lacks (or sizes differently)
fails the import, which is where a contract change should be noticed.

Which of those dtypes a model may *compute* in is a named subset of the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from tensor_rpc.envelope import DTYPES as WIRE_ITEMSIZE


def _torch_dtypes() -> dict[str, torch.dtype]:
    out: dict[str, torch.dtype] = {}
    for name, size in WIRE_ITEMSIZE.items():
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype) or torch.empty(0, dtype=dt).element_size() != size:
            raise ImportError(f"wire dtype {name!r} ({size} bytes) has no matching torch dtype")
        out[name] = dt
    return out


#: wire name -> torch dtype, for every dtype the wire allows
TORCH_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(_torch_dtypes())
_NAME_OF: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}

#: dtypes a model can be loaded in (KV is exact only in the model's own dtype, DESIGN.md §10)
COMPUTE_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {name: TORCH_DTYPES[name] for name in ("float32", "bfloat16", "float16")})

#: logits always travel as fp32 (``kv.forward_tokens`` upcasts), whatever the model computes in
LOGITS_DTYPE: str = _NAME_OF[torch.float32]


def dtype_name(t: torch.Tensor | torch.dtype) -> str:
    """Wire name of a tensor's (or a dtype's) dtype; ValueError for one the wire cannot carry."""
    dt = t if isinstance(t, torch.dtype) else t.dtype
    name = _NAME_OF.get(dt)
    if name is None:
        raise ValueError(f"dtype {dt} cannot travel on the wire (one of {sorted(TORCH_DTYPES)})")
    return name
