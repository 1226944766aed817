"""Small sealed control messages after the handshake: DIGEST, ACK, REJECT, CREDIT, CLOSE, and
plaintext ABORT.

Each is a msgpack map. DIGEST carries the sender's per-tensor BLAKE3 after the last chunk; the ACK
echoes the BLAKE3 the *receiver computed* for every tensor (invariant C); the sender compares it
with what it sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import need, need_uint, pack, unpack_map
from .envelope import CHECKSUM_BYTES
from .errors import ErrorCode, ProtocolError, code_from_wire

MAX_CONTROL_BYTES = 64 * 1024
MAX_REASON = 1024


@dataclass(frozen=True)
class Ack:
    message_id: int
    payload_bytes: int
    checksums: tuple[bytes, ...]


def encode_ack(ack: Ack) -> bytes:
    return pack({"mid": ack.message_id, "len": ack.payload_bytes, "sums": list(ack.checksums)})


def decode_ack(body: bytes, max_tensors: int) -> Ack:
    d = unpack_map(body, max(MAX_CONTROL_BYTES, 40 * max_tensors + 64), max_array=max_tensors,
                   max_map=8, max_str=64, max_bin=CHECKSUM_BYTES)
    sums = need(d, "sums", list)
    if not all(isinstance(s, bytes) and len(s) == CHECKSUM_BYTES for s in sums):
        raise ProtocolError(ErrorCode.MALFORMED, "ack checksums must be 32-byte strings")
    return Ack(need_uint(d, "mid"), need_uint(d, "len"), tuple(sums))


def encode_digest(message_id: int, sums: tuple[bytes, ...]) -> bytes:
    return pack({"mid": message_id, "sums": list(sums)})


def decode_digest(body: bytes, max_tensors: int) -> tuple[int, tuple[bytes, ...]]:
    d = unpack_map(body, max(MAX_CONTROL_BYTES, 40 * max_tensors + 64), max_array=max_tensors,
                   max_map=8, max_str=64, max_bin=CHECKSUM_BYTES)
    sums = need(d, "sums", list)
    if not all(isinstance(s, bytes) and len(s) == CHECKSUM_BYTES for s in sums):
        raise ProtocolError(ErrorCode.MALFORMED, "digest checksums must be 32-byte strings")
    return need_uint(d, "mid"), tuple(sums)


def encode_error(err: ProtocolError, message_id: int | None = None) -> bytes:
    d: dict[str, object] = {"code": err.code.value, "msg": err.message[:MAX_REASON],
                            "fields": list(err.fields)[:64]}
    if message_id is not None:
        d["mid"] = message_id
    return pack(d)


def decode_error(body: bytes) -> tuple[int | None, ProtocolError]:
    """REJECT / CLOSE / ABORT body -> (message id or None, the peer's error)."""
    d = unpack_map(body, MAX_CONTROL_BYTES, max_array=64, max_map=8, max_str=MAX_REASON)
    code = code_from_wire(need(d, "code", str))
    msg = need(d, "msg", str)
    fields = need(d, "fields", list)
    if not all(isinstance(f, str) for f in fields):
        raise ProtocolError(ErrorCode.MALFORMED, "error fields must be strings")
    mid = need_uint(d, "mid") if "mid" in d else None
    return mid, ProtocolError(code, msg, fields)


def encode_credit(nbytes: int) -> bytes:
    return pack({"bytes": nbytes})


def decode_credit(body: bytes) -> int:
    d = unpack_map(body, MAX_CONTROL_BYTES, max_array=0, max_map=4, max_str=16, max_bin=0)
    return need_uint(d, "bytes")
