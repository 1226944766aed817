"""One test per DESIGN.md §10 trap, each written so that falling into the trap fails it.

In-process and tiny models only (fast); the two-process exactness tests live in test_runtime_kv.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from meshnode.runtime import kv
from meshnode.runtime.arch import decoder_layers
from meshnode.runtime.buffers import TensorSlice, tensor_bytes, tensors_from_buffer
from meshnode.runtime.loader import LoadedModel
from tests.helpers.runtime_models import TINY_PROMPT, TINY_TURN2, tiny

RUNTIME = Path(__file__).resolve().parents[1] / "meshnode" / "runtime"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traps-cache")


_tiny = tiny


@pytest.fixture(scope="module")
def gemma(cache_dir: Path) -> LoadedModel:
    return _tiny("gemma3", cache_dir)


@pytest.fixture(scope="module")
def llama(cache_dir: Path) -> LoadedModel:
    return _tiny("llama", cache_dir)


def _clone(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.items()}


def test_snapshot_ships_all_prompt_tokens_and_next_token(llama: LoadedModel) -> None:
    """Trap: KV for n-1 tokens + re-running the last prompt token is not exact."""
    tensors, meta, state = kv.prefill_and_capture(llama, TINY_PROMPT)
    n = len(TINY_PROMPT)
    assert meta["token_end"] == n and tensors["L0.k"].shape[2] == n
    assert meta["next_token"] == int(torch.argmax(tensors["logits"]))
    rx = kv.inject(llama, _clone(tensors), meta)
    assert rx.length == n and rx.next_token == state.next_token


def test_sliding_cumulative_length_restored(gemma: LoadedModel) -> None:
    """Trap: DynamicCache(ddp_cache_data=...) loses the true length of sliding layers."""
    tensors, meta, _ = kv.prefill_and_capture(gemma, TINY_PROMPT)
    n = len(TINY_PROMPT)
    sliding = [i for i, layer in enumerate(kv.new_cache(gemma).layers) if layer.is_sliding]
    assert sliding, "tiny Gemma 3 must have sliding layers"
    for i in sliding:
        assert tensors[f"L{i}.k"].shape[2] < n  # the window really dropped keys
        assert meta["cumulative_length"][i] == n
    state = kv.inject(gemma, _clone(tensors), meta)
    assert all(layer.get_seq_length() == n for layer in state.cache.layers)
    # The naive rebuild the trap describes really is wrong here, so this test would catch it:
    naive = DynamicCache(ddp_cache_data=[(tensors[f"L{i}.k"], tensors[f"L{i}.v"])
                                         for i in range(len(state.cache.layers))], config=gemma.model.config)
    assert naive.layers[sliding[0]].get_seq_length() != n
    # And a meta without the length is refused rather than silently mis-positioned.
    for bad in ({k: v for k, v in meta.items() if k != "cumulative_length"},
                {**meta, "cumulative_length": [None] * len(state.cache.layers)}):
        with pytest.raises(kv.KVMismatch):
            kv.inject(gemma, _clone(tensors), bad)


def test_receiver_never_refeeds_prompt_and_mask_covers_past(gemma: LoadedModel) -> None:
    """Traps: generate(full_prompt) on a filled cache re-feeds it; a mask must span past + new."""
    tensors, meta, _ = kv.prefill_and_capture(gemma, TINY_PROMPT)
    state = kv.inject(gemma, _clone(tensors), meta)
    seen: list[tuple[int, int]] = []

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((kwargs["input_ids"].shape[1], kwargs["attention_mask"].shape[1]))

    h = gemma.model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        kv.continue_greedy(gemma, state, 4)
    finally:
        h.remove()
    n = len(TINY_PROMPT)
    assert seen == [(1, n + 1), (1, n + 2), (1, n + 3)]


def test_dtype_and_thread_mismatch_refused(llama: LoadedModel) -> None:
    """Trap: an fp32 model fed bf16 KV runs silently and drifts; thread counts change fp32 sums."""
    tensors, meta, _ = kv.prefill_and_capture(llama, TINY_PROMPT, dtype="bfloat16")
    with pytest.raises(kv.KVMismatch):
        kv.inject(llama, tensors, meta)
    cast = {k: v.float() for k, v in tensors.items()}
    with pytest.raises(kv.KVMismatch):  # meta still says bf16
        kv.inject(llama, cast, meta)
    tensors, meta, _ = kv.prefill_and_capture(llama, TINY_PROMPT)
    with pytest.raises(kv.KVMismatch):
        kv.inject(llama, tensors, {**meta, "threads": 2})


def test_rope_positions_are_fixed(llama: LoadedModel) -> None:
    """Trap: stored keys carry RoPE, so KV cannot move: snapshots start at 0, deltas at cache end."""
    tensors, meta, state = kv.prefill_and_capture(llama, TINY_PROMPT)
    delta, dmeta = kv.append_turn(llama, state, TINY_TURN2)
    rx = kv.inject(llama, _clone(tensors), meta)
    with pytest.raises(kv.KVMismatch):
        kv.inject(llama, delta, {**dmeta, "kind": kv.KIND_FULL})
    with pytest.raises(kv.KVMismatch):
        kv.apply_delta(llama, rx, delta, {**dmeta, "token_start": dmeta["token_start"] + 1})
    kv.apply_delta(llama, rx, _clone(delta), dmeta)
    with pytest.raises(kv.KVMismatch):  # the same delta twice would land at the wrong positions
        kv.apply_delta(llama, rx, _clone(delta), dmeta)


def test_failed_delta_leaves_state_untouched(gemma: LoadedModel) -> None:
    """Invariant D: a bad message (last layer malformed) applies nothing."""
    tensors, meta, state = kv.prefill_and_capture(gemma, TINY_PROMPT)
    delta, dmeta = kv.append_turn(gemma, state, TINY_TURN2)
    rx = kv.inject(gemma, _clone(tensors), meta)
    before = [(layer.keys, layer.get_seq_length()) for layer in rx.cache.layers]
    last = len(rx.cache.layers) - 1
    broken = {**delta, f"L{last}.v": delta[f"L{last}.v"][:, :1]}
    with pytest.raises(kv.KVMismatch):
        kv.apply_delta(gemma, rx, broken, dmeta)
    assert rx.length == len(TINY_PROMPT)
    assert [(layer.keys, layer.get_seq_length()) for layer in rx.cache.layers] == before


def test_sliding_delta_longer_than_window_matches(gemma: LoadedModel) -> None:
    """A delta longer than the window (8 > W-1 = 5) trims exactly as the sender's own cache did."""
    assert len(TINY_TURN2) > gemma.model.config.sliding_window - 1
    tensors, meta, state = kv.prefill_and_capture(gemma, TINY_PROMPT)
    rx = kv.inject(gemma, _clone(tensors), meta)
    delta, dmeta = kv.append_turn(gemma, state, TINY_TURN2)
    kv.apply_delta(gemma, rx, _clone(delta), dmeta)
    for a, b in zip(state.cache.layers, rx.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and a.get_seq_length() == b.get_seq_length()


def test_no_transformers_4x_cache_api() -> None:
    """Trap: key_cache/value_cache, legacy tuples and from_legacy_cache are gone in 5.x."""
    banned = re.compile(r"\b(key_cache|value_cache|from_legacy_cache|to_legacy_cache)\b")
    for f in RUNTIME.glob("*.py"):
        assert not banned.search(f.read_text()), f


def test_frombuffer_zero_copy_bf16(llama: LoadedModel) -> None:
    """Received bytes become tensors without a copy, bf16 included (numpy has no bf16)."""
    t = torch.randn(1, 2, 5, 16).to(torch.bfloat16)
    raw = bytes(tensor_bytes(t))
    buf = bytearray(b"\0" * 64 + raw)
    (got,) = tensors_from_buffer(buf, [TensorSlice("x", "bfloat16", (1, 2, 5, 16), 64, len(raw))]).values()
    assert torch.equal(got, t)
    buf[64] ^= 0xFF  # shares memory with the received buffer
    assert not torch.equal(got, t)
    with pytest.raises(ValueError):
        tensors_from_buffer(buf, [TensorSlice("x", "bfloat16", (1, 2, 6, 16), 64, len(raw))])
    with pytest.raises(ValueError):
        tensors_from_buffer(buf, [TensorSlice("x", "bfloat16", (1, 2, 5, 16), 100, len(raw))])


def test_partial_layer_capture(llama: LoadedModel) -> None:
    """Layer and token ranges capture exactly the requested slice (a partial range is not injectable)."""
    _, _, state = kv.prefill_and_capture(llama, TINY_PROMPT)
    t, m = kv.capture(llama, state, layers=(1, 3), tokens=(2, 7))
    assert sorted(t) == ["L1.k", "L1.v", "L2.k", "L2.v"]
    assert torch.equal(t["L2.k"], state.cache.layers[2].keys[:, :, 2:7])
    assert t["L2.k"].is_contiguous() and m["kind"] == kv.KIND_DELTA
    assert len(decoder_layers(llama.model)) == 4


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_generate_path_matches_and_feeds_one_token(family: str, cache_dir: Path) -> None:
    """``generate()`` on the restored cache: placeholders are never embedded, output is bitwise equal."""
    lm = _tiny(family, cache_dir)
    ref_tokens, ref_logits = kv.generate_reference(lm, TINY_PROMPT, 12)
    tensors, meta, _ = kv.prefill_and_capture(lm, TINY_PROMPT)
    state = kv.inject(lm, _clone(tensors), meta)
    fed: list[int] = []
    h = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0].shape[1]))
    try:
        tokens, logits = kv.continue_generate(lm, state, 12)
    finally:
        h.remove()
    assert fed == [1] * 11  # trap: a cache holding the prompt must not be fed it again
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)
    more, _ = kv.continue_greedy(lm, state, 3)  # the state stays usable after generate()
    assert more[0] == tokens[-1] and state.length == len(TINY_PROMPT) + 13
