"""VIRTUAL_PREFIX: a peer's embeddings prepended to our input via ``inputs_embeds`` ("treat as memory").

Embeddings are taken from ``get_input_embeddings()`` — which includes family quirks such as Gemma's
sqrt(hidden) scale and reads the tied matrix for tied models — so embeddings of a prompt's tokens
are exactly what the model would have computed from the tokens themselves.
"""

from __future__ import annotations

import torch

from meshnode.runtime.accept import KIND_PREFIX as KIND
from meshnode.runtime.accept import PrefixMismatch, check_header, specs_of
from meshnode.runtime.kv import Meta, State, Tensors, new_cache
from meshnode.runtime.loader import LoadedModel

__all__ = ["KIND", "PrefixMismatch", "capture_prefix", "prefill_with_prefix"]


@torch.inference_mode()
def capture_prefix(lm: LoadedModel, ids: list[int]) -> tuple[Tensors, Meta]:
    """Input embeddings of ``ids``: {"embeds": [1, T, hidden]}."""
    emb = lm.model.get_input_embeddings()(torch.tensor([ids])).contiguous()
    meta: Meta = {"kind": KIND, "apply": "MEMORY", "token_start": 0, "token_end": len(ids), "batch": 0,
                  "dtype": lm.dtype_name, "layer_start": 0, "layer_end": 0}
    return {"embeds": emb}, meta


@torch.inference_mode()
def prefill_with_prefix(lm: LoadedModel, tensors: Tensors, meta: Meta, ids: list[int]) -> State:
    """Prefill [received embeddings] + [embeddings of our ``ids``]; decode on with ``continue_greedy``.

    The embeddings are checked in full (``accept.check_header``) first: :class:`PrefixMismatch`.
    """
    check_header(lm, KIND, specs_of(tensors, PrefixMismatch), meta, strict_threads=False)
    emb = tensors["embeds"]
    parts = [emb]
    if ids:
        parts.append(lm.model.get_input_embeddings()(torch.tensor([ids])))
    embeds = torch.cat(parts, dim=1)
    n = embeds.shape[1]
    state = State(new_cache(lm), 0, None)
    out = lm.model(inputs_embeds=embeds, attention_mask=torch.ones((1, n), dtype=torch.long),
                   past_key_values=state.cache, use_cache=True, logits_to_keep=1)
    state.length = n
    state.first_logits = out.logits[0, -1].float()
    state.next_token = int(torch.argmax(state.first_logits))
    return state
