"""Models the runtime tests share: tiny seeded configs of five families plus SmolLM2-135M."""

from __future__ import annotations

from typing import Any

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# Sliding window 6 < prompt length, so sliding layers drop keys and cumulative_length matters.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "llama": {"type": "llama", "config": TINY},
    "qwen3": {"type": "qwen3", "config": {**TINY, "head_dim": 16}},
    "mistral": {"type": "mistral", "config": {**TINY, "sliding_window": 6}},
    "gemma3": {"type": "gemma3_text", "config": {
        **TINY, "head_dim": 16, "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}},
    "gpt2": {"type": "gpt2", "config": {"n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 256,
                                        "n_positions": 256, "bos_token_id": 1, "eos_token_id": 2}},
}

TINY_PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 13, 200, 31]
TINY_TURN2 = [77, 78, 79, 80, 81, 82, 83, 84]


def tiny(name: str, cache_dir: Any, dtype: str = "float32") -> Any:
    """A tiny seeded model of family ``name``, saved and loaded through the real loading path."""
    from meshnode.runtime.loader import TinySpec, load_model

    s = TINY_MODELS[name]
    return load_model(TinySpec(s["type"], s["config"]), dtype=dtype, cache_dir=cache_dir)
