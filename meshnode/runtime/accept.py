"""What this runtime accepts from a peer, decided from a message's header alone.

A peer that passed the handshake may still send a message this model can never apply: a dtype the
wire allows but the model does not run, KV for a different geometry, a ``next_token`` that is a
string, NaN or outside the vocabulary. :func:`check_header` says so from the envelope — tensor
names, dtypes, shapes, byte lengths and the runtime meta — *before any payload moves*, so the
session can reject the message at its HEADER and allocate nothing (invariant D). Every apply
function (``kv.inject``, ``kv.apply_delta``, ``hidden.run_from_hidden``, ``residual.residual_patch``,
``prefix.prefill_with_prefix``) runs the same rules again on the real tensors, so a caller that
skipped the header check is just as safe.

One error family: :class:`KVMismatch` (its per-kind subclasses keep their historical names) is the
only exception peer-controlled input can raise out of the runtime. Values are checked by exact
type — ``type(v) is int`` — because ``True`` is an ``int`` to Python and ``3.0 == 3``, and either
would otherwise pass as a position or a token id.

``meta`` is the runtime meta dict: the envelope fields (``kind``, ``apply``, ``layer_start/end``,
``token_start/end``, ``batch``, ``gain``) plus the envelope's meta map (``dtype``, ``threads``,
``next_token``, ``cumulative_length``), as ``kv.capture`` writes it and
``meshnode.handoff.received_to_runtime`` rebuilds it. Unknown meta keys are ignored (room for
later fields); unknown tensor names are not (they would be bytes nobody checked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from meshnode.runtime.dtypes import LOGITS_DTYPE, TORCH_DTYPES, dtype_name
from meshnode.runtime.loader import LoadedModel
from tensor_rpc.envelope import ApplyMode, Kind, TensorSpec


class KVMismatch(ValueError):
    """Received state that cannot be applied exactly to this model/state; nothing was applied.

    The one error peer data raises out of the runtime; the per-kind errors below subclass it, so a
    receiver needs a single ``except KVMismatch``.
    """


class HiddenMismatch(KVMismatch):
    """A hidden slice that cannot be applied to this model; nothing was run."""


class PatchRejected(KVMismatch):
    """The patch failed validation or the norm-ratio gate; nothing was applied."""


class PrefixMismatch(KVMismatch):
    """Embeddings that do not fit this model; nothing was run."""


KIND_FULL = Kind.KV_CACHE.value
KIND_DELTA = Kind.KV_CACHE_DELTA.value
KIND_HIDDEN = Kind.HIDDEN_SLICE.value
KIND_PATCH = Kind.RESIDUAL_PATCH.value
KIND_PREFIX = Kind.VIRTUAL_PREFIX.value
#: how each kind applies (invariant B): the one mode this runtime implements for it
APPLY: dict[str, str] = {KIND_FULL: ApplyMode.OVERWRITE.value, KIND_DELTA: ApplyMode.APPEND.value,
                         KIND_HIDDEN: ApplyMode.OVERWRITE.value, KIND_PATCH: ApplyMode.ADDITIVE.value,
                         KIND_PREFIX: ApplyMode.MEMORY.value}

#: (name, wire dtype name, shape, byte_length) — a ``tensor_rpc.TensorSpec`` without its checksum
Spec = tuple[str, str, tuple[int, ...], int]
_Err = type[KVMismatch]


@dataclass(frozen=True)
class Header:
    """The validated facts of a message, typed (so appliers never re-read peer meta)."""

    kind: str
    layers: tuple[int, int]
    tokens: tuple[int, int]
    next_token: int | None = None
    gain: float | None = None


@dataclass(frozen=True)
class Layout:
    """The geometry a message must match, read from the model config (no weights touched)."""

    n_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None  # learned position tables (GPT-2) end there: an index past it crashes
    windows: tuple[int | None, ...]  # per layer: sliding window W (holds W-1 keys), None = full


def layout(lm: LoadedModel) -> Layout:
    """Per-layer cache types come from an empty ``DynamicCache`` — the class ``generate`` uses —
    so full/sliding placement is the library's own decision, not a guess from config keys."""
    cfg = lm.model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    windows = tuple(int(layer.sliding_window) if layer.is_sliding else None
                    for layer in DynamicCache(config=lm.model.config).layers)
    # only a learned position table (GPT-2's wpe) ends: rotary positions go on past the trained
    # length (degraded, never an IndexError), so a RoPE model has no hard bound here
    rotary = any(getattr(cfg, k, None) is not None for k in ("rope_theta", "rope_parameters",
                                                            "rope_scaling"))
    max_positions = None if rotary else getattr(cfg, "max_position_embeddings", None)
    return Layout(len(windows), getattr(cfg, "num_key_value_heads", None) or heads,
                  getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                  cfg.hidden_size, cfg.vocab_size, max_positions, windows)


def specs_of(tensors: Mapping[str, Any], err: _Err = KVMismatch) -> list[Spec]:
    """The header an apply function would have received for ``tensors`` (their real dtypes/shapes)."""
    if not isinstance(tensors, Mapping):
        raise err(f"tensors must be a name -> tensor map, got {type(tensors).__name__}")
    out: list[Spec] = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise err(f"{_show(name)} is not a tensor")
        try:
            dt = dtype_name(t)
        except ValueError:
            raise err(f"{_show(name)} has dtype {t.dtype}, which no wire message carries") from None
        out.append((name, dt, tuple(t.shape), t.numel() * t.element_size()))
    return out


def check_header(lm: LoadedModel, kind: str, specs: Sequence[Spec | TensorSpec],
                 meta: Mapping[str, Any], *,
                 strict_threads: bool = True, cache_length: int | None = None,
                 need_next_token: bool = False) -> Header:
    """Refuse (:class:`KVMismatch` naming the field) a message this runtime can never apply.

    Pure and cheap: reads the config, never tensor bytes. ``specs``: (name, dtype, shape,
    byte_length) tuples, or an envelope's ``TensorSpec`` list as it is. ``cache_length``: the receiver's current
    cache length, when known, so a delta that would land at the wrong position is refused too.
    ``strict_threads``: require the sender's torch thread count (fp32 sums depend on it, §10).
    ``need_next_token``: a receiver that decodes right away needs the sender's next token; without
    it a KV message (a capture that stops before the cache end ships none) is refused.
    """
    rule = _RULES.get(kind) if isinstance(kind, str) else None
    if rule is None:
        raise KVMismatch(f"kind {_show(kind)} is not one this runtime applies ({sorted(_RULES)})")
    err = _ERRORS[kind]
    if not isinstance(meta, Mapping):
        raise err(f"meta must be a map, got {type(meta).__name__}")
    if meta.get("kind", kind) != kind:
        raise err(f"meta kind {_show(meta.get('kind'))} != message kind {kind}")
    head = rule(lm, kind, _spec_map(specs, err), meta, strict_threads, cache_length)
    if need_next_token and kind in (KIND_FULL, KIND_DELTA) and head.next_token is None:
        raise err("next_token missing: this receiver decodes from the sender's next token")
    return head


# -- the rules, one per kind -----------------------------------------------------------------------
def _kv(lm: LoadedModel, kind: str, specs: dict[str, Spec], meta: Mapping[str, Any],
        strict_threads: bool, cache_length: int | None) -> Header:
    err, lay = KVMismatch, layout(lm)
    _common(lm, kind, meta, err, strict_threads)
    layers = _range(meta, "layer", err)
    if layers != (0, lay.n_layers):
        raise err(f"layers {list(layers)} but inject needs every layer [0, {lay.n_layers}) "
                  "(partial layer ranges cannot be decoded from)")
    t0, t1 = _range(meta, "token", err)
    if kind == KIND_FULL and t0 != 0:
        raise err(f"token_start {t0}: a snapshot must start at token 0 (RoPE'd keys cannot move)")
    if t1 == t0:
        raise err(f"token range [{t0}, {t1}) is empty")
    if lay.max_positions is not None and t1 >= lay.max_positions:
        raise err(f"token_end {t1}: the model has positions [0, {lay.max_positions}) and the next "
                  "token needs one")
    if kind == KIND_DELTA and cache_length is not None and t0 != cache_length:
        raise err(f"delta starts at {t0}, cache ends at {cache_length} (RoPE'd keys cannot move)")
    cum = meta.get("cumulative_length")
    if not isinstance(cum, list | tuple) or len(cum) != lay.n_layers:
        raise err(f"cumulative_length must list {lay.n_layers} layers, got {_show(cum)}")
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, window in enumerate(lay.windows):
        if window is None and cum[i] is not None:
            raise err(f"cumulative_length[{i}] {_show(cum[i])}: layer {i} is full attention (None)")
        if window is not None and (type(cum[i]) is not int or cum[i] != t1):
            # lost by DynamicCache(ddp_cache_data=...) and positions restart: it must travel (§10)
            raise err(f"cumulative_length[{i}] {_show(cum[i])} != token_end {t1} (sliding layer)")
        held = t1 - t0 if window is None else min(t1 - t0, window - 1)
        for part in ("k", "v"):
            expected[f"L{i}.{part}"] = (lm.dtype_name, (1, lay.kv_heads, held, lay.head_dim))
    _tensors(specs, expected, {"logits": (LOGITS_DTYPE, (lay.vocab_size,))}, err)
    return Header(kind, layers, (t0, t1), next_token=_next_token(meta, lay.vocab_size, err))


def _hidden(lm: LoadedModel, kind: str, specs: dict[str, Spec], meta: Mapping[str, Any],
            strict_threads: bool, cache_length: int | None) -> Header:
    err, lay = HiddenMismatch, layout(lm)
    _common(lm, kind, meta, err, strict_threads)
    layers = _one_layer(meta, lay.n_layers, err)
    t0, t1 = _range(meta, "token", err)
    if t0 != 0:
        raise err(f"token_start {t0}: slices not starting at 0 need the earlier tokens' KV")
    if t1 == 0:
        raise err("token range [0, 0) is empty")
    _positions(t1, lay, err)
    _tensors(specs, {"hidden": (lm.dtype_name, (1, t1, lay.hidden_size))}, {}, err)
    return Header(kind, layers, (t0, t1))


def _patch(lm: LoadedModel, kind: str, specs: dict[str, Spec], meta: Mapping[str, Any],
           strict_threads: bool, cache_length: int | None) -> Header:
    err, lay = PatchRejected, layout(lm)
    _common(lm, kind, meta, err, False)  # steering, not exact state: threads do not matter
    layers = _one_layer(meta, lay.n_layers, err)
    t0, t1 = _range(meta, "token", err)
    if t1 == t0:
        raise err(f"token range [{t0}, {t1}) is empty")
    _positions(t1, lay, err)
    gain = meta.get("gain")
    if type(gain) not in (int, float) or not math.isfinite(gain):
        raise err(f"gain {_show(gain)} must be a finite number")
    _tensors(specs, {"patch": (lm.dtype_name, (t1 - t0, lay.hidden_size))}, {}, err)
    return Header(kind, layers, (t0, t1), gain=float(gain))


def _prefix(lm: LoadedModel, kind: str, specs: dict[str, Spec], meta: Mapping[str, Any],
            strict_threads: bool, cache_length: int | None) -> Header:
    err, lay = PrefixMismatch, layout(lm)
    _common(lm, kind, meta, err, False)  # embeddings are a lookup, no reduction order
    t0, t1 = _range(meta, "token", err)
    if t0 != 0 or t1 == 0:
        raise err(f"token range [{t0}, {t1}): a prefix covers [0, T) with T > 0")
    _positions(t1, lay, err)
    # the layer range is not used: a prefix enters before layer 0, whatever the sender wrote
    _tensors(specs, {"embeds": (lm.dtype_name, (1, t1, lay.hidden_size))}, {}, err)
    return Header(kind, (0, 0), (t0, t1))


_Rule = Callable[[LoadedModel, str, dict[str, Spec], Mapping[str, Any], bool, int | None], Header]
_RULES: dict[str, _Rule] = {KIND_FULL: _kv, KIND_DELTA: _kv, KIND_HIDDEN: _hidden,
                            KIND_PATCH: _patch, KIND_PREFIX: _prefix}
_ERRORS: dict[str, _Err] = {KIND_FULL: KVMismatch, KIND_DELTA: KVMismatch, KIND_HIDDEN: HiddenMismatch,
                            KIND_PATCH: PatchRejected, KIND_PREFIX: PrefixMismatch}


# -- shared pieces ---------------------------------------------------------------------------------
def _common(lm: LoadedModel, kind: str, meta: Mapping[str, Any], err: _Err,
            strict_threads: bool) -> None:
    apply = APPLY[kind]
    if meta.get("apply") != apply:
        raise err(f"apply {_show(meta.get('apply'))} != {apply}")
    batch = meta.get("batch", 0)
    if type(batch) is not int or batch != 0:
        raise err(f"batch {_show(batch)}: this runtime decodes batch slot 0 only")
    dt = meta.get("dtype")
    if not isinstance(dt, str) or dt not in TORCH_DTYPES:
        raise err(f"dtype {_show(dt)} is not a wire dtype")
    if dt != lm.dtype_name:
        raise err(f"dtype {dt} does not match model dtype {lm.dtype_name}")
    if strict_threads and (type(meta.get("threads")) is not int or meta.get("threads") != lm.threads):
        raise err(f"sender used {_show(meta.get('threads'))} threads, receiver {lm.threads}: "
                  "fp32 results would not be bitwise equal")


def _int(meta: Mapping[str, Any], key: str, err: _Err) -> int:
    v = meta.get(key)
    if type(v) is not int or v < 0:  # bool, float, str, None are no positions
        raise err(f"{key} {_show(v)} must be a non-negative integer")
    return v


_U32 = (1 << 32) - 1


def _range(meta: Mapping[str, Any], what: str, err: _Err) -> tuple[int, int]:
    a, b = _int(meta, f"{what}_start", err), _int(meta, f"{what}_end", err)
    if b < a:
        raise err(f"{what} range [{a}, {b}) runs backwards")
    if b > _U32:  # the envelope's own bound (its ranges are u32)
        raise err(f"{what}_end {b} beyond 2^32 - 1")
    return a, b


def _one_layer(meta: Mapping[str, Any], n_layers: int, err: _Err) -> tuple[int, int]:
    a, b = _range(meta, "layer", err)
    if not (a < n_layers and b == a + 1):
        raise err(f"layers [{a}, {b}) must be one layer of [0, {n_layers})")
    return a, b


def _positions(end: int, lay: Layout, err: _Err) -> None:
    if lay.max_positions is not None and end > lay.max_positions:
        raise err(f"token_end {end} beyond the model's {lay.max_positions} positions")


def _next_token(meta: Mapping[str, Any], vocab: int, err: _Err) -> int | None:
    v = meta.get("next_token")
    if v is not None and (type(v) is not int or not 0 <= v < vocab):
        raise err(f"next_token {_show(v)} is not a token id in [0, {vocab})")
    return v


def _spec_map(specs: Sequence[Spec | TensorSpec], err: _Err) -> dict[str, Spec]:
    """Name -> spec, every field type-checked (the wire decoder did too; this runs without it)."""
    if not isinstance(specs, Sequence) or isinstance(specs, str | bytes):
        raise err(f"tensor specs must be a sequence, got {type(specs).__name__}")
    out: dict[str, Spec] = {}
    for s in specs:
        if isinstance(s, TensorSpec):
            s = (s.name, s.dtype, s.shape, s.byte_length)
        if not isinstance(s, tuple | list) or len(s) != 4:
            raise err(f"tensor spec {_show(s)} is not (name, dtype, shape, byte_length)")
        name, dt, shape, nbytes = s
        if not isinstance(name, str) or name in out:
            raise err(f"tensor name {_show(name)} is not a string or is repeated")
        if not isinstance(dt, str) or dt not in TORCH_DTYPES:
            raise err(f"{name}: dtype {_show(dt)} is not a wire dtype")
        if not isinstance(shape, tuple | list) or not all(type(d) is int and d >= 0 for d in shape):
            raise err(f"{name}: shape {_show(shape)} is not a list of non-negative integers")
        itemsize = torch.empty(0, dtype=TORCH_DTYPES[dt]).element_size()
        if type(nbytes) is not int or math.prod(shape) * itemsize != nbytes:
            raise err(f"{name}: byte_length {_show(nbytes)} != {list(shape)} x {itemsize}")
        out[name] = (name, dt, tuple(shape), nbytes)
    return out


def _tensors(specs: dict[str, Spec], required: dict[str, tuple[str, tuple[int, ...]]],
             optional: dict[str, tuple[str, tuple[int, ...]]], err: _Err) -> None:
    """Exactly the ``required`` tensors (+ any of ``optional``), each with its dtype and shape."""
    for name in required:
        if name not in specs:
            raise err(f"missing tensor {name}")
    for name, (_, dt, shape, _) in specs.items():
        want = required.get(name) or optional.get(name)
        if want is None:
            raise err(f"unexpected tensor {_show(name)}")
        if dt != want[0]:
            raise err(f"{name} has dtype {dt}, expected {want[0]}")
        if shape != want[1]:
            raise err(f"{name} shape {list(shape)} != expected {list(want[1])}")


def _show(v: object) -> str:
    """A peer value for an error message: repr, bounded (strings come from the peer)."""
    r = repr(v)
    return r if len(r) <= 48 else r[:45] + "..."
