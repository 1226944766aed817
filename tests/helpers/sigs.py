"""Deterministic model signatures for discovery tests (no model needs loading)."""

from discovery.signature import ModelSignature


def fake_signature(i: int) -> ModelSignature:
    return ModelSignature(
        family="llama", architecture="LlamaForCausalLM", weights_digest=f"{i:064x}",
        num_layers=2 + i, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        rope={"type": "default", "theta": 10000.0}, norm={"type": "rmsnorm", "eps": 1e-5, "placement": "pre"},
        vocab_size=128, special_tokens={"bos": 1, "eos": 2}, cache_layout={"sliding_window": None},
        max_positions=512,
    )
