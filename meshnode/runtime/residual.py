"""RESIDUAL_PATCH: add ``gain * patch`` to the residual stream after layer L at given positions.

A patch is steering, not state: the receiver keeps its own context and nudges it. The norm-ratio
gate (``|gain * patch| / |own residual|`` per position) bounds how hard a peer may push; a patch
beyond the configured bound is rejected before anything is added (the hook raises, the forward is
abandoned, the model is untouched). An all-zero patch is skipped, so it is bitwise a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from meshnode.runtime.accept import KIND_PATCH as KIND
from meshnode.runtime.accept import PatchRejected, check_header, specs_of
from meshnode.runtime.arch import decoder_layers, layer_hidden, replace_hidden
from meshnode.runtime.kv import Meta, Tensors
from meshnode.runtime.loader import LoadedModel

__all__ = ["DEFAULT_MAX_NORM_RATIO", "KIND", "PatchRejected", "capture_residual", "make_patch",
           "residual_patch"]
DEFAULT_MAX_NORM_RATIO = 2.0


def make_patch(layer: int, positions: list[int], patch: torch.Tensor, gain: float) -> tuple[Tensors, Meta]:
    """Tensors + meta for a patch of shape [len(positions), hidden] (positions: consecutive range)."""
    if positions != list(range(positions[0], positions[0] + len(positions))):
        raise ValueError("positions must be one consecutive range")
    meta: Meta = {"kind": KIND, "apply": "ADDITIVE", "layer_start": layer, "layer_end": layer + 1,
                  "token_start": positions[0], "token_end": positions[-1] + 1, "batch": 0,
                  "gain": float(gain), "dtype": str(patch.dtype).removeprefix("torch.")}
    return {"patch": patch.contiguous()}, meta


@torch.inference_mode()
def capture_residual(lm: LoadedModel, ids: list[int], layer: int) -> torch.Tensor:
    """Residual stream after ``layer`` for ``ids``: [T, hidden]."""
    seen: list[torch.Tensor] = []
    h = decoder_layers(lm.model)[layer].register_forward_hook(
        lambda m, a, out: seen.append(layer_hidden(out)))
    try:
        lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        h.remove()
    return seen[0][0].clone()


@contextmanager
def residual_patch(lm: LoadedModel, tensors: Tensors, meta: Meta, *,
                   max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO, offset: int = 0,
                   negotiated_gain: float | None = None) -> Iterator[None]:
    """While active, forwards add the patch at absolute positions [token_start, token_end).

    ``offset`` is the absolute position of the first token of the forward being patched (the cache
    length before it). ``negotiated_gain``, when given, must equal the message's gain. The
    message is checked in full (``accept.check_header``) before the hook is installed.
    """
    head = check_header(lm, KIND, specs_of(tensors, PatchRejected), meta)
    patch, layer, (t0, t1) = tensors["patch"], head.layers[0], head.tokens
    gain = head.gain if head.gain is not None else 0.0
    layers = decoder_layers(lm.model)
    if t0 < offset:
        raise PatchRejected(f"patch starts at {t0}, before this forward's first token {offset}")
    if negotiated_gain is not None and gain != negotiated_gain:
        raise PatchRejected(f"gain {gain} != negotiated {negotiated_gain}")
    if gain == 0.0 or not bool(patch.any()):
        yield  # bitwise no-op by construction
        return
    delta = gain * patch

    def hook(module: torch.nn.Module, args: object, out: object) -> object:
        h = layer_hidden(out)
        a, b = t0 - offset, t1 - offset
        if b > h.shape[1]:
            raise PatchRejected("patch positions beyond this forward's tokens")
        own = h[0, a:b].float().norm(dim=-1).clamp_min(1e-12)
        ratio = float((delta.float().norm(dim=-1) / own).max())
        if not math.isfinite(ratio) or ratio > max_norm_ratio:  # NaN compares False: refuse it too
            raise PatchRejected(f"norm ratio {ratio:.3g} exceeds {max_norm_ratio}")
        patched = h.clone()
        patched[0, a:b] = h[0, a:b] + delta
        return replace_hidden(out, patched)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
