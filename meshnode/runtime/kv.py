"""KV cache capture and injection (transformers 5.x ``DynamicCache``), following DESIGN.md §10.

The exact recipe, and why each step is here:

* The sender prefills the *whole* prompt and ships KV for all n tokens plus its next token (and the
  last-position logits). Shipping n-1 tokens and re-running the last one is not bitwise exact.
* Sliding-window layers keep only the last ``W-1`` keys; their true length (``cumulative_length``)
  drives positions and masks, so it travels in ``meta`` and is restored on inject.
* The receiver never re-feeds the prompt: decoding starts from ``next_token`` with an attention mask
  covering past + new tokens.
* Keys already carry RoPE, so KV only ever lands at the positions it was computed for: a snapshot
  must start at 0 and a delta exactly where the receiver's cache ends.
* An fp32 model fed bf16 KV runs silently and drifts: dtypes must match, or inject refuses.
* Every check runs before anything is applied, and the checks need only the header: inject and
  apply_delta call :func:`check_header` (``runtime/accept.py``) on the tensors' real names, dtypes
  and shapes, the same rules a receiver runs on the envelope before the payload moves. Peer input
  that fails any of them raises :class:`KVMismatch` and nothing else.

Tensors are named ``L{i}.k`` / ``L{i}.v`` ([batch, kv_heads, tokens, head_dim]), plus ``logits``
([vocab], the sender's last-position logits). ``meta`` holds scalars and one list
(``cumulative_length``, per captured layer, ``None`` for full-attention layers) so it fits the
envelope's bounded meta map however many layers the model has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from meshnode.runtime.accept import APPLY, KIND_DELTA, KIND_FULL, KVMismatch, check_header, specs_of
from meshnode.runtime.dtypes import TORCH_DTYPES, dtype_name
from meshnode.runtime.loader import LoadedModel

__all__ = ["APPLY", "KIND_DELTA", "KIND_FULL", "KVMismatch", "LoadedModel", "Meta", "State", "Tensors",
           "append_turn", "apply_delta", "capture", "check_header", "continue_generate",
           "continue_greedy", "forward_tokens", "generate_reference", "inject", "new_cache", "prefill",
           "prefill_and_capture"]

Meta = dict[str, Any]  # scalars, or lists of scalars (the envelope's ``meta`` map allows both)
Tensors = dict[str, torch.Tensor]


@dataclass
class State:
    """A receiver's (or sender's) decoding state: the cache, its length and the token to feed next."""

    cache: DynamicCache
    length: int
    next_token: int | None
    first_logits: torch.Tensor | None = None  # logits that produced next_token, if shipped


def new_cache(lm: LoadedModel) -> DynamicCache:
    """Empty cache with the model's per-layer types (full / sliding) — the same class ``generate`` uses."""
    return DynamicCache(config=lm.model.config)


@torch.inference_mode()
def forward_tokens(lm: LoadedModel, state: State, ids: list[int]) -> torch.Tensor:
    """Feed ``ids`` on top of ``state.cache``; return last-position logits ([vocab], fp32 copy).

    The mask always spans past + new tokens (a bare ``generate(last_token)`` without it crashes,
    and padded batches come out wrong); positions follow from the cache length, never from
    ``cache_position=`` (ignored in 5.x).
    """
    if not ids:
        raise ValueError("no tokens to feed")
    inp = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones((1, state.length + len(ids)), dtype=torch.long)
    out = lm.model(input_ids=inp, attention_mask=mask, past_key_values=state.cache, use_cache=True,
                   logits_to_keep=1)
    state.length += len(ids)
    if state.cache.get_seq_length() != state.length:
        raise RuntimeError("cache length out of step with state")  # pragma: no cover
    return out.logits[0, -1].float()


def prefill(lm: LoadedModel, prompt_ids: list[int]) -> State:
    """Prefill the whole prompt the way ``generate`` does (``logits_to_keep=1``)."""
    state = State(new_cache(lm), 0, None)
    logits = forward_tokens(lm, state, prompt_ids)
    state.next_token = int(torch.argmax(logits))
    state.first_logits = logits
    return state


def capture(lm: LoadedModel, state: State, *, layers: tuple[int, int] | None = None,
            tokens: tuple[int, int] | None = None, dtype: str | None = None,
            include_logits: bool = True, kind: str | None = None) -> tuple[Tensors, Meta]:
    """Tensors + meta for ``layers`` [a, b) and absolute ``tokens`` [t0, t1) of ``state``.

    Defaults: all layers, all cached tokens. A range not starting at 0 is a delta. Sliding layers
    ship what they still hold inside the range (at most ``W-1`` tokens) and their cumulative length.
    Tensors are views when no slicing/cast is needed (zero copy), else one contiguous copy.
    ``dtype`` (any wire dtype name) casts the KV; a receiver accepts only its model's dtype.
    """
    cache = state.cache
    n_layers = len(cache.layers)
    la, lb = layers or (0, n_layers)
    t0, t1 = tokens or (0, state.length)
    if not (0 <= la < lb <= n_layers) or not (0 <= t0 < t1 <= state.length):
        raise ValueError(f"bad range layers={la, lb} tokens={t0, t1} (cache {state.length})")
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(TORCH_DTYPES)}")
    tdtype = TORCH_DTYPES[dtype] if dtype else lm.dtype
    out: Tensors = {}
    kind = kind or (KIND_FULL if t0 == 0 else KIND_DELTA)
    cumulative: list[int | None] = []
    meta: Meta = {
        "kind": kind, "apply": APPLY[kind],
        "layer_start": la, "layer_end": lb, "token_start": t0, "token_end": t1,
        "batch": 0, "dtype": dtype_name(tdtype), "threads": lm.threads,
        "next_token": state.next_token if t1 == state.length else None,
        "cumulative_length": cumulative,
    }
    for i in range(la, lb):
        layer = cache.layers[i]
        held = layer.keys.shape[-2]
        first = state.length - held  # absolute position of the first held key (sliding layers drop old ones)
        if layer.is_sliding and t1 != state.length:
            raise ValueError(f"sliding layer {i} can only be captured up to the cache end")
        if first > t0 and not layer.is_sliding:
            raise ValueError(f"layer {i} no longer holds tokens from {t0}")  # pragma: no cover
        a, b = max(t0, first) - first, t1 - first
        for part, tensor in (("k", layer.keys), ("v", layer.values)):
            piece = tensor[:, :, a:b] if (a, b) != (0, held) else tensor
            out[f"L{i}.{part}"] = piece.to(tdtype).contiguous()
        # sliding pieces always end at t1, so their start is t1 - held: only the length travels
        cumulative.append(int(layer.cumulative_length) if layer.is_sliding else None)
    if include_logits and state.first_logits is not None and t1 == state.length:
        out["logits"] = state.first_logits.contiguous()
    return out, meta


def prefill_and_capture(lm: LoadedModel, prompt_ids: list[int], **kw: Any) -> tuple[Tensors, Meta, State]:
    """Sender side, turn 1: prefill ``prompt_ids`` and capture the full snapshot (+ next token)."""
    state = prefill(lm, prompt_ids)
    tensors, meta = capture(lm, state, **kw)
    return tensors, meta, state


def append_turn(lm: LoadedModel, state: State, new_ids: list[int], **kw: Any) -> tuple[Tensors, Meta]:
    """Sender side, later turns: feed ``new_ids`` on the cache, capture only their KV as a delta.

    ``new_ids`` must start with the sender's pending ``next_token`` if the conversation continues
    from it; the receiver's cache must end exactly where the delta starts.
    """
    start = state.length
    logits = forward_tokens(lm, state, new_ids)
    state.next_token = int(torch.argmax(logits))
    state.first_logits = logits
    return capture(lm, state, tokens=(start, state.length), kind=KIND_DELTA, **kw)


def inject(lm: LoadedModel, tensors: Tensors, meta: Meta, *, strict_threads: bool = True) -> State:
    """Receiver side: build a fresh cache from a full snapshot.

    All checks first (:func:`check_header` on the tensors as they are): dtype, every layer's shape,
    sliding lengths, ``next_token``, thread count. Only then is a cache built, so a bad message
    raises :class:`KVMismatch` and leaves nothing behind.
    """
    head = check_header(lm, KIND_FULL, specs_of(tensors), meta, strict_threads=strict_threads)
    length = head.tokens[1]
    cache = new_cache(lm)
    for i, layer in enumerate(cache.layers):
        # sliding layers hold min(length, W-1) keys (checked); their true length is `length`
        _set_layer(layer, tensors[f"L{i}.k"], tensors[f"L{i}.v"], length)
    logits = tensors.get("logits")
    return State(cache, length, head.next_token, logits.float() if logits is not None else None)


def apply_delta(lm: LoadedModel, state: State, tensors: Tensors, meta: Meta, *,
                strict_threads: bool = True) -> State:
    """Append a KV_CACHE_DELTA to ``state`` in place (all checks first; nothing applied on error).

    The delta must start exactly where ``state`` ends (keys carry RoPE). New caches are staged
    for every layer before any layer is replaced, so the state changes all at once or not at all.
    """
    head = check_header(lm, KIND_DELTA, specs_of(tensors), meta, strict_threads=strict_threads,
                        cache_length=state.length)
    end = head.tokens[1]
    staged = []
    for i, layer in enumerate(state.cache.layers):
        k = torch.cat([layer.keys, tensors[f"L{i}.k"]], dim=-2)
        v = torch.cat([layer.values, tensors[f"L{i}.v"]], dim=-2)
        if layer.is_sliding:  # trim exactly as the sender's own cache did
            k, v = k[:, :, -(layer.sliding_window - 1):], v[:, :, -(layer.sliding_window - 1):]
        staged.append((layer, k, v))
    for layer, k, v in staged:
        _set_layer(layer, k, v, end)
    state.length = end
    state.next_token = head.next_token
    logits = tensors.get("logits")
    state.first_logits = logits.float() if logits is not None else None
    return state


def _set_layer(layer: Any, k: torch.Tensor, v: torch.Tensor, cum: int) -> None:
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    layer.keys, layer.values = k, v
    if layer.is_sliding:
        layer.cumulative_length = cum  # DESIGN.md §10: lost by DynamicCache(ddp_cache_data=...)


@torch.inference_mode()
def continue_greedy(lm: LoadedModel, state: State, n_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy-decode ``n_tokens`` from ``state`` (first is ``state.next_token``).

    Returns the tokens and the logits that produced each of them ([n_tokens, vocab]); the first row
    is the sender's shipped logits when present (else the row is NaN).
    """
    if state.next_token is None:
        raise ValueError("state has no pending token")
    tokens = [state.next_token]
    first = state.first_logits
    rows = [first if first is not None else torch.full((lm.model.config.get_text_config().vocab_size,),
                                                       float("nan"))]
    while len(tokens) < n_tokens:
        logits = forward_tokens(lm, state, [tokens[-1]])
        rows.append(logits)
        tokens.append(int(torch.argmax(logits)))
    # the last token is emitted but not yet fed: keep it pending so decoding can resume
    state.next_token = tokens[-1]
    state.first_logits = rows[-1]
    return tokens, torch.stack(rows)


@torch.inference_mode()
def continue_generate(lm: LoadedModel, state: State, n_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Like :func:`continue_greedy` but through ``generate()`` (for callers that want its features).

    ``generate`` needs ids for the whole context, yet the receiver never saw the prompt (zero tokens
    are exchanged). The cache covers positions [0, length), so ``generate`` only embeds the ids after
    them: we pass placeholders there and the real pending token last. Passing real prompt ids would
    not help either — a cache that already holds them must not be fed them again (§10).
    """
    if state.next_token is None:
        raise ValueError("state has no pending token")
    from transformers import GenerationConfig

    first = state.first_logits
    head = first if first is not None else torch.full(
        (lm.model.config.get_text_config().vocab_size,), float("nan"))
    if n_tokens == 1:
        return [state.next_token], head[None]
    ids = torch.zeros((1, state.length + 1), dtype=torch.long)
    ids[0, -1] = state.next_token
    gc = GenerationConfig(max_new_tokens=n_tokens - 1, do_sample=False, eos_token_id=[],
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=state.cache,
                            generation_config=gc)
    tokens = [state.next_token, *out.sequences[0, state.length + 1:].tolist()]
    rows = [head, *(x[0].float() for x in out.logits)]
    state.length = state.cache.get_seq_length()
    if state.length != ids.shape[1] + n_tokens - 2:
        raise RuntimeError("generate() fed an unexpected number of tokens")  # pragma: no cover
    state.next_token, state.first_logits = tokens[-1], rows[-1]
    return tokens, torch.stack(rows)


@torch.inference_mode()
def generate_reference(lm: LoadedModel, prompt_ids: list[int], n_tokens: int) -> tuple[list[int], torch.Tensor]:
    """What the sender would produce continuing itself with ``generate()`` (greedy)."""
    from transformers import GenerationConfig

    # eos_token_id=[] (not min_new_tokens, which masks EOS and changes the choice) keeps decoding
    gc = GenerationConfig(max_new_tokens=n_tokens, do_sample=False, eos_token_id=[], pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([prompt_ids])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    toks = out.sequences[0, len(prompt_ids):].tolist()
    return toks, torch.stack([x[0].float() for x in out.logits])
