"""Two-process KV handoff: a sender subprocess captures, this process injects and continues.

Pins invariant C (DESIGN.md §3) and the §10 recipe: 32-token greedy continuations identical to the
sender continuing itself (``generate()``), fp32 logits bitwise equal, bf16 tokens identical, a turn-2
delta equal to a full snapshot, HIDDEN_SLICE logits equal across processes, and a different-weights
receiver carrying a different compat key.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from discovery.signature import ModelSignature, compare
from meshnode.runtime import hidden, kv
from meshnode.runtime.loader import TinySpec, load_model
from tests.helpers.runtime_models import TINY_MODELS, TINY_PROMPT, TINY_TURN2
from tests.helpers.runtime_peer import load_payload, model_spec

HELPER = Path(__file__).parent / "helpers" / "runtime_peer.py"
N = 32

JOBS = [
    *({"name": f"{fam}-{dt}", "model": spec, "dtype": dt, "prompt": TINY_PROMPT, "n": N,
       "turn2": TINY_TURN2, "hidden_layer": 1} for fam, spec in TINY_MODELS.items()
      for dt in ("float32", "bfloat16")),
    {"name": "smollm2-float32", "model": "smollm2", "dtype": "float32", "n": N,
     "prompt": "The capital of France is", "turn2": [1205, 506, 3575, 282, 4649, 314], "hidden_layer": 20},
    {"name": "smollm2-bfloat16", "model": "smollm2", "dtype": "bfloat16", "n": N,
     "prompt": "The capital of France is"},
]
BY_NAME = {j["name"]: j for j in JOBS}


@pytest.fixture(scope="session")
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model cache (SmolLM2 dequantized once, tiny models); LATENTLINK_TEST_CACHE reuses one across runs."""
    env = os.environ.get("LATENTLINK_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="session")
def sender_out(runtime_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sender")
    jobs = out / "jobs.json"
    jobs.write_text(json.dumps(JOBS))
    subprocess.run([sys.executable, str(HELPER), "--jobs", str(jobs), "--out", str(out),
                    "--cache", str(runtime_cache)], check=True, timeout=900,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


@functools.cache
def _receiver(name: str, cache: str) -> kv.LoadedModel:
    job = BY_NAME[name]
    return load_model(model_spec(job), dtype=job["dtype"], num_threads=1, cache_dir=cache)


@pytest.fixture
def rx(runtime_cache: Path):
    return lambda name: _receiver(name, str(runtime_cache))


def _assert_same(job: dict, tokens: list[int], logits: torch.Tensor, ref: dict) -> None:
    assert tokens == ref["tokens"].tolist()
    if job["dtype"] == "float32":
        # Invariant C: bitwise, not allclose (real models keep tokens while logits drift).
        assert torch.equal(logits, ref["logits"])


@pytest.mark.parametrize("name", list(BY_NAME))
def test_snapshot_continuation_matches_sender(name: str, sender_out: Path, rx) -> None:
    job, lm = BY_NAME[name], rx(name)
    folder = sender_out / name
    assert ModelSignature.decode((folder / "signature.bin").read_bytes()).compat_key == lm.signature.compat_key
    tensors, meta = load_payload(folder, "snap")
    state = kv.inject(lm, tensors, meta)
    tokens, logits = kv.continue_greedy(lm, state, N)
    assert len(tokens) == N
    _assert_same(job, tokens, logits, load_file(folder / "ref.safetensors"))


@pytest.mark.parametrize("name", [n for n, j in BY_NAME.items() if j.get("turn2")])
def test_delta_equals_full_snapshot(name: str, sender_out: Path, rx) -> None:
    job, lm = BY_NAME[name], rx(name)
    folder = sender_out / name
    ref2 = load_file(folder / "ref2.safetensors")
    state = kv.inject(lm, *load_payload(folder, "snap"))
    kv.apply_delta(lm, state, *load_payload(folder, "delta"))
    full = kv.inject(lm, *load_payload(folder, "snap2"))
    assert state.length == full.length == len(kv_prompt(lm, job)) + len(job["turn2"])
    t_delta, l_delta = kv.continue_greedy(lm, state, N)
    t_full, l_full = kv.continue_greedy(lm, full, N)
    assert t_delta == t_full
    assert torch.equal(l_delta, l_full)
    _assert_same(job, t_delta, l_delta, ref2)


def kv_prompt(lm: kv.LoadedModel, job: dict) -> list[int]:
    p = job["prompt"]
    return lm.tokenizer(p)["input_ids"] if isinstance(p, str) else p


@pytest.mark.parametrize("name", [n for n, j in BY_NAME.items() if j.get("hidden_layer") is not None])
def test_hidden_slice_gives_sender_logits(name: str, sender_out: Path, rx) -> None:
    job, lm = BY_NAME[name], rx(name)
    folder = sender_out / name
    logits = hidden.run_from_hidden(lm, *load_payload(folder, "hidden"))
    ref = load_file(folder / "ref_hidden.safetensors")["logits"]
    if job["dtype"] == "float32":
        assert torch.equal(logits, ref)
    else:
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_different_weights_have_different_compat_key(sender_out: Path, runtime_cache: Path) -> None:
    spec = TINY_MODELS["llama"]
    other = load_model(TinySpec(spec["type"], spec["config"], seed=1), cache_dir=runtime_cache)
    sender_sig = ModelSignature.decode((sender_out / "llama-float32" / "signature.bin").read_bytes())
    assert other.signature.compat_key != sender_sig.compat_key
    assert compare(sender_sig, other.signature) == ["weights_digest"]
