"""The envelope: what a tensor message is, where and how it applies, and what it carries.

Invariant B (semantics) and C (determinism) live here: every message states its kind, layer and
token ranges, batch slot and apply mode, and lists each tensor with dtype, shape and byte length
(its BLAKE3 follows the data in a DIGEST frame). :func:`decode_envelope` checks all of it against
the negotiated bounds before the receiver allocates the payload buffer, so a header alone can never
make us allocate more than allowed.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .codec import need, need_uint, pack, unpack_map
from .errors import ErrorCode, ProtocolError


class Kind(enum.Enum):
    KV_CACHE = "KV_CACHE"
    KV_CACHE_DELTA = "KV_CACHE_DELTA"
    HIDDEN_SLICE = "HIDDEN_SLICE"
    RESIDUAL_PATCH = "RESIDUAL_PATCH"
    VIRTUAL_PREFIX = "VIRTUAL_PREFIX"


class ApplyMode(enum.Enum):
    OVERWRITE = "OVERWRITE"
    APPEND = "APPEND"
    ADDITIVE = "ADDITIVE"  # carries a gain, |gain| <= negotiated residual_gain_max
    MEMORY = "MEMORY"


#: dtype name -> item size in bytes. Names follow numpy/torch spelling; bfloat16 is raw 2-byte words.
DTYPES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}

MAX_NDIM = 8
MAX_NAME = 256
MAX_META_KEYS = 64
MAX_META_LIST = 4096
CHECKSUM_BYTES = 32
_U32 = (1 << 32) - 1
_Scalar = (str, int, float, bool, bytes, type(None))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside the contiguous payload; tensors follow each other in list order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    byte_length: int
    blake3: bytes = b""  # not in the HEADER: known once the sender sealed the last chunk (DIGEST)

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.byte_length]


@dataclass(frozen=True)
class Envelope:
    """The header of one tensor message (sent sealed on the control lane before its chunks)."""

    session_id: bytes
    message_id: int
    kind: Kind
    layers: tuple[int, int]  # half-open [start, stop)
    tokens: tuple[int, int]  # half-open [start, stop)
    batch_slot: int
    apply: ApplyMode
    tensors: tuple[TensorSpec, ...]
    gain: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return sum(t.byte_length for t in self.tensors)

    def with_checksums(self, sums: Sequence[bytes]) -> Envelope:
        """This envelope with each tensor's BLAKE3 filled in (once the DIGEST is known)."""
        return replace(self, tensors=tuple(replace(t, blake3=d)
                                           for t, d in zip(self.tensors, sums, strict=True)))

    def offsets(self) -> list[int]:
        out, off = [], 0
        for t in self.tensors:
            out.append(off)
            off += t.byte_length
        return out


def encode_envelope(env: Envelope) -> bytes:
    return pack({
        "sid": env.session_id, "mid": env.message_id, "kind": env.kind.value,
        "layers": list(env.layers), "tokens": list(env.tokens), "slot": env.batch_slot,
        "apply": env.apply.value, "gain": env.gain, "meta": dict(env.meta),
        "n": len(env.tensors), "len": env.payload_bytes,
        "tensors": [t.to_wire() for t in env.tensors],
    })


@dataclass(frozen=True)
class EnvelopeBounds:
    """What the decoder checks against (taken from the session's agreement)."""

    max_message_bytes: int
    max_metadata_bytes: int
    max_tensors_per_message: int
    residual_gain_max: float
    dtypes: frozenset[str] = frozenset(DTYPES)
    kinds: frozenset[str] = frozenset(k.value for k in Kind)
    num_layers: int = 0  # 0 = unknown, no layer bound


def decode_envelope(body: bytes, bounds: EnvelopeBounds) -> Envelope:
    """Parse and fully validate a header; raises only ProtocolError."""
    d = unpack_map(body, bounds.max_metadata_bytes,
                   max_array=max(bounds.max_tensors_per_message, MAX_META_LIST), max_map=64,
                   max_str=MAX_NAME * 16, max_bin=CHECKSUM_BYTES * 2)  # meta bin values
    sid = need(d, "sid", bytes)
    mid = need_uint(d, "mid")
    kind = _enum(Kind, need(d, "kind", str), bounds.kinds)
    apply = _enum(ApplyMode, need(d, "apply", str), None)
    layers = _range(d, "layers", bounds.num_layers or _U32)
    tokens = _range(d, "tokens", _U32)
    slot = need_uint(d, "slot", _U32)
    gain = d.get("gain")
    if apply is ApplyMode.ADDITIVE:
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
            raise ProtocolError(ErrorCode.MALFORMED, "ADDITIVE needs a finite gain")
        if abs(gain) > bounds.residual_gain_max:
            raise ProtocolError(ErrorCode.LIMIT, f"gain {gain} exceeds {bounds.residual_gain_max}")
        gain = float(gain)
    elif gain is not None:
        raise ProtocolError(ErrorCode.MALFORMED, "gain is only valid with ADDITIVE")
    meta = _meta(need(d, "meta", dict))
    n = need_uint(d, "n", bounds.max_tensors_per_message)
    raw = need(d, "tensors", list)
    if len(raw) != n:
        raise ProtocolError(ErrorCode.MALFORMED, f"tensor_count {n} != {len(raw)} specs")
    total_declared = need_uint(d, "len", bounds.max_message_bytes)
    specs = tuple(_spec(x, bounds) for x in raw)
    total = sum(s.byte_length for s in specs)
    if total != total_declared:
        raise ProtocolError(ErrorCode.CHECKSUM, f"tensor bytes {total} != payload length {total_declared}")
    return Envelope(sid, mid, kind, layers, tokens, slot, apply, specs, gain, meta)


def validate_specs(specs: Sequence[TensorSpec], bounds: EnvelopeBounds) -> None:
    """Sender-side check of the same rules, so a bad local call fails before any byte is sent."""
    if len(specs) > bounds.max_tensors_per_message:
        raise ProtocolError(ErrorCode.LIMIT, "too many tensors")
    for s in specs:
        _spec(s.to_wire(), bounds)
    if sum(s.byte_length for s in specs) > bounds.max_message_bytes:
        raise ProtocolError(ErrorCode.LIMIT, "payload exceeds max_message_bytes")


def _enum(cls: Any, value: str, allowed: frozenset[str] | None) -> Any:
    if value not in cls.__members__:
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown {cls.__name__} {value[:32]!r}")
    if allowed is not None and value not in allowed:
        raise ProtocolError(ErrorCode.UNSUPPORTED, f"{cls.__name__} {value} not negotiated")
    return cls[value]


def _range(d: dict[str, Any], key: str, hi: int) -> tuple[int, int]:
    v = need(d, key, list)
    if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ProtocolError(ErrorCode.MALFORMED, f"{key} must be [start, stop]")
    a, b = v
    if not 0 <= a <= b <= hi:
        raise ProtocolError(ErrorCode.LIMIT, f"{key} range [{a}, {b}) out of bounds 0..{hi}")
    return a, b


def _meta(m: dict[str, Any]) -> dict[str, Any]:
    if len(m) > MAX_META_KEYS:
        raise ProtocolError(ErrorCode.LIMIT, "too many meta keys")
    for k, v in m.items():
        if not isinstance(k, str):
            raise ProtocolError(ErrorCode.MALFORMED, "meta keys must be strings")
        if isinstance(v, list):
            if len(v) > MAX_META_LIST or not all(isinstance(x, _Scalar) for x in v):
                raise ProtocolError(ErrorCode.MALFORMED, f"meta {k!r}: list of scalars expected")
        elif not isinstance(v, _Scalar):
            raise ProtocolError(ErrorCode.MALFORMED, f"meta {k!r}: scalar expected")
    return m


def _spec(x: Any, bounds: EnvelopeBounds) -> TensorSpec:
    if not isinstance(x, list) or len(x) != 4:
        raise ProtocolError(ErrorCode.MALFORMED, "tensor spec must be [name, dtype, shape, len]")
    name, dtype, shape, nbytes = x
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise ProtocolError(ErrorCode.MALFORMED, "tensor name must be a short string")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown dtype {str(dtype)[:32]!r}")
    if dtype not in bounds.dtypes:
        raise ProtocolError(ErrorCode.UNSUPPORTED, f"dtype {dtype} not negotiated")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ProtocolError(ErrorCode.MALFORMED, f"bad shape for tensor {name!r}")
    if any(s > bounds.max_message_bytes for s in shape):
        raise ProtocolError(ErrorCode.LIMIT, f"dimension of {name!r} exceeds the message limit")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= bounds.max_message_bytes:
        raise ProtocolError(ErrorCode.LIMIT, f"byte_length of {name!r} out of range")
    if math.prod(shape) * DTYPES[dtype] != nbytes:
        raise ProtocolError(ErrorCode.CHECKSUM, f"shape x itemsize != byte_length for {name!r}")
    return TensorSpec(name, dtype, tuple(shape), nbytes)
