"""Model signatures: what makes two models "the same" for state handoff (DESIGN.md invariant A).

A :class:`ModelSignature` is a plain, frozen record. It has a canonical msgpack encoding (sorted
keys, so two nodes that describe the same model produce identical bytes) and a ``compat_key``: the
BLAKE3 of exactly the fields that must match for KV/hidden state to be meaningful on the other side.
Fields that are negotiated rather than required to match (supported dtypes, protocol version, max
positions) are carried but not hashed into the key.

This module knows nothing of transformers; builders that read model files live in
``discovery.builders`` (safetensors/GGUF) and ``meshnode.runtime`` (loaded models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import blake3
import msgpack

SIGNATURE_VERSION = 1
MAX_SIGNATURE_BYTES = 16 * 1024

# Invariant A: the session opens only if every one of these is equal on both sides.
COMPAT_FIELDS: tuple[str, ...] = (
    "architecture",
    "weights_digest",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope",
    "norm",
    "vocab_size",
    "special_tokens",
    "cache_layout",
)


class SignatureError(ValueError):
    """A signature could not be decoded or validated."""


Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class ModelSignature:
    """Identity of a model for state exchange. Nested maps hold only scalars or lists of scalars."""

    family: str
    architecture: str
    weights_digest: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: dict[str, Any] = field(default_factory=dict)  # type, theta, scaling params
    norm: dict[str, Any] = field(default_factory=dict)  # type, eps, placement
    vocab_size: int = 0
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids
    cache_layout: dict[str, Any] = field(default_factory=dict)  # sliding window + per-layer types
    max_positions: int = 0
    dtypes: tuple[str, ...] = ("float32",)
    version: int = SIGNATURE_VERSION

    # -- canonical encoding -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dtypes"] = list(self.dtypes)
        return _canonical(d)

    def encode(self) -> bytes:
        """Deterministic msgpack (sorted keys at every level)."""
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_dict(cls, d: Any) -> ModelSignature:
        if not isinstance(d, dict):
            raise SignatureError("signature must be a map")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise SignatureError(f"unknown signature fields: {sorted(map(str, unknown))}")
        missing = [n for n, f in names.items()
                   if n not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        if missing:
            raise SignatureError(f"missing signature fields: {missing}")
        kw: dict[str, Any] = {}
        for name, value in d.items():
            kw[name] = _check_field(name, value)
        return cls(**kw)

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = MAX_SIGNATURE_BYTES) -> ModelSignature:
        """Bounded decode of peer bytes; raises :class:`SignatureError` on anything malformed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SignatureError("signature must be bytes")
        if len(data) > max_bytes:
            raise SignatureError(f"signature of {len(data)} bytes exceeds {max_bytes}")
        try:
            obj = msgpack.unpackb(
                bytes(data), raw=False, strict_map_key=True, use_list=True,
                max_str_len=4096, max_bin_len=0,
                max_array_len=4096, max_map_len=256, max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises several types; normalise
            raise SignatureError(f"malformed signature: {exc}") from None
        return cls.from_dict(obj)

    # -- compatibility ------------------------------------------------------------------------
    def compat_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in COMPAT_FIELDS}

    @property
    def compat_key(self) -> str:
        """Hex BLAKE3 of the canonical encoding of the invariant-A fields."""
        blob = msgpack.packb(_canonical(self.compat_dict()), use_bin_type=True)
        return blake3.blake3(b"latentlink/compat/v1\x00" + blob).hexdigest()


def compare(a: ModelSignature, b: ModelSignature) -> list[str]:
    """Names of mismatched invariant-A fields; nested maps report ``field.subkey``."""
    da, db = a.compat_dict(), b.compat_dict()
    out: list[str] = []
    for k in COMPAT_FIELDS:
        va, vb = da[k], db[k]
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            for sub in sorted(set(va) | set(vb)):
                if va.get(sub, _MISSING) != vb.get(sub, _MISSING):
                    out.append(f"{k}.{sub}")
        else:
            out.append(k)
    return out


_MISSING = object()


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


_INT_FIELDS = {"num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
               "vocab_size", "max_positions", "version"}
_STR_FIELDS = {"family", "architecture", "weights_digest"}
_MAP_FIELDS = {"rope", "norm", "special_tokens", "cache_layout"}


def _check_scalar_tree(name: str, v: Any, depth: int = 0) -> Any:
    if depth > 3:
        raise SignatureError(f"{name}: nested too deeply")
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, list):
        return [_check_scalar_tree(name, x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {str(k): _check_scalar_tree(name, x, depth + 1) for k, x in v.items()}
    raise SignatureError(f"{name}: unsupported value type {type(v).__name__}")


def _check_field(name: str, value: Any) -> Any:
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SignatureError(f"{name}: expected a non-negative integer")
        return value
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise SignatureError(f"{name}: expected a string")
        return value
    if name in _MAP_FIELDS:
        if not isinstance(value, dict):
            raise SignatureError(f"{name}: expected a map")
        return _check_scalar_tree(name, value)
    if name == "dtypes":
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise SignatureError("dtypes: expected a list of strings")
        return tuple(value)
    raise SignatureError(f"unknown field {name}")  # pragma: no cover
