"""RESIDUAL_PATCH and VIRTUAL_PREFIX (in-process, tiny models; HIDDEN_SLICE's two-process test is
in test_runtime_kv.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from meshnode.runtime import hidden, kv, prefix, residual
from meshnode.runtime.arch import decoder_layers
from meshnode.runtime.loader import LoadedModel, TinySpec, load_model
from tests.helpers.runtime_models import TINY_MODELS, TINY_PROMPT

FAMILIES = ["llama", "gemma3", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    s = TINY_MODELS[request.param]
    return load_model(TinySpec(s["type"], s["config"]), cache_dir=tmp_path_factory.mktemp("kinds"))


def _logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def test_zero_patch_is_bitwise_noop(lm: LoadedModel) -> None:
    ref = _logits(lm, TINY_PROMPT)
    hsize = lm.model.config.get_text_config().hidden_size
    t, m = residual.make_patch(1, [2, 3, 4], torch.zeros(3, hsize), gain=1.0)
    with residual.residual_patch(lm, t, m):
        assert torch.equal(_logits(lm, TINY_PROMPT), ref)


def test_patch_to_target_reproduces_target_logits(lm: LoadedModel) -> None:
    target_ids = [t + 1 for t in TINY_PROMPT]
    layer = 1
    own = residual.capture_residual(lm, TINY_PROMPT, layer)
    target = residual.capture_residual(lm, target_ids, layer)
    positions = list(range(len(TINY_PROMPT)))
    t, m = residual.make_patch(layer, positions, target - own, gain=1.0)
    with residual.residual_patch(lm, t, m, max_norm_ratio=10.0, negotiated_gain=1.0):
        got = _logits(lm, TINY_PROMPT)
    torch.testing.assert_close(got, _logits(lm, target_ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, _logits(lm, TINY_PROMPT), atol=1e-3)


def test_patch_gate_and_gain_rejections(lm: LoadedModel) -> None:
    hsize = lm.model.config.get_text_config().hidden_size
    ref = _logits(lm, TINY_PROMPT)
    own = residual.capture_residual(lm, TINY_PROMPT, 1)
    t, m = residual.make_patch(1, [0, 1], own[:2] * 5.0, gain=1.0)  # 5x the residual's own norm
    with pytest.raises(residual.PatchRejected):
        with residual.residual_patch(lm, t, m, max_norm_ratio=2.0):
            _logits(lm, TINY_PROMPT)
    with residual.residual_patch(lm, t, m, max_norm_ratio=6.0):  # within a looser bound: applied
        assert not torch.equal(_logits(lm, TINY_PROMPT), ref)
    with pytest.raises(residual.PatchRejected):
        with residual.residual_patch(lm, t, m, negotiated_gain=0.5):
            pass
    bad, bm = residual.make_patch(1, [0, 1], torch.ones(2, hsize + 1), gain=1.0)
    with pytest.raises(residual.PatchRejected):
        with residual.residual_patch(lm, bad, bm):
            pass
    assert torch.equal(_logits(lm, TINY_PROMPT), ref)  # every hook was removed


def test_virtual_prefix_equals_tokens(lm: LoadedModel) -> None:
    split = 9
    t, m = prefix.capture_prefix(lm, TINY_PROMPT[:split])
    state = prefix.prefill_with_prefix(lm, t, m, TINY_PROMPT[split:])
    ref_tokens, ref_logits = kv.generate_reference(lm, TINY_PROMPT, 8)
    tokens, logits = kv.continue_greedy(lm, state, 8)
    assert tokens == ref_tokens
    assert torch.equal(logits, ref_logits)


def test_hidden_slice_runs_only_upper_layers(lm: LoadedModel) -> None:
    t, m, _ = hidden.capture_hidden(lm, TINY_PROMPT, 1)
    with pytest.raises(hidden.HiddenMismatch):
        hidden.run_from_hidden(lm, {"hidden": t["hidden"].to(torch.bfloat16)}, m)
    with pytest.raises(hidden.HiddenMismatch):
        hidden.run_from_hidden(lm, t, {**m, "layer_start": 99})
    layers = decoder_layers(lm.model)
    calls = [0] * len(layers)
    handles = []
    for i, block in enumerate(layers):
        linear = next(x for x in block.modules() if isinstance(x, torch.nn.Linear | Conv1D))
        handles.append(linear.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)))
    try:
        got = hidden.run_from_hidden(lm, t, m)
    finally:
        for h in handles:
            h.remove()
    assert calls[:2] == [0, 0] and all(calls[2:])  # layers 0..L skipped, L+1.. computed
    assert torch.equal(got, _logits(lm, TINY_PROMPT))  # and the blocks' own forward is back
