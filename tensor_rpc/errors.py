"""The two error types of the tensor protocol (h11's split): the peer was wrong, or you were.

* :class:`ProtocolError` — the *peer* sent something wrong, or we refuse what it asked for. Every
  decoder and state transition in :mod:`tensor_rpc` raises only this for bad peer input, so a
  transport adapter needs exactly one ``except`` clause and a fuzzer has exactly one allowed
  outcome. The ``code`` travels on the wire (REJECT / CLOSE / ABORT frames) by *name*, so the enum
  values below are part of the contract documented in ``docs/PROTOCOL.md``.
* :class:`UsageError` — the *local caller* used the API wrong (sent in the wrong state, a payload
  that does not match its specs, a chunk sealed out of order). Nothing goes on the wire; fix the
  calling code.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class ErrorCode(enum.Enum):
    """Why a session or a message was refused (wire name = member name)."""

    VERSION = "VERSION"  # no common protocol version
    INCOMPATIBLE_MODEL = "INCOMPATIBLE_MODEL"  # invariant A; ``fields`` names each mismatch
    LIMIT = "LIMIT"  # a length, count or size exceeds the negotiated/configured bound
    MALFORMED = "MALFORMED"  # bytes that do not parse or violate the schema
    AUTH = "AUTH"  # identity signature invalid or key not bound to the peer ID
    REPLAY = "REPLAY"  # a message id that is not strictly increasing
    ORDER = "ORDER"  # a chunk out of order, for an unknown message, or missing
    CHECKSUM = "CHECKSUM"  # BLAKE3 / shape / length verification failed (invariant C)
    DECRYPT = "DECRYPT"  # AEAD authentication failed (tamper, splice, replay of sealed frames)
    TIMEOUT = "TIMEOUT"  # handshake or idle timeout
    ACCESS_DENIED = "ACCESS_DENIED"  # allow/deny list or shared token refused the peer
    RATE_LIMITED = "RATE_LIMITED"  # messages/s or bytes/s budget exceeded
    STATE = "STATE"  # a frame or call that is not valid in the current state
    UNSUPPORTED = "UNSUPPORTED"  # no common cipher, dtype or message kind
    CLOSED = "CLOSED"  # the peer closed the session normally


class ProtocolError(Exception):
    """A protocol violation or refusal. ``fields`` lists names the peer must fix (e.g. model fields)."""

    def __init__(self, code: ErrorCode, message: str, fields: Sequence[str] = ()) -> None:
        self.code = code
        self.message = message
        self.fields: tuple[str, ...] = tuple(fields)
        suffix = f" [{', '.join(self.fields)}]" if self.fields else ""
        super().__init__(f"{code.value}: {message}{suffix}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProtocolError):
            return NotImplemented
        return (self.code, self.message, self.fields) == (other.code, other.message, other.fields)

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.fields))


def code_from_wire(name: object) -> ErrorCode:
    """Map a peer-sent code name to the enum; unknown names become MALFORMED rather than crash."""
    if isinstance(name, str) and name in ErrorCode.__members__:
        return ErrorCode[name]
    return ErrorCode.MALFORMED


class UsageError(Exception):
    """The local caller used the session API wrong; ``code`` says how (STATE, LIMIT, ...)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")
