"""HIDDEN_SLICE: the residual stream after layer L, so a peer can run layers L+1..N-1 and the head.

The receiver runs its normal forward with blocks 0..L swapped for pass-throughs (block L returns
the received hidden states), so only layers L+1..N-1 compute; everything downstream (masks, RoPE,
final norm, tied head) is the model's own code, which is why the receiver's logits equal the
sender's bitwise. transformers 5.x blocks all return a bare tensor, which the pass-through mimics.
The slice is checked in full (``accept.check_header``) before any block is swapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshnode.runtime.accept import KIND_HIDDEN as KIND
from meshnode.runtime.accept import HiddenMismatch, check_header, specs_of
from meshnode.runtime.arch import decoder_layers, layer_hidden
from meshnode.runtime.kv import Meta, Tensors
from meshnode.runtime.loader import LoadedModel

__all__ = ["KIND", "HiddenMismatch", "capture_hidden", "run_from_hidden"]


@torch.inference_mode()
def capture_hidden(lm: LoadedModel, ids: list[int], layer: int,
                   tokens: tuple[int, int] | None = None) -> tuple[Tensors, Meta, torch.Tensor]:
    """Forward ``ids``; return ({"hidden": [1, T, H]}, meta, sender logits [T, vocab] fp32)."""
    layers = decoder_layers(lm.model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range")
    t0, t1 = tokens or (0, len(ids))
    seen: list[torch.Tensor] = []
    handle = layers[layer].register_forward_hook(lambda m, a, out: seen.append(layer_hidden(out)))
    try:
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        handle.remove()
    hidden = seen[0][:, t0:t1].contiguous()
    meta: Meta = {"kind": KIND, "apply": "OVERWRITE", "layer_start": layer, "layer_end": layer + 1, "token_start": t0,
                  "token_end": t1, "batch": 0, "dtype": lm.dtype_name, "threads": lm.threads}
    return {"hidden": hidden}, meta, logits[t0:t1]


@torch.inference_mode()
def run_from_hidden(lm: LoadedModel, tensors: Tensors, meta: Meta, *,
                    strict_threads: bool = True) -> torch.Tensor:
    """Receiver: logits [T, vocab] (fp32) from the sender's hidden states after layer L.

    Raises :class:`HiddenMismatch` (a ``KVMismatch``) for any slice this model cannot run.
    """
    head = check_header(lm, KIND, specs_of(tensors, HiddenMismatch), meta, strict_threads=strict_threads)
    layers = decoder_layers(lm.model)
    layer = head.layers[0]
    hidden = tensors["hidden"]
    n = hidden.shape[1]

    def skip(i: int) -> Callable[..., torch.Tensor]:
        def forward(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return hidden if i == layer else hidden_states
        return forward

    skipped = list(layers[: layer + 1])
    for i, block in enumerate(skipped):  # instance attribute shadows the class's forward
        block.forward = skip(i)
    try:
        placeholder = torch.zeros((1, n), dtype=torch.long)  # embedded, then passed through unused
        return lm.model(input_ids=placeholder, use_cache=False).logits[0].float()
    finally:
        for block in skipped:
            del block.forward
