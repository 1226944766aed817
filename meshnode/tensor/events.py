"""What the tensor service tells the rest of the node, as typed events on the node's bus.

``MessageDelivered`` means the protocol verified every checksum and queued the message for the
application — not that anything was applied. Only the application (the runtime glue in
``meshnode/handoff.py``) can say ``MessageApplied`` or ``MessageRefused``, after it tried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensor_rpc import ProtocolError


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    peer: str
    initiator: bool
    compat_key: str


@dataclass(frozen=True)
class SessionEnded:
    session_id: str
    peer: str
    reason: str
    error: ProtocolError | None


@dataclass(frozen=True)
class TransferSent:
    """Our message was acknowledged: the receiver verified the checksums we sent."""

    session_id: str
    peer: str
    message_id: int
    kind: str
    layers: tuple[int, int]
    tokens: tuple[int, int]
    nbytes: int
    checksums: tuple[bytes, ...]
    path: str
    elapsed_s: float


@dataclass(frozen=True)
class TransferFailed:
    session_id: str
    peer: str
    message_id: int
    error: ProtocolError
    local: bool  # True: we rejected the peer's message; False: the peer rejected ours


@dataclass(frozen=True)
class MessageDelivered:
    session_id: str
    peer: str
    message_id: int
    nbytes: int
    path: str
    elapsed_s: float


@dataclass(frozen=True)
class MessageApplied:
    """The application applied a delivered message to its state (e.g. injected the KV cache)."""

    session_id: str
    peer: str
    message_id: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MessageRefused:
    """The application could not apply a delivered message; nothing of it was applied."""

    session_id: str
    peer: str
    message_id: int
    reason: str
