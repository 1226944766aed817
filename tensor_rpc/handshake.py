"""HELLO and AUTH messages and the deterministic negotiation both sides compute.

Both peers run :func:`negotiate` on the same two hellos and get the same :class:`Agreement`:
highest common version, the initiator's most preferred cipher the responder also offers, the
minimum of every limit, and the intersection of dtypes and kinds. Invariant A is enforced here:
any model-signature mismatch refuses the session naming every mismatched field — and so is any
mismatch of what the two *runtimes* need for exact results (:class:`RuntimeTerms`: the KV dtype
and the torch thread count), before a byte of payload moves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from discovery.signature import MAX_SIGNATURE_BYTES, ModelSignature, SignatureError, compare

from .aead import CIPHERS
from .codec import need, need_str_list, need_uint, pack, unpack_map
from .envelope import DTYPES, EnvelopeBounds, Kind
from .errors import ErrorCode, ProtocolError
from .limits import MAX_CHUNK_BYTES, MAX_HANDSHAKE_FRAME, MIN_CHUNK_BYTES, Limits

PROTOCOL_NAME = "latentlink/tensor"
# 1 (checksums in the HEADER) and 2 (lane control on a second stream, responder proved first)
# were retired before release
SUPPORTED_VERSIONS: tuple[int, ...] = (3,)
SESSION_ID_BYTES = 16


@dataclass(frozen=True)
class RuntimeTerms:
    """What a model runtime will actually accept, declared in HELLO so a mismatch is refused at
    the handshake instead of after the payload moved: the dtype its KV cache runs in, the torch
    thread count (fp32 results are bitwise equal only with equal counts, DESIGN.md §10), and the
    wire dtypes its messages may carry (the KV dtype, float32 logits, ...)."""

    kv_dtype: str
    threads: int
    dtypes: tuple[str, ...]

    def to_wire(self) -> dict[str, object]:
        return {"kv_dtype": self.kv_dtype, "threads": self.threads}


@dataclass(frozen=True)
class Hello:
    """What one side offers. ``session_id`` is chosen by the initiator and echoed by the responder."""

    versions: tuple[int, ...]
    session_id: bytes
    role: str  # "i" initiator, "r" responder
    signature: bytes  # canonical ModelSignature encoding
    dtypes: tuple[str, ...]
    kinds: tuple[str, ...]
    max_message_bytes: int
    max_metadata_bytes: int
    max_tensors_per_message: int
    chunk_bytes: int
    recv_window_bytes: int
    ciphers: tuple[str, ...]
    residual_gain_max: float
    ephemeral_key: bytes
    runtime: dict[str, object] | None = None  # RuntimeTerms.to_wire() of a model runtime, else nil

    def encode(self) -> bytes:
        return pack({
            "proto": PROTOCOL_NAME, "versions": list(self.versions), "sid": self.session_id,
            "role": self.role, "sig": self.signature, "dtypes": list(self.dtypes),
            "kinds": list(self.kinds), "max_message_bytes": self.max_message_bytes,
            "max_metadata_bytes": self.max_metadata_bytes,
            "max_tensors_per_message": self.max_tensors_per_message,
            "chunk_bytes": self.chunk_bytes, "recv_window_bytes": self.recv_window_bytes,
            "ciphers": list(self.ciphers), "residual_gain_max": self.residual_gain_max,
            "eph": self.ephemeral_key, "runtime": self.runtime,
        })

    @classmethod
    def from_limits(cls, limits: Limits, session_id: bytes, role: str, signature: ModelSignature,
                    ephemeral_key: bytes, terms: RuntimeTerms | None = None) -> Hello:
        return cls(SUPPORTED_VERSIONS, session_id, role, signature.encode(),
                   tuple(terms.dtypes if terms else DTYPES), tuple(k.value for k in Kind),
                   limits.max_message_bytes, limits.max_metadata_bytes,
                   limits.max_tensors_per_message, limits.chunk_bytes, limits.recv_window_bytes,
                   tuple(c for c in limits.ciphers if c in CIPHERS),
                   float(limits.residual_gain_max), bytes(ephemeral_key),
                   terms.to_wire() if terms else None)


def decode_hello(body: bytes) -> Hello:
    d = unpack_map(body, MAX_HANDSHAKE_FRAME, max_array=64, max_map=32, max_str=256,
                   max_bin=MAX_SIGNATURE_BYTES)
    if d.get("proto") != PROTOCOL_NAME:
        raise ProtocolError(ErrorCode.VERSION, "not a latentlink tensor hello")
    versions = need(d, "versions", list)
    if not versions or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 16
                               for v in versions):
        raise ProtocolError(ErrorCode.MALFORMED, "versions must be small positive integers")
    sid = need(d, "sid", bytes)
    if len(sid) != SESSION_ID_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED, "session id must be 16 bytes")
    role = need(d, "role", str)
    if role not in ("i", "r"):
        raise ProtocolError(ErrorCode.MALFORMED, "role must be 'i' or 'r'")
    gain = need(d, "residual_gain_max", (float, int))
    if not math.isfinite(gain) or gain < 0:
        raise ProtocolError(ErrorCode.MALFORMED, "residual_gain_max must be finite and >= 0")
    eph = need(d, "eph", bytes)
    if len(eph) != 32:
        raise ProtocolError(ErrorCode.MALFORMED, "ephemeral key must be 32 bytes")
    chunk = need_uint(d, "chunk_bytes", MAX_CHUNK_BYTES)
    if chunk < MIN_CHUNK_BYTES:
        raise ProtocolError(ErrorCode.LIMIT, f"chunk_bytes {chunk} below {MIN_CHUNK_BYTES}")
    hello = Hello(
        versions=tuple(versions), session_id=sid, role=role, signature=need(d, "sig", bytes),
        dtypes=tuple(need_str_list(d, "dtypes")), kinds=tuple(need_str_list(d, "kinds")),
        max_message_bytes=need_uint(d, "max_message_bytes"),
        max_metadata_bytes=need_uint(d, "max_metadata_bytes", 1 << 32),
        max_tensors_per_message=need_uint(d, "max_tensors_per_message", 1 << 24),
        chunk_bytes=chunk, recv_window_bytes=need_uint(d, "recv_window_bytes"),
        ciphers=tuple(need_str_list(d, "ciphers")), residual_gain_max=float(gain),
        ephemeral_key=eph)
    if hello.max_metadata_bytes < 256 or hello.max_tensors_per_message < 1:
        raise ProtocolError(ErrorCode.LIMIT, "metadata/tensor limits too small")
    return dataclasses.replace(hello, runtime=_runtime(d.get("runtime")))


def _runtime(v: object) -> dict[str, object] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "runtime must be a map or nil")
    dt, th = v.get("kv_dtype"), v.get("threads")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise ProtocolError(ErrorCode.MALFORMED, "runtime.kv_dtype must be a known dtype")
    if isinstance(th, bool) or not isinstance(th, int) or not 0 < th < 1 << 16:
        raise ProtocolError(ErrorCode.MALFORMED, "runtime.threads must be a small positive integer")
    return {"kv_dtype": dt, "threads": th}


@dataclass(frozen=True)
class Agreement:
    """The negotiated parameters of a READY session (identical on both sides)."""

    version: int
    session_id: bytes
    cipher: str
    max_message_bytes: int
    max_metadata_bytes: int
    max_tensors_per_message: int
    chunk_bytes: int
    dtypes: frozenset[str]
    kinds: frozenset[str]
    residual_gain_max: float
    remote_signature: ModelSignature
    send_window_bytes: int  # what the peer lets us have in flight (its recv window)
    recv_window_bytes: int  # what we grant the peer
    remote_peer_id: str = ""

    def bounds(self, num_layers: int = 0) -> EnvelopeBounds:
        return EnvelopeBounds(self.max_message_bytes, self.max_metadata_bytes,
                              self.max_tensors_per_message, self.residual_gain_max,
                              self.dtypes, self.kinds, num_layers)


def negotiate(initiator: Hello, responder: Hello, local: ModelSignature, local_role: str) -> Agreement:
    """Deterministic agreement from both hellos; raises VERSION/INCOMPATIBLE_MODEL/UNSUPPORTED."""
    if initiator.role != "i" or responder.role != "r":
        raise ProtocolError(ErrorCode.STATE, "both peers claim the same role")
    if initiator.session_id != responder.session_id:
        raise ProtocolError(ErrorCode.MALFORMED, "responder did not echo the session id")
    common = set(initiator.versions) & set(responder.versions)
    if not common:
        raise ProtocolError(ErrorCode.VERSION, f"no common version: {initiator.versions} vs "
                            f"{responder.versions}")
    remote = responder if local_role == "i" else initiator
    mine = initiator if local_role == "i" else responder
    try:
        remote_sig = ModelSignature.decode(remote.signature, MAX_SIGNATURE_BYTES)
    except SignatureError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"model signature: {exc}") from None
    mismatched = list(compare(local, remote_sig))
    if initiator.runtime is not None and responder.runtime is not None:
        mismatched += [f"runtime.{k}" for k in ("kv_dtype", "threads")
                       if initiator.runtime.get(k) != responder.runtime.get(k)]
    if mismatched:
        what = "model signatures differ" if not all(f.startswith("runtime.") for f in mismatched) \
            else "runtimes differ (exact results need the same KV dtype and thread count)"
        raise ProtocolError(ErrorCode.INCOMPATIBLE_MODEL, what, mismatched)
    cipher = next((c for c in initiator.ciphers if c in responder.ciphers and c in CIPHERS), None)
    if cipher is None:
        raise ProtocolError(ErrorCode.UNSUPPORTED, "no common cipher")
    dtypes = frozenset(initiator.dtypes) & frozenset(responder.dtypes) & frozenset(DTYPES)
    kinds = frozenset(initiator.kinds) & frozenset(responder.kinds) & frozenset(k.value for k in Kind)
    if not dtypes or not kinds:
        raise ProtocolError(ErrorCode.UNSUPPORTED, "no common dtype or message kind")
    return Agreement(
        version=max(common), session_id=initiator.session_id, cipher=cipher,
        max_message_bytes=min(initiator.max_message_bytes, responder.max_message_bytes),
        max_metadata_bytes=min(initiator.max_metadata_bytes, responder.max_metadata_bytes),
        max_tensors_per_message=min(initiator.max_tensors_per_message,
                                    responder.max_tensors_per_message),
        chunk_bytes=min(initiator.chunk_bytes, responder.chunk_bytes), dtypes=dtypes, kinds=kinds,
        residual_gain_max=min(initiator.residual_gain_max, responder.residual_gain_max),
        remote_signature=remote_sig, send_window_bytes=remote.recv_window_bytes,
        recv_window_bytes=mine.recv_window_bytes)


def encode_auth(public_key: bytes, signature: bytes, token_proof: bytes | None) -> bytes:
    return pack({"idk": public_key, "sig": signature, "tok": token_proof})


def decode_auth(body: bytes) -> tuple[bytes, bytes, bytes | None]:
    d = unpack_map(body, MAX_HANDSHAKE_FRAME, max_array=4, max_map=8, max_str=64, max_bin=4096)
    if set(d) != {"idk", "sig", "tok"}:  # AUTH is not covered by the transcript: exact keys only
        raise ProtocolError(ErrorCode.MALFORMED, "AUTH must have exactly idk, sig, tok")
    tok = d.get("tok")
    if tok is not None and (not isinstance(tok, bytes) or len(tok) != 32):
        raise ProtocolError(ErrorCode.MALFORMED, "token proof must be 32 bytes")
    return need(d, "idk", bytes), need(d, "sig", bytes), tok
