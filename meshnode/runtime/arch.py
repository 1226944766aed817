"""Family differences the runtime needs to paper over: where the decoder layers live, what they return."""

from __future__ import annotations

from typing import Any

import torch


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder blocks (Llama-likes: ``model.layers``; GPT-2: ``transformer.h``)."""
    base = model.base_model
    for attr in ("layers", "h"):
        layers = getattr(base, attr, None)
        if layers is not None:
            return layers
    raise TypeError(f"cannot find decoder layers of {type(model).__name__}")


def layer_hidden(output: Any) -> torch.Tensor:
    """Hidden states from a decoder block's output (a tensor in most 5.x blocks, a tuple in some)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states swapped for ``hidden``, same container type."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
